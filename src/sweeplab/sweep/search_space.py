"""Conditional Optuna search spaces for ``conf/sweep/*.yaml`` (the sweeper's ``custom_search_space``).

The Hydra Optuna sweeper's ``params`` cannot depend on one another; these functions add the
parameters that only make sense for some trials.
"""

from typing import TYPE_CHECKING

from omegaconf import DictConfig

if TYPE_CHECKING:  # optuna is an optional extra, imported by the sweeper itself
    from optuna.trial import Trial

HIDDEN_DIMS = ["[128]", "[256,100]", "[512,256]", "[1024,512]"]


def mlp_architecture(cfg: DictConfig, trial: "Trial") -> None:
    """Dropout and hidden widths, for trials that chose ``model=mlp``."""
    if trial.params.get("model", cfg.model.name) == "mlp":
        trial.suggest_float("model.dropout", 0.0, 0.5)
        trial.suggest_categorical("model.hidden_dims", HIDDEN_DIMS)


def dropout(cfg: DictConfig, trial: "Trial") -> None:
    """The dropout rate, for models that have one (a stackable key: ``conf/sweep/optuna_stacked.yaml``)."""
    if "dropout" in cfg.model:
        trial.suggest_float("model.dropout", 0.0, 0.5)
