"""The fork launcher's work: preload, fork one process per job, collect what each returns.

Each job runs in a process forked for it, ``n_jobs`` at a time, with torch limited to
(cores / workers) threads. A job whose process dies (the OOM killer, ``kill -9``) takes no other
job with it: its run is ended KILLED, the sweep goes on, and re-running the sweep resumes that job
from its last checkpoint. Database connections are never shared across the fork: a pooled
connection that was opened before it is discarded and reopened in the worker (SQLAlchemy's
recipe for pools and ``os.fork``).
"""

import gc
import importlib
import logging
import math
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import OmegaConf, open_dict

if TYPE_CHECKING:
    from hydra_plugins.sweeplab_launcher.fork_launcher import ForkLauncher

log = logging.getLogger(__name__)

_FORK = multiprocessing.get_context("fork")
# Hydra imports this module's launcher in the process that launches the sweep: a pooled
# connection without a recorded process was opened here, before the pool was watched
_LAUNCHING_PID = os.getpid()


def launch(
    launcher: "ForkLauncher", job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """Import what every job needs once, then run the jobs in forked processes."""
    setup_globals()
    assert launcher.config is not None
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    workers = max(1, min(cores if launcher.n_jobs < 1 else launcher.n_jobs, len(job_overrides)))
    for module in launcher.preload:
        importlib.import_module(module)
    from sweeplab.tracking import artifacts

    artifacts.preload(figures=True, models=True)  # once here rather than once per job
    log.info("Launching %d jobs in %d forked workers", len(job_overrides), workers)
    for idx, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
    _watch_connections()
    jobs = [(initial_job_idx + idx, list(overrides)) for idx, overrides in enumerate(job_overrides)]
    gc.freeze()  # what the jobs inherit: out of their collections' sight, so its pages stay shared
    return _Workers(launcher, workers, max(1, cores // workers)).run(jobs)


def _remember_process(dbapi_connection: Any, record: Any) -> None:
    record.info["pid"] = os.getpid()


def _refuse_inherited_connection(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """A connection from another process (one opened before the listeners were added is the
    launching process's) is dropped unclosed, and the pool opens a new one."""
    from sqlalchemy.exc import DisconnectionError

    if record.info.get("pid", _LAUNCHING_PID) != os.getpid():
        record.dbapi_connection = proxy.dbapi_connection = None  # still the parent's to close
        raise DisconnectionError("connection opened in another process")


def _watch_connections() -> None:
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    if not event.contains(Pool, "checkout", _refuse_inherited_connection):
        event.listen(Pool, "connect", _remember_process)
        event.listen(Pool, "checkout", _refuse_inherited_connection)


class _Workers:
    """Up to ``size`` jobs at a time, each in a process forked for it: a job whose process dies
    (the OOM killer, ``kill -9``) takes no other job with it; its run is ended KILLED and the
    next job starts in a fresh process."""

    def __init__(self, launcher: "ForkLauncher", size: int, threads: int) -> None:
        self.launcher, self.size, self.threads = launcher, size, threads
        self.running: dict[int, tuple[int, list[str], multiprocessing.process.BaseProcess, Connection]] = {}
        self.exit_code: int | None = None  # a job that stopped the sweep (signal, on_error=raise)

    def run(self, jobs: list[tuple[int, list[str]]]) -> list[JobReturn]:
        pending, results = deque(jobs), {}
        try:
            while pending or self.running:
                while pending and len(self.running) < self.size and self.exit_code is None:
                    self._start(*pending.popleft())
                if not self.running:
                    break
                for sentinel in wait(list(self.running)):
                    idx, overrides, process, returned = self.running.pop(sentinel)
                    results[idx] = self._collect(idx, overrides, process, returned)
        finally:  # after Ctrl-C: running jobs checkpoint and end (their own handlers), none starts
            for _, _, process, _ in self.running.values():
                process.join()
        if self.exit_code is not None:
            raise SystemExit(self.exit_code)
        return [results[idx] for idx, _ in jobs]

    def _start(self, idx: int, overrides: list[str]) -> None:
        receive, send = _FORK.Pipe(duplex=False)
        # a forked child inherits its arguments as they are: the launcher is not pickled
        process = _FORK.Process(target=_job_process, args=(self.launcher, idx, overrides, send, self.threads))
        process.start()
        send.close()
        self.running[process.sentinel] = (idx, overrides, process, receive)
        log.info("#%d started in process %d", idx, process.pid)

    def _collect(
        self,
        idx: int,
        overrides: list[str],
        process: multiprocessing.process.BaseProcess,
        returned: Connection,
    ) -> JobReturn | None:
        """The job's ``JobReturn``; for a job stopped by an exit (a signal, ``on_error=raise``)
        none, and no further job starts; for a job whose process died, NaN (the sweep goes on)."""
        process.join()
        try:
            kind, value = returned.recv()
        except EOFError:  # the process ended without a word: killed
            kind, value = "died", None
        if kind == "returned":
            return value
        if kind == "exited":
            self.exit_code = self.exit_code if self.exit_code is not None else value
            return None
        from sweeplab.sweep.jobs import end_dead_job

        code = process.exitcode or 0
        killer = signal.Signals(-code).name if code < 0 else f"exit code {code}"
        reason = f"its process died ({killer}); re-run the sweep to resume it from its last checkpoint"
        log.error("job #%d (%s) stopped: %s", idx, " ".join(filter_overrides(overrides)), reason)
        end_dead_job(overrides, reason)
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=math.nan)


class _StopBeforeStart:
    """A signal handler for the moments before a job installs its own: the job does not start."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True


def _job_process(
    launcher: "ForkLauncher", idx: int, overrides: list[str], returned: Connection, threads: int
) -> None:
    """One job in a forked process, its ``JobReturn`` sent back through ``returned``. Torch gets
    its share of the cores; a signal that arrives before the job has installed its own handlers
    keeps the job from starting."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything the job starts in turn
    torch.set_num_threads(threads)
    stop = _StopBeforeStart()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        returned.send(("returned", _run_job(launcher, idx, overrides, stop)))
    except SystemExit as exit_:  # the job stopped the sweep: interrupted, or on_error=raise
        code = exit_.code if isinstance(exit_.code, int) else 1
        returned.send(("exited", code))
        raise


def _run_job(launcher: "ForkLauncher", idx: int, overrides: list[str], stop: _StopBeforeStart) -> JobReturn:
    assert launcher.hydra_context is not None and launcher.config is not None
    if stop.requested:
        log.warning("job #%d not started: the sweep was interrupted", idx)
        raise SystemExit(130)
    setup_globals()
    sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = idx
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(
        hydra_context=launcher.hydra_context,
        task_function=launcher.task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    # back to the launcher by pickle: plain nodes, since structured configs may use classes
    # made at run time (the registries' schemas) that pickle cannot look up
    ret.cfg = OmegaConf.create(OmegaConf.to_container(ret.cfg))
    return ret
