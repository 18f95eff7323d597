"""Figures drawn to PNG files by a child process forked before training, while the run goes on.

A run's figures need SciPy, scikit-learn and matplotlib (about a second of imports) and about
a second of drawing; neither needs the run's process. On Linux, ``prefork`` forks the drawing
child early, when the run starts loading its data: it imports the figure libraries on a core of
its own while the run trains, then waits for the figure jobs, which ``rendering`` sends it
(plain functions over numpy arrays, pickled) once the run has them. The run meanwhile logs its
model. Many figures (a stack's members) are shared out: the child forks helpers, which inherit
its imports and the jobs, one per core. Children touch no torch state and no MLflow (whose
sqlite connection must not cross a fork) and leave through ``os._exit``, so the parent's exit
handlers never run in them; an idle child ends when the run's process does. Where fork is
unavailable, or drawing in a child fails, the figures are drawn in this process.
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
class _Drawer:
    process: multiprocessing.process.BaseProcess
    jobs: Connection  # where the jobs go, once


_ready: _Drawer | None = None


def prefork() -> None:
    """Have a child ready to draw, its libraries importing from now on (once per run).

    Call it before this process starts threads (a fork copies only the calling thread)."""
    global _ready
    if sys.platform != "linux":  # fork is the default and safe for numpy/matplotlib work there
        return
    if _ready is not None and _ready.process.is_alive():
        return
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_serve, args=(reader, writer), name="sweeplab-figures")
    process.start()
    reader.close()
    _ready = _Drawer(process, writer)


def _release() -> None:
    """An idle child ends when its pipe closes; multiprocessing then joins it at exit."""
    global _ready
    if _ready is not None:
        _ready.jobs.close()
        _ready = None


atexit.register(_release)  # before multiprocessing's own exit handler, which joins children


def _serve(jobs: Connection, writer: Connection) -> None:
    # a Ctrl-C reaches the whole process group: the parent stops the run, the child just ends
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    writer.close()  # the fork's copy of the write end: only the parent's may keep the pipe open
    for module in FIGURE_MODULES:
        importlib.import_module(module)
    try:
        work, processes, folder = jobs.recv()
    except EOFError:  # the run ended without figures
        os._exit(0)
    names = list(work)
    shares = max(1, min(processes, len(names)))
    helpers = []
    for share in range(1, shares):
        pid = os.fork()
        if pid == 0:  # a helper: its share, then gone
            _draw_share(work, names[share::shares], folder)
            os._exit(0)
        helpers.append(pid)
    _draw_share(work, names[::shares], folder)
    if any(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in helpers):
        os._exit(1)


def _draw_share(work: FigureJobs, names: list[str], folder: Path) -> None:
    try:
        with threadpool_limits(1):  # one core for PCA's BLAS: the others draw or log
            _draw({name: work[name] for name in names}, folder)
    except BaseException:
        os._exit(1)


def _draw(jobs: FigureJobs, folder: Path) -> None:
    for name, make in jobs.items():
        make().savefig(folder / f"{name}.png")


class Rendering:
    """Figures being drawn into ``folder`` by the child ``prefork`` readied (forked now if
    there is none) with up to ``processes`` processes; ``wait`` returns once every file is
    there."""

    def __init__(self, jobs: FigureJobs, folder: Path, processes: int = 1) -> None:
        global _ready
        self.jobs, self.folder = jobs, folder
        prefork()
        drawer, _ready = _ready, None
        self._drawer: _Drawer | None = None
        if drawer is None:
            return
        try:
            drawer.jobs.send((jobs, processes, folder))
            self._drawer = drawer
        except Exception as exc:  # a job that cannot be pickled: all are drawn here
            log.warning("figures not sent to the drawing process (%s); drawing them here", exc)
            drawer.process.terminate()
        finally:
            drawer.jobs.close()

    def stop(self) -> None:
        """End a child still drawing (the run stopped before it needed the figures)."""
        if self._drawer is not None and self._drawer.process.is_alive():
            self._drawer.process.terminate()
            self._drawer.process.join()

    def wait(self) -> Path:
        """The folder, every figure in it: if the child failed, they are drawn here."""
        if self._drawer is not None:
            self._drawer.process.join()
            if self._drawer.process.exitcode == 0:
                return self.folder
            log.warning(
                "drawing figures in a child process failed (exit %s); drawing them here",
                self._drawer.process.exitcode,
            )
        _draw(self.jobs, self.folder)
        return self.folder


@contextmanager
def rendering(jobs: FigureJobs, processes: int = 1) -> Iterator[Rendering]:
    """Draw ``jobs`` in the child ``prefork`` readied, with up to ``processes`` processes; the
    temporary folder is removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="sweeplab-figures-"))
    drawing = Rendering(jobs, folder, processes)
    try:
        yield drawing
    finally:
        drawing.stop()
        shutil.rmtree(folder, ignore_errors=True)
