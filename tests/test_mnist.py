"""The presets on real MNIST reach the accuracy the notebook promises (and better)."""

from pathlib import Path

import mlflow
import pytest
import torch

from conftest import real_mnist_root, run_cli

pytestmark = [
    pytest.mark.mnist,
    pytest.mark.skipif(real_mnist_root() is None, reason="no MNIST under $SWEEPLAB_DATA_DIR"),
]

FIGURES = {"samples", "curves", "pca_input", "confusion_matrix"}


@pytest.mark.parametrize(
    ("preset", "min_acc", "hidden_layers"),
    [("seed_logreg", 0.90, 0), ("seed_mlp", 0.975, 2), ("mlp_best", 0.985, 2)],
)
def test_preset_accuracy_and_figures(
    tmp_path: Path, store: str, preset: str, min_acc: float, hidden_layers: int
) -> None:
    result = run_cli([f"experiment={preset}", "device=cpu"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    client = mlflow.MlflowClient(store)
    (logged,) = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
    assert logged.data.metrics["test/acc"] >= min_acc
    assert logged.data.params["data.root"] == str(real_mnist_root())
    figures = {Path(a.path).stem for a in client.list_artifacts(logged.info.run_id, "figures")}
    assert figures == FIGURES | {f"pca_hidden{i}" for i in range(1, hidden_layers + 1)}


def test_normalized_inputs_and_batchnorm_match_a_lightning_style_mlp_in_one_epoch(
    tmp_path: Path, store: str
) -> None:
    """784-64-128-64-10 with BatchNorm, standardised inputs, Adam, batch 128: >= 0.96 after one
    epoch with the group's dropout 0.25 (0.949 when every hidden layer dropped out before the next
    BatchNorm), where unnormalised inputs stay near 0.93."""
    args = ["model=mlp", "model.hidden_dims=[64,128,64]", "model.norm=batchnorm", "data.normalize=true"]
    args += [
        "optimizer=adam",
        "optimizer.lr=0.001",
        "trainer.batch_size=128",
        "trainer.epochs=1",
        "device=cpu",
    ]
    result = run_cli([*args, "tracking.figures=false"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    client = mlflow.MlflowClient(store)
    (logged,) = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
    assert logged.data.metrics["test/acc"] >= 0.96
    model = mlflow.pytorch.load_model(f"runs:/{logged.info.run_id}/model")
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == 3
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.0, 0.0, 0.25]


def test_stacked_mlp_members_with_dropout_match_solo_runs(tmp_path: Path) -> None:
    """A 4-member stack of the notebook's MLP (dropout 0.25: each member draws its own masks)
    ends within 0.01 test accuracy of solo runs of the same overrides."""
    grid = ["experiment=seed_mlp", "optimizer.lr=0.01,0.02", "seed=0,1", "trainer.epochs=1", "device=cpu"]
    accuracy = {}
    for name, launcher in [("stacked", ["hydra/launcher=stacked"]), ("solo", ["hydra/launcher=fork"])]:
        folder = tmp_path / name
        folder.mkdir()
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        quiet = [] if name == "stacked" else ["tracking.figures=false", "tracking.log_model=false"]
        result = run_cli(
            ["-m", *launcher, *grid, *quiet], cwd=folder, env={"MLFLOW_TRACKING_URI": uri}, timeout=900
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
        accuracy[name] = {
            (r.data.params["optimizer.lr"], r.data.params["seed"]): r.data.metrics["test/acc"]
            for r in runs
            if "mlflow.parentRunId" in r.data.tags
        }
    assert len(accuracy["stacked"]) == 4 and accuracy["stacked"].keys() == accuracy["solo"].keys()
    for key, acc in accuracy["stacked"].items():
        assert acc == pytest.approx(accuracy["solo"][key], abs=0.01), key


def test_mnist_is_read_as_torchvision_reads_it(compose_cfg) -> None:
    """sweeplab reads the IDX files itself (torchvision only downloads): the same pixels,
    labels and class names as torchvision's MNIST."""
    from torchvision.datasets import MNIST

    from sweeplab.data import DATASETS

    source = DATASETS.build(compose_cfg(["data=mnist", f"data.root={real_mnist_root()}"]).data)
    for split, train in ((source.train, True), (source.test, False)):
        reference = MNIST(root=str(real_mnist_root()), train=train)
        assert torch.equal(split.x, reference.data.reshape(len(reference.data), -1).float() / 255)
        assert torch.equal(split.y, reference.targets)
    assert source.classes == reference.classes
