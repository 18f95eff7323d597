"""Figures drawn to PNG files in a forked process, while the run goes on logging its model.

Drawing a run's figures and logging its model each take about a second of one core
after training; on Linux a forked child draws while the parent logs, so the two overlap. The
figures of many runs (a stack's members) are shared out among a few children, one per core. The
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
    """Figures being drawn into ``folder`` by up to ``processes`` children, each given every
    ``processes``-th job; ``wait`` returns once every file is there."""

    def __init__(self, jobs: FigureJobs, folder: Path, processes: int = 1) -> None:
        self.jobs, self.folder = jobs, folder
        self._children: list[tuple[multiprocessing.process.BaseProcess, FigureJobs]] = []
        if sys.platform != "linux":  # fork is the default and safe for numpy/matplotlib work there
            return
        names = list(jobs)
        shares = max(1, min(processes, len(names)))
        for share in range(shares):
            mine = {name: jobs[name] for name in names[share::shares]}
            child = multiprocessing.get_context("fork").Process(target=_draw_in_child, args=(mine, folder))
            child.start()
            self._children.append((child, mine))

    def stop(self) -> None:
        """End children still drawing (the run stopped before it needed the figures)."""
        for child, _ in self._children:
            if child.is_alive():
                child.terminate()
                child.join()

    def wait(self) -> Path:
        """The folder, every figure in it: what a child failed to draw is drawn here."""
        if not self._children:
            _draw(self.jobs, self.folder)
        for child, mine in self._children:
            child.join()
            if child.exitcode != 0:
                log.warning(
                    "drawing figures in a child process failed (exit %s); drawing them here", child.exitcode
                )
                _draw(mine, self.folder)
        return self.folder


@contextmanager
def rendering(jobs: FigureJobs, processes: int = 1) -> Iterator[Rendering]:
    """Start drawing ``jobs`` in ``processes`` children; the temporary folder is removed when
    the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="sweeplab-figures-"))
    drawing = Rendering(jobs, folder, processes)
    try:
        yield drawing
    finally:
        drawing.stop()
        shutil.rmtree(folder, ignore_errors=True)
