"""The ``sweeplab`` command: a Hydra app around ``sweeplab.run.task.run``."""

import gc
import logging
import math
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

# importing the registries stores every group's schema in Hydra's ConfigStore before composition
from sweeplab import CONFIG_PATH, data, models, optimizers, schedulers  # noqa: F401
from sweeplab.config import schema  # noqa: F401
from sweeplab.config.errors import ConfigError
from sweeplab.config.job import current_job
from sweeplab.config.validation import validate
from sweeplab.run.process import apply_env_defaults, imports_done
from sweeplab.sweep.jobs import job_outcome  # light: it imports MLflow only where a sweep needs it
from sweeplab.training.interrupt import Interrupted, SignalGuard
from sweeplab.training.loop import DivergedError

log = logging.getLogger("sweeplab")

apply_env_defaults()


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
            from sweeplab.run.task import run

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
    (seconds after the run's last line). Once the app is done none of them is garbage, so
    they are frozen out of the collector's sight; shutdown otherwise runs as usual (threads
    joined, exit handlers run, files flushed).
    """
    try:
        main()
    finally:
        gc.freeze()
