"""Every YAML composes against its schema; typos and wrong types fail at composition."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from conftest import CONF
from sweeplab.config.schema import TrackingConfig, TrainerConfig
from sweeplab.data import DATASETS
from sweeplab.models import MODELS
from sweeplab.optimizers import OPTIMIZERS
from sweeplab.schedulers import SCHEDULERS

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
ADDED = {"sweep"}  # groups without a default option are added with +group=option
OPTIONS = [(group, yaml.stem) for group in GROUPS for yaml in sorted((CONF / group).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(compose_cfg, group: str, option: str) -> None:
    cfg = compose_cfg([f"{'+' if group in ADDED else ''}{group}={option}"])
    assert isinstance(OmegaConf.to_object(cfg.trainer), TrainerConfig)
    assert isinstance(OmegaConf.to_object(cfg.tracking), TrackingConfig)
    registries = {"data": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}
    for name, registry in registries.items():
        assert cfg[name].name in registry.names
    if group in registries:
        assert cfg[group].name == option


def test_launcher_presets_compose(compose_cfg) -> None:
    from hydra import compose

    cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.cpus_per_task == 4
    cfg = compose("config", overrides=["hydra/launcher=joblib"], return_hydra_config=True)
    assert "joblib" in cfg.hydra.launcher._target_


def test_sweep_callback_is_on_by_default(compose_cfg) -> None:
    from hydra import compose

    cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.callbacks.mlflow_sweep._target_ == "sweeplab.sweep.callback.MlflowSweepCallback"


def test_every_yaml_names_its_schema() -> None:
    """A YAML without its schema would accept typos silently."""
    for group in ["data", "model", "optimizer", "scheduler"]:
        for yaml in (CONF / group).glob("*.yaml"):
            assert f"/schema/{group}/{yaml.stem}@_here_" in yaml.read_text(), yaml


def test_default_config_is_the_notebook_mlp(compose_cfg) -> None:
    cfg = compose_cfg([])
    assert cfg.model.hidden_dims == [256, 100] and cfg.model.dropout == 0.25
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.01, 0.9)
    assert cfg.trainer.batch_size == 64 and cfg.data.name == "mnist"


@pytest.mark.parametrize(
    ("override", "error", "names"),
    [
        ("model.dropoutt=0.1", ConfigAttributeError, "dropoutt"),
        ("optimizer.lr=abc", ValidationError, "optimizer.lr"),
        ("trainer.epochs=many", ValidationError, "trainer.epochs"),
        ("foo=1", ConfigAttributeError, "foo"),
    ],
)
def test_typos_and_wrong_types_fail_at_composition(
    compose_cfg, override: str, error: type, names: str
) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg([override])
    assert isinstance(info.value.__cause__, error)
    assert names in str(info.value.__cause__)


def test_unknown_option_lists_the_valid_ones(compose_cfg) -> None:
    with pytest.raises(Exception, match="Could not find 'model/mlpp'") as info:
        compose_cfg(["model=mlpp"])
    assert "logreg" in str(info.value) and "mlp" in str(info.value)


def test_preset_values(compose_cfg) -> None:
    logreg = compose_cfg(["experiment=seed_logreg"])
    assert (logreg.model.name, logreg.trainer.epochs, logreg.optimizer.lr) == ("logreg", 1, 0.01)
    best = compose_cfg(["experiment=mlp_best"])
    assert (best.scheduler.name, best.optimizer.nesterov) == ("onecycle", True)
