"""The ``sweeplab-eval`` command: a Hydra app around ``sweeplab.run.eval_task.run_eval``."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# importing the registries stores every group's schema in Hydra's ConfigStore before composition
from sweeplab import CONFIG_PATH, data, models  # noqa: F401
from sweeplab.config import schema  # noqa: F401
from sweeplab.config.errors import ConfigError
from sweeplab.run.process import apply_env_defaults

log = logging.getLogger("sweeplab")

apply_env_defaults()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> float:
    """Evaluate one trained model; return its accuracy on the chosen split."""
    from sweeplab.run.eval_task import run_eval  # heavy imports only once composition worked

    try:
        metrics = run_eval(cfg, Path(HydraConfig.get().runtime.cwd))
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)
    return metrics[f"{cfg.split}/acc"]
