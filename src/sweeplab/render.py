"""Figures drawn to PNG files by child processes forked before training, while the run goes on.

A run's figures need SciPy, scikit-learn and matplotlib (about a second of imports) and about
a second of drawing; neither needs the run's process. On Linux, ``prefork`` forks the children
early, when the run starts loading its data: each imports the figure libraries on a core of its
own while the run trains, then waits for its share of the figure jobs, which ``rendering``
sends it (plain functions over numpy arrays, pickled) once the run has them. The run meanwhile
logs its model. Children touch no torch state and no MLflow (whose sqlite connection must not
cross a fork) and leave through ``os._exit``, so the parent's exit handlers never run in them; an
idle child ends when the run's process does. Where fork is unavailable, or a child fails, the
figures are drawn in this process.
"""

import atexit
import dataclasses
import importlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path

from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

FigureJobs = dict[str, Callable[[], Figure]]  # picklable: module-level functions, partials
FIGURE_MODULES = ("scipy.signal", "sklearn.decomposition", "sklearn.metrics")


@dataclasses.dataclass
class _Child:
    process: multiprocessing.process.BaseProcess
    jobs: Connection  # where its share of the jobs goes


_idle: list[_Child] = []


def prefork(processes: int = 1) -> None:
    """Have ``processes`` children ready to draw, their libraries importing from now on.

    Call it before this process starts threads (a fork copies only the calling thread)."""
    if sys.platform != "linux":  # fork is the default and safe for numpy/matplotlib work there
        return
    _idle[:] = [child for child in _idle if child.process.is_alive()]
    context = multiprocessing.get_context("fork")
    while len(_idle) < processes:
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(target=_serve, args=(reader, writer), name="sweeplab-figures")
        process.start()
        reader.close()
        _idle.append(_Child(process, writer))


def _release() -> None:
    """Idle children end when their pipe closes; multiprocessing then joins them at exit."""
    for child in _idle:
        child.jobs.close()
    _idle.clear()


atexit.register(_release)  # before multiprocessing's own exit handler, which joins children


def _serve(jobs: Connection, writer: Connection) -> None:
    # a Ctrl-C reaches the whole process group: the parent stops the run, the child just ends
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    for child in _idle:  # the write ends the fork copied: only the parent's may keep a pipe open
        child.jobs.close()
    writer.close()
    for module in FIGURE_MODULES:
        importlib.import_module(module)
    try:
        mine, folder = jobs.recv()
    except EOFError:  # the run ended without figures
        os._exit(0)
    with threadpool_limits(1):  # one core for PCA's BLAS: the other is the parent's, logging
        _draw(mine, folder)


def _draw(jobs: FigureJobs, folder: Path) -> None:
    for name, make in jobs.items():
        make().savefig(folder / f"{name}.png")


class Rendering:
    """Figures being drawn into ``folder`` by the ready children (at least ``processes`` of
    them), each given every n-th job; ``wait`` returns once every file is there."""

    def __init__(self, jobs: FigureJobs, folder: Path, processes: int = 1) -> None:
        self.jobs, self.folder = jobs, folder
        self._children: list[tuple[_Child | None, FigureJobs]] = []  # None: drawn here
        prefork(processes)
        children, _idle[:] = _idle[:], []
        names = list(jobs)
        for share, child in enumerate(children):
            mine = {name: jobs[name] for name in names[share :: len(children)]}
            try:
                if mine:
                    child.jobs.send((mine, folder))
                self._children.append((child, mine))
            except Exception as exc:  # a job that cannot be pickled is drawn here
                log.warning("figures %s not sent to a child (%s); drawing them here", list(mine), exc)
                child.process.terminate()
                self._children.append((None, mine))
            finally:
                child.jobs.close()

    def stop(self) -> None:
        """End children still drawing (the run stopped before it needed the figures)."""
        for child, _ in self._children:
            if child is not None and child.process.is_alive():
                child.process.terminate()
                child.process.join()

    def wait(self) -> Path:
        """The folder, every figure in it: what a child failed to draw is drawn here."""
        if not self._children:
            _draw(self.jobs, self.folder)
        for child, mine in self._children:
            if child is not None:
                child.process.join()
                if not mine or child.process.exitcode == 0:
                    continue
                log.warning(
                    "drawing figures in a child process failed (exit %s); drawing them here",
                    child.process.exitcode,
                )
            _draw(mine, self.folder)
        return self.folder


@contextmanager
def rendering(jobs: FigureJobs, processes: int = 1) -> Iterator[Rendering]:
    """Draw ``jobs`` in the children ``prefork`` readied (at least ``processes``, forked now if
    missing); the temporary folder is removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="sweeplab-figures-"))
    drawing = Rendering(jobs, folder, processes)
    try:
        yield drawing
    finally:
        drawing.stop()
        shutil.rmtree(folder, ignore_errors=True)
