"""The ``sweeplab`` command: a Hydra app around ``sweeplab.task.run``."""

import gc
import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# importing the registries stores every group's schema in Hydra's ConfigStore before composition
from sweeplab import CONFIG_PATH, data, models, optimizers, schedulers, schema  # noqa: F401
from sweeplab.commands import imports_done
from sweeplab.environment import apply_defaults
from sweeplab.errors import ConfigError
from sweeplab.interrupt import Interrupted, SignalGuard
from sweeplab.job import ENV_PARENT_RUN, Job
from sweeplab.sweep import job_outcome  # light: it imports MLflow only where a sweep needs it
from sweeplab.train import DivergedError
from sweeplab.validation import validate

log = logging.getLogger("sweeplab")

apply_defaults()


def current_job() -> Job:
    """The Hydra runtime facts a run records (launch dir, output dir, overrides, choices)."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return Job(
        launch_dir=Path(hc.runtime.cwd),
        output_dir=Path(hc.runtime.output_dir),
        overrides=list(hc.overrides.task),
        choices={k: str(v) for k, v in hc.runtime.choices.items()},
        multirun=multirun,
        parent_run_id=os.environ.get(ENV_PARENT_RUN) if multirun else None,
    )


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; return ``sweep.objective`` (``val/acc``) for sweepers that optimise it.

    Exit codes: 2 for a config, data or store problem, 1 for a diverged run, 128 + the signal
    for an interrupted one. A sweep job that fails under ``sweep.on_error=continue`` returns
    NaN, which Optuna records as a failed trial.
    """
    job = current_job()
    results: dict[str, float] = {}
    try:
        with SignalGuard().installed() as guard, job_outcome(job, OmegaConf.to_object(cfg.sweep)):
            validate(cfg)  # every config error before the heavy imports of the task
            from sweeplab.task import run

            imports_done()  # torch._dynamo (validation built an optimizer) and MLflow: imported
            results = run(cfg, job, guard)
    except Interrupted as stop:  # the run is KILLED and checkpointed
        log.error("%s", stop)
        sys.exit(stop.exit_code)
    except (ConfigError, DivergedError) as exc:
        log.error("%s", exc)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    if results and cfg.sweep.objective not in results:
        log.warning("sweep.objective=%s was not logged (logged: %s)", cfg.sweep.objective, sorted(results))
    return results.get(cfg.sweep.objective, math.nan)


def command() -> None:
    """The ``sweeplab`` command: the Hydra app, then a quick exit.

    At exit the interpreter's garbage collector walks every object torch, MLflow & co. made
    (1-2 s here after the run's last line). Once the app is done none of them is garbage, so
    they are frozen out of the collector's sight; shutdown otherwise runs as usual (threads
    joined, exit handlers run, files flushed).
    """
    try:
        main()
    finally:
        gc.freeze()
