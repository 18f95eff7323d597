"""The whole config checked from its values alone, before any data is read, device used or store
opened, so a mistake returns about as fast as a typo in a group name.

The schemas' range checks run by turning each section into its dataclass; the registry options
(model, scheduler, optimizer) are checked by their own builders, called on stand-in inputs: a
one-feature, two-class model, no optimizer for the scheduler (its values are checked before the
scheduler is made), a one-parameter optimizer. The optimizer goes last: the first
``torch.optim`` object a process makes imports ``torch._dynamo`` (about a second), which a mistake in
another key should not wait for.
"""

import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sweeplab.config.device import resolve_device
from sweeplab.config.errors import ConfigError
from sweeplab.models import MODELS
from sweeplab.optimizers import OPTIMIZERS
from sweeplab.schedulers import SCHEDULERS

log = logging.getLogger(__name__)

SECTIONS = ("data", "trainer", "tracking", "sweep", "checkpoint")


def validate(cfg: DictConfig) -> None:
    """Raise the ``ConfigError`` that training this config would raise, without training it."""
    for section in SECTIONS:
        OmegaConf.to_object(cfg[section])
    device = resolve_device(cfg.device)
    if OmegaConf.to_object(cfg.trainer).cuda_graph == "true" and device.type != "cuda":
        raise ConfigError(f"trainer.cuda_graph=true needs a CUDA device, not {device}: use auto or false")
    _config_errors_only(MODELS.build, cfg.model, 1, 2)
    _config_errors_only(SCHEDULERS.build, cfg.scheduler, None, cfg.trainer.epochs, 1)
    OPTIMIZERS.build(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])


def _config_errors_only(build: Callable[..., Any], cfg: DictConfig, *stand_ins: Any) -> None:
    """Only the builder's own ``ConfigError``s count: one that cannot work on stand-ins (a model
    that needs 28x28 images, a scheduler without an optimizer) shows its errors when it is built
    for real."""
    try:
        build(cfg, *stand_ins)
    except ConfigError:
        raise
    except Exception as exc:
        log.debug("%s not fully checked on stand-in inputs: %s", cfg.name, exc)
