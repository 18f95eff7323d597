"""Figures drawn to PNG files in a forked process, while the run goes on logging its model.

Drawing a run's figures and logging its model each take about a second of one core
after training; on Linux a forked child draws while the parent logs, so the two overlap. The
child only draws numpy arrays computed beforehand (no torch, no MLflow, whose sqlite connection
must not cross a fork) and leaves through ``os._exit``, so the parent's exit handlers never run
in it. Where fork is unavailable, or the child fails, the figures are drawn in this process.
"""

import logging
import multiprocessing
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

FigureJobs = dict[str, Callable[[], Figure]]


def _draw(jobs: FigureJobs, folder: Path) -> None:
    for name, make in jobs.items():
        make().savefig(folder / f"{name}.png")


def _draw_in_child(jobs: FigureJobs, folder: Path) -> None:
    # a Ctrl-C reaches the whole process group: the parent stops the run, the child just ends
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    with threadpool_limits(1):  # one core for PCA's BLAS: the other is the parent's, logging
        _draw(jobs, folder)


class Rendering:
    """Figures being drawn into ``folder``; ``wait`` returns once every file is there."""

    def __init__(self, jobs: FigureJobs, folder: Path) -> None:
        self.jobs, self.folder = jobs, folder
        self._child: multiprocessing.process.BaseProcess | None = None
        if sys.platform == "linux":  # fork is the default and safe for numpy/matplotlib work there
            self._child = multiprocessing.get_context("fork").Process(
                target=_draw_in_child, args=(jobs, folder)
            )
            self._child.start()

    def stop(self) -> None:
        """End a child that is still drawing (the run stopped before it needed the figures)."""
        if self._child is not None and self._child.is_alive():
            self._child.terminate()
            self._child.join()

    def wait(self) -> Path:
        if self._child is not None:
            self._child.join()
            if self._child.exitcode == 0:
                return self.folder
            log.warning(
                "drawing figures in a child process failed (exit %s); drawing them here", self._child.exitcode
            )
        _draw(self.jobs, self.folder)
        return self.folder


@contextmanager
def rendering(jobs: FigureJobs) -> Iterator[Rendering]:
    """Start drawing ``jobs``; the temporary folder is removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="sweeplab-figures-"))
    drawing = Rendering(jobs, folder)
    try:
        yield drawing
    finally:
        drawing.stop()
        shutil.rmtree(folder, ignore_errors=True)
