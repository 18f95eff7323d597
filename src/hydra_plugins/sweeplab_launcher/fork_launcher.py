"""``hydra/launcher=fork``: parallel local jobs in worker processes forked from the launcher.

Hydra's joblib launcher starts fresh worker processes, and each one spends ~6 s importing torch,
torchvision, MLflow, scikit-learn and matplotlib before its first job; for sweeps of short jobs
that start-up cost eats the parallelism (2 joblib workers were slower than 1 on a 2-core
machine). This launcher imports those modules once, in the launching process, then forks the
workers, which start in milliseconds. Linux and other fork platforms only.

A worker runs its jobs one after the other like Hydra's basic launcher does, with torch limited
to (cores / workers) threads. Database connections are never shared across the fork: a pooled
connection that was opened before it is discarded and reopened in the worker (SQLAlchemy's
recipe for pools and ``os.fork``).
"""

import dataclasses
import importlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ForkLauncherConf:
    _target_: str = "hydra_plugins.sweeplab_launcher.fork_launcher.ForkLauncher"
    # parallel workers; -1 = one per CPU core
    n_jobs: int = -1
    # imported before forking, so that no worker imports them again
    preload: list[str] = dataclasses.field(
        default_factory=lambda: ["sweeplab.task", "torchvision.datasets", "sklearn.datasets"]
    )


ConfigStore.instance().store(group="hydra/launcher", name="fork", node=ForkLauncherConf, provider="sweeplab")


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


# What forked workers inherit instead of receiving it pickled: the launcher of this sweep.
_LAUNCHER: "ForkLauncher | None" = None
_LAUNCHING_PID = os.getpid()


class ForkLauncher(Launcher):
    def __init__(self, n_jobs: int = -1, preload: Sequence[str] = ()) -> None:
        self.n_jobs = n_jobs
        self.preload = list(preload)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        global _LAUNCHER, _LAUNCHING_PID
        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        cores = os.cpu_count() or 1
        workers = max(1, min(cores if self.n_jobs < 1 else self.n_jobs, len(job_overrides)))
        for module in self.preload:
            importlib.import_module(module)
        log.info("Launching %d jobs in %d forked workers", len(job_overrides), workers)
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
        _LAUNCHER, _LAUNCHING_PID = self, os.getpid()
        _watch_connections()
        jobs = [(initial_job_idx + idx, list(overrides)) for idx, overrides in enumerate(job_overrides)]
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_start_worker,
            initargs=(max(1, cores // workers),),
        )
        try:
            return list(pool.map(_run_job, *zip(*jobs, strict=True)))
        finally:  # after Ctrl-C: let running jobs checkpoint and end, start no new ones
            pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(threads: int) -> None:
    """Share the cores: N workers on N cores must not each start N torch threads. Between jobs
    a SIGINT/SIGTERM (a Ctrl-C reaches the whole process group) only marks the worker as
    stopping; during a job the task's own handlers stop it cleanly."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything the job starts in turn
    torch.set_num_threads(threads)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_taking_jobs)


_stopping = False


def _stop_taking_jobs(signum: int, frame: Any) -> None:
    global _stopping
    _stopping = True


def _run_job(idx: int, overrides: list[str]) -> JobReturn:
    """One job in a worker; none once a signal has stopped this worker's sweep (jobs already
    queued to it are not cancelled by the launcher's shutdown)."""
    global _stopping
    launcher = _LAUNCHER
    assert launcher is not None and launcher.hydra_context is not None and launcher.config is not None
    if _stopping:
        raise RuntimeError(f"job #{idx} not started: the sweep was interrupted")
    setup_globals()
    sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = idx
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    try:
        ret = run_job(
            hydra_context=launcher.hydra_context,
            task_function=launcher.task_function,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except SystemExit:  # the job was stopped by a signal (sweeplab exits 130/143)
        _stopping = True
        raise
    # back to the launcher by pickle: plain nodes, since structured configs may use classes
    # made at run time (the registries' schemas) that pickle cannot look up
    ret.cfg = OmegaConf.create(OmegaConf.to_container(ret.cfg))
    return ret
