"""A run's artifact files (figure PNGs, the logged model's folder) written by a child process
forked before training, while the run goes on; the run then logs them.

Figures need SciPy, scikit-learn and matplotlib (about a second of imports) and about a second
of drawing. Writing a logged model makes MLflow check its requirements against every installed
distribution, a walk over their files once per process (~0.3 s here, seconds beside a CUDA
build of torch) that holds the interpreter lock throughout: in a thread of the run's process it
slows a loop of small steps several times over (a loop of small CPU ops, measured: 4.8x). None
of it needs the run's process. On Linux, ``prefork`` forks the child early, when the run starts
loading its data: it imports the figure libraries and lets MLflow walk the distributions on a
core of its own while the run trains, then waits for the jobs, which ``writing`` sends it
pickled once the run has them (plain functions over numpy arrays and CPU modules, each writing
the file or folder at the path it is given). Many jobs (a stack's members) are shared out: the
child forks helpers, which inherit its imports and the jobs, one per core. Children touch no
torch device state and no MLflow store (whose sqlite connection must not cross a fork) and
leave through ``os._exit``, so the parent's exit handlers never run in them; an idle child ends
when the run's process does. Where fork is unavailable, or writing in a child fails, the files
are written in this process.
"""

import atexit
import dataclasses
import importlib
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path

from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

FileJobs = dict[str, Callable[[Path], None]]  # name -> writes the file or folder <folder>/<name>
FIGURE_MODULES = ("scipy.signal", "sklearn.decomposition", "sklearn.metrics")


def preload(figures: bool, models: bool) -> None:
    """Import what drawing figures needs and have MLflow map the installed distributions,
    which it does once per process before it writes a model's requirements."""
    if figures:
        for module in FIGURE_MODULES:
            importlib.import_module(module)
    if models:
        importlib.import_module("mlflow.pytorch")
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()  # cached by MLflow for the process


@dataclasses.dataclass
class _Writer:
    process: multiprocessing.process.BaseProcess
    jobs: Connection  # where the jobs go, once


_ready: _Writer | None = None


def prefork(*, figures: bool, models: bool) -> None:
    """Have a child ready to write, preloading (``preload``) from now on; once per run.

    Call it before this process starts threads (a fork copies only the calling thread)."""
    global _ready
    if sys.platform != "linux":  # fork is the default and safe for numpy/matplotlib work there
        return
    if _ready is not None and _ready.process.is_alive():
        return
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    args = (reader, writer, figures, models)
    process = context.Process(target=_serve, args=args, name="sweeplab-artifacts")
    process.start()
    reader.close()
    _ready = _Writer(process, writer)


def _release() -> None:
    """An idle child ends when its pipe closes; multiprocessing then joins it at exit."""
    global _ready
    if _ready is not None:
        _ready.jobs.close()
        _ready = None


atexit.register(_release)  # before multiprocessing's own exit handler, which joins children


def _serve(jobs: Connection, writer: Connection, figures: bool, models: bool) -> None:
    # a Ctrl-C reaches the whole process group: the parent stops the run, the child just ends
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    writer.close()  # the fork's copy of the write end: only the parent's may keep the pipe open
    os.nice(10)
    preload(figures, models)
    try:
        work, processes, folder = pickle.loads(jobs.recv_bytes())
    except EOFError:  # the run ended without artifacts
        os._exit(0)
    names = list(work)
    shares = max(1, min(processes, len(names)))
    helpers = []
    for share in range(1, shares):
        pid = os.fork()
        if pid == 0:  # a helper: its share, then gone
            _write_share(work, names[share::shares], folder)
            os._exit(0)
        helpers.append(pid)
    _write_share(work, names[::shares], folder)
    if any(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in helpers):
        os._exit(1)


def _write_share(work: FileJobs, names: list[str], folder: Path) -> None:
    try:
        with threadpool_limits(1):  # one core for PCA's BLAS: the others draw or log
            _write({name: work[name] for name in names}, folder)
    except BaseException:
        os._exit(1)


def _write(jobs: FileJobs, folder: Path) -> None:
    for name, write in jobs.items():
        write(folder / name)


class Writing:
    """Files being written into ``folder`` by the child ``prefork`` readied (forked now if
    there is none) with up to ``processes`` processes; ``wait`` returns once every one is
    there."""

    def __init__(self, jobs: FileJobs, folder: Path, processes: int = 1) -> None:
        global _ready
        self.jobs, self.folder = jobs, folder
        if jobs:
            prefork(figures=False, models=False)  # no time left to preload: the jobs import what they use
        child, _ready = _ready, None
        self._child: _Writer | None = None
        if child is None or not jobs:
            return
        try:
            # plain pickle: the multiprocessing pickler would move tensors to shared memory
            child.jobs.send_bytes(pickle.dumps((jobs, processes, folder)))
            self._child = child
        except Exception as exc:  # a job that cannot be pickled: all are written here
            log.warning("artifacts not sent to the writing process (%s); writing them here", exc)
            child.process.terminate()
        finally:
            child.jobs.close()

    def stop(self) -> None:
        """End a child still writing (the run stopped before it needed the files)."""
        if self._child is not None and self._child.process.is_alive():
            self._child.process.terminate()
            self._child.process.join()

    def wait(self) -> Path:
        """The folder, every file in it: if the child failed, they are all written here."""
        if self._child is not None:
            self._child.process.join()
            if self._child.process.exitcode == 0:
                return self.folder
            log.warning(
                "writing artifacts in a child process failed (exit %s); writing them here",
                self._child.process.exitcode,
            )
            shutil.rmtree(self.folder)  # what the child left half-written
            self.folder.mkdir()
        _write(self.jobs, self.folder)
        return self.folder


@contextmanager
def writing(jobs: FileJobs, processes: int = 1) -> Iterator[Writing]:
    """Write ``jobs`` in the child ``prefork`` readied, with up to ``processes`` processes; the
    temporary folder is removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="sweeplab-artifacts-"))
    files = Writing(jobs, folder, processes)
    try:
        yield files
    finally:
        files.stop()
        shutil.rmtree(folder, ignore_errors=True)
