"""Adding a model is one decorated class plus one YAML file."""

from pathlib import Path

import mlflow
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from conftest import FAST
from sweeplab import CONFIG_MODULE
from sweeplab.config.errors import ConfigError
from sweeplab.models import MODELS
from sweeplab.run.task import run


@MODELS.register("test_wide_logreg")
class WideLogReg(nn.Module):
    """A test-only model: one hidden layer of configurable width, no activation."""

    def __init__(self, in_features: int, n_classes: int, *, width: int = 4) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, width)
        self.output = nn.Linear(width, n_classes)
        self.representation_layers = ("hidden",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(x))


def _compose(tmp_path: Path, yaml: str, overrides: list[str]):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "wide.yaml").write_text(yaml)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            return compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", *overrides])
    finally:
        GlobalHydra.instance().clear()


YAML = "defaults:\n  - /schema/model/test_wide_logreg@_here_\n  - _self_\n\nwidth: 7\n"


def test_new_model_trains_from_its_yaml(tmp_path: Path, store: str, job) -> None:
    cfg = _compose(tmp_path, YAML, ["model=wide", *FAST])
    assert cfg.model.width == 7
    run(cfg, job)
    (logged,) = mlflow.MlflowClient(store).search_runs(["1"])
    assert logged.data.params["model.width"] == "7"
    assert logged.data.params["model.name"] == "test_wide_logreg"
    paths = {a.path for a in mlflow.MlflowClient(store).list_artifacts(logged.info.run_id, "figures")}
    assert "figures/pca_hidden.png" in paths


def test_new_models_schema_rejects_typos(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="widht"):
        _compose(tmp_path, YAML.replace("width: 7", "widht: 7"), ["model=wide"])


def test_unregistered_name_lists_registered_ones(compose_cfg) -> None:
    cfg = compose_cfg([])
    cfg.model.name = "resnet"
    with pytest.raises(
        ConfigError, match=r"model.name='resnet' is not registered: expected one of \[.*'mlp'"
    ):
        MODELS.build(cfg.model, 4, 2)


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        MODELS.register("mlp")(WideLogReg)
