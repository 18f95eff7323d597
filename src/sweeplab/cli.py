"""The ``sweeplab`` command: a Hydra app around ``sweeplab.task.run``."""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# importing the registries stores every group's schema in Hydra's ConfigStore before composition
from sweeplab import data, models, optimizers, schedulers, schema  # noqa: F401
from sweeplab.errors import ConfigError
from sweeplab.job import Job
from sweeplab.train import DivergedError

log = logging.getLogger("sweeplab")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

# An unreachable tracking server should fail a job in seconds, not after minutes of retries;
# users who want more patience set these variables themselves.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def current_job() -> Job:
    """The Hydra runtime facts a run records (launch dir, output dir, overrides, choices)."""
    hc = HydraConfig.get()
    return Job(
        launch_dir=Path(hc.runtime.cwd),
        output_dir=Path(hc.runtime.output_dir),
        overrides=list(hc.overrides.task),
        choices={k: str(v) for k, v in hc.runtime.choices.items()},
        name=hc.job.override_dirname or "default",
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; return ``test/acc`` for sweepers that optimise the return value."""
    from sweeplab.task import run  # heavy imports (mlflow, matplotlib) only once composition worked

    try:
        return run(cfg, current_job())["test/acc"]
    except ConfigError as exc:  # the config, data or store is wrong: nothing was trained
        log.error("%s", exc)
        sys.exit(2)
    except DivergedError as exc:  # the run exists in MLflow, marked FAILED
        log.error("%s", exc)
        sys.exit(1)
