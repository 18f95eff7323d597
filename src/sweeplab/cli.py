"""The ``sweeplab`` command: a Hydra app around ``sweeplab.task.run``."""

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

# importing the registries stores every group's schema in Hydra's ConfigStore before composition
from sweeplab import CONFIG_DIR, data, models, optimizers, schedulers, schema  # noqa: F401
from sweeplab.errors import ConfigError
from sweeplab.interrupt import Interrupted, SignalGuard
from sweeplab.job import ENV_PARENT_RUN, ENV_URI, Job
from sweeplab.train import DivergedError

log = logging.getLogger("sweeplab")

# An unreachable tracking server should fail a job in seconds, not after minutes of retries;
# users who want more patience set these variables themselves.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def current_job() -> Job:
    """The Hydra runtime facts a run records (launch dir, output dir, overrides, choices)."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return Job(
        launch_dir=Path(hc.runtime.cwd),
        output_dir=Path(hc.runtime.output_dir),
        overrides=list(hc.overrides.task),
        choices={k: str(v) for k, v in hc.runtime.choices.items()},
        name=hc.job.override_dirname or "default",
        multirun=multirun,
        parent_run_id=os.environ.get(ENV_PARENT_RUN) if multirun else None,
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; return ``sweep.objective`` (``val/acc``) for sweepers that optimise it.

    Inside a sweep with ``sweep.on_error=continue`` a failing job logs its error and returns
    NaN, which Optuna records as a failed trial, and the sweep goes on.
    """
    from sweeplab.task import run  # heavy imports (mlflow, matplotlib) only once composition worked

    job = current_job()
    keep_going = job.multirun and cfg.sweep.on_error == "continue"
    try:
        with SignalGuard().installed() as guard:  # from here a signal ends the job cleanly
            results = run(cfg, job, guard)
    except Interrupted as stop:  # the run is KILLED and checkpointed; the sweep stops with it
        if job.parent_run_id:
            from sweeplab.sweep import end_parent

            end_parent(os.environ[ENV_URI], job.parent_run_id, "KILLED", f"a job was {stop}")
        log.error("%s", stop)
        sys.exit(stop.exit_code)
    except Exception as exc:
        user_error = isinstance(exc, (ConfigError, DivergedError))
        if keep_going:
            log.error("job failed, the sweep goes on: %s", exc if user_error else repr(exc))
            return math.nan
        if job.parent_run_id:
            from sweeplab.sweep import end_parent

            end_parent(os.environ[ENV_URI], job.parent_run_id, "FAILED", f"{type(exc).__name__}: {exc}")
        if not user_error:
            raise
        log.error("%s", exc)  # a config, data or store problem (exit 2) or a diverged run (exit 1)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    if cfg.sweep.objective not in results:
        log.warning("sweep.objective=%s was not logged (logged: %s)", cfg.sweep.objective, sorted(results))
    return results.get(cfg.sweep.objective, math.nan)
