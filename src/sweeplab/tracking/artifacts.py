"""A run's artifact files (figure PNGs, the logged model's folder) written by a child process
forked before training, while the run goes on; the run then logs them.

Figures need SciPy, scikit-learn and matplotlib (about a second of imports) and about a second
of drawing. Writing a logged model makes MLflow check its requirements against every installed
distribution, a walk over their files once per process (longer the more is installed) that holds
the interpreter lock throughout: in a thread of the run's process it slows a loop of small steps
several times over (``docs/performance.md``). None of it needs the run's process. On Linux,
``prefork`` forks the child early, when the run starts loading its data: it imports the figure
libraries and lets MLflow walk the distributions on a core of its own, at a lower priority than
the run's threads, while the run trains. It then waits for the jobs, which ``writing`` sends it
pickled once the run has them (plain functions over numpy arrays and CPU modules, each writing
the file or folder at the path it is given), and reports each file as it is written, so a run
logs its files as soon as they are there. Many jobs (a stack's members) are shared out: the
child forks helpers, which inherit its imports and the jobs, one per core. Children touch no
torch device state and no MLflow store (whose sqlite connection must not cross a fork) and leave
through ``os._exit``, so the parent's exit handlers never run in them; an idle child ends when
the run's process does. Where fork is unavailable, or writing in a child fails, the files are
written in this process.
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path

from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

FileJobs = dict[str, Callable[[Path], None]]  # name -> writes the file or folder <folder>/<name>
FIGURE_MODULES = ("scipy.signal", "sklearn.decomposition", "sklearn.metrics")


def preload(figures: bool, models: bool) -> None:
    """Import what drawing figures and writing a model need, and have MLflow map the installed
    distributions, which it does once per process before it writes a model's requirements."""
    if figures:
        for module in FIGURE_MODULES:
            importlib.import_module(module)
    if models:
        importlib.import_module("mlflow.pytorch")
        importlib.import_module("mlflow.pyfunc")  # which saving a model imports
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()  # cached by MLflow for the process


@dataclasses.dataclass
class _Writer:
    process: multiprocessing.process.BaseProcess
    jobs: Connection  # where the jobs go, once
    done: Connection  # the name of each job written, as it is


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
    jobs_out, jobs_in = context.Pipe(duplex=False)
    done_out, done_in = context.Pipe(duplex=False)
    args = (jobs_out, done_in, (jobs_in, done_out), figures, models)
    process = context.Process(target=_serve, args=args, name="sweeplab-artifacts")
    process.start()
    jobs_out.close()  # the child's ends: a pipe ends (EOF) when no process holds its write end
    done_in.close()
    _ready = _Writer(process, jobs_in, done_out)


def _release() -> None:
    """An idle child ends when its pipe closes; multiprocessing then joins it at exit."""
    global _ready
    if _ready is not None:
        _ready.jobs.close()
        _ready.done.close()
        _ready = None


atexit.register(_release)  # before multiprocessing's own exit handler, which joins children


def _serve(
    jobs: Connection, done: Connection, parents: tuple[Connection, ...], figures: bool, models: bool
) -> None:
    # a Ctrl-C reaches the whole process group: the parent stops the run, the child just ends
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    for end in parents:  # the fork's copies of the parent's ends
        end.close()
    os.nice(10)  # the run's own threads go first
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
            _write_share(work, names[share::shares], folder, done)
            os._exit(0)
        helpers.append(pid)
    _write_share(work, names[::shares], folder, done)
    if any(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in helpers):
        os._exit(1)


def _write_share(work: FileJobs, names: list[str], folder: Path, done: Connection) -> None:
    try:
        with threadpool_limits(1):  # one core for PCA's BLAS: the others draw or log
            for name in names:
                work[name](folder / name)
                done.send_bytes(name.encode())  # one short write: atomic beside the helpers'
    except BaseException:
        os._exit(1)


class Writing:
    """Files being written into ``folder`` by the child ``prefork`` readied (forked now if
    there is none) with up to ``processes`` processes, in the order of ``jobs`` (each process
    takes every ``processes``-th); ``ready`` returns once the files asked for are there."""

    def __init__(self, jobs: FileJobs, folder: Path, processes: int = 1) -> None:
        global _ready
        self.jobs, self.folder = jobs, folder
        self.written: set[str] = set()
        self._child: _Writer | None = None
        if not jobs:
            return
        prefork(figures=False, models=False)  # no time left to preload: the jobs import what they use
        child, _ready = _ready, None
        if child is None:
            return
        self._child = child
        try:
            # plain pickle: the multiprocessing pickler would move tensors to shared memory
            child.jobs.send_bytes(pickle.dumps((jobs, processes, folder)))
        except Exception as exc:  # a job that cannot be pickled: all are written here
            log.warning("artifacts not sent to the writing process (%s); writing them here", exc)
            self.stop()
        finally:
            child.jobs.close()

    def ready(self, names: Iterable[str]) -> Path:
        """The folder, once the files ``names`` are in it: if the child failed, what it did not
        write is written here."""
        wanted = set(names) - self.written
        while wanted and self._child is not None:
            try:
                name = self._child.done.recv_bytes().decode()
            except EOFError:  # the child and its helpers are gone without writing them all
                self._end_child()
                break
            self.written.add(name)
            wanted.discard(name)
        if wanted:
            for name in [name for name in self.jobs if name not in self.written]:
                shutil.rmtree(self.folder / name, ignore_errors=True)  # what a failure left half-written
                self.jobs[name](self.folder / name)
                self.written.add(name)
        return self.folder

    def wait(self) -> Path:
        """The folder, every file in it."""
        self.ready(self.jobs)
        self._end_child()
        return self.folder

    def _end_child(self) -> None:
        if self._child is not None:
            self._child.process.join()
            if self._child.process.exitcode != 0:
                log.warning(
                    "writing artifacts in a child process failed (exit %s); writing the rest here",
                    self._child.process.exitcode,
                )
            self._child.done.close()
            self._child = None

    def stop(self) -> None:
        """End a child still writing (the run stopped before it needed the files)."""
        if self._child is not None:
            self._child.process.terminate()
            self._child.process.join()
            self._child.done.close()
            self._child = None


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
