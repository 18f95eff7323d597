"""End-to-end runs on the synthetic dataset into a throwaway sqlite store."""

import math
import sys

import mlflow
import pytest
import torch
from mlflow.utils import requirements_utils

from conftest import FAST
from sweeplab.data import load_data
from sweeplab.run.task import run
from sweeplab.tracking.store import ModelFiles
from sweeplab.training.loop import evaluate

FIGURES = {"samples", "curves", "pca_input", "pca_hidden1", "pca_hidden2", "confusion_matrix"}
EPOCH_METRICS = {
    "train/epoch_loss",
    "train/epoch_acc",
    "val/loss",
    "val/acc",
    "time/epoch_s",
    "throughput/samples_per_s",
}


def _only_run(uri: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweeplab")
    (logged,) = client.search_runs([experiment.experiment_id])
    return logged


def test_run_logs_params_metrics_figures_and_model(compose_cfg, store: str, job, monkeypatch) -> None:
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # as in a fresh process
    cfg = compose_cfg([*FAST, "optimizer.lr=0.05", "model.hidden_dims=[32,16]"])
    (job.output_dir / ".hydra").mkdir()
    (job.output_dir / ".hydra" / "overrides.yaml").write_text("- data=synthetic\n")
    results = run(cfg, job)

    logged = _only_run(store)
    client = mlflow.MlflowClient(store)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "data=synthetic"
    params = logged.data.params
    assert params["optimizer.lr"] == "0.05"
    assert params["model.hidden_dims"] == "[32, 16]"
    assert params["trainer.epochs"] == "2" and params["data.name"] == "synthetic"
    assert params["choice.data"] == "synthetic" and "choice.hydra/launcher" not in params
    assert len(logged.data.tags["sweeplab.config_hash"]) == 16
    assert logged.data.tags["sweeplab.overrides"] == "data=synthetic"

    metrics = logged.data.metrics
    assert EPOCH_METRICS | {"train/loss", "train/acc", "test/loss", "test/acc", "best/val_acc"} <= set(
        metrics
    )
    assert metrics["test/acc"] == pytest.approx(results["test/acc"])
    assert 0.0 <= metrics["test/acc"] <= 1.0 and math.isfinite(metrics["test/loss"])
    steps_per_epoch = math.ceil((450 - 90) / 64)
    val_history = client.get_metric_history(logged.info.run_id, "val/acc")
    assert [m.step for m in val_history] == [steps_per_epoch, 2 * steps_per_epoch]
    loss_history = client.get_metric_history(logged.info.run_id, "train/loss")
    assert [m.step for m in loss_history] == list(range(2, 2 * steps_per_epoch + 1, 2))

    figures = {a.path for a in client.list_artifacts(logged.info.run_id, "figures")}
    assert figures == {f"figures/{name}.png" for name in FIGURES}
    config_files = {a.path for a in client.list_artifacts(logged.info.run_id, "config")}
    assert config_files == {"config/resolved.yaml"}
    resolved = client.download_artifacts(logged.info.run_id, "config/resolved.yaml", str(job.output_dir))
    assert "lr: 0.05" in open(resolved).read()
    assert {a.path for a in client.list_artifacts(logged.info.run_id, ".hydra")} == {".hydra/overrides.yaml"}

    model = mlflow.pytorch.load_model(f"runs:/{logged.info.run_id}/model")
    data = load_data(cfg.data, torch.device("cpu"))
    assert evaluate(model, data.test, 1024).acc == pytest.approx(metrics["test/acc"], abs=0)
    (output,) = client.get_run(logged.info.run_id).outputs.model_outputs
    assert client.get_logged_model(output.model_id).status == "READY"
    if sys.platform == "linux":  # the child that wrote the model's files walked them, not the run
        assert requirements_utils._MODULES_TO_PACKAGES is None


def test_artifacts_go_beside_the_database(compose_cfg, store: str, job, tmp_path) -> None:
    run(compose_cfg([*FAST, "tracking.log_model=false"]), job)
    logged = _only_run(store)
    assert logged.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert (tmp_path / "mlartifacts" / logged.info.run_id / "artifacts" / "figures" / "curves.png").is_file()


def test_same_seed_gives_identical_metrics(compose_cfg, store: str, job) -> None:
    cfg = compose_cfg([*FAST, "seed=7", "tracking.figures=false", "tracking.log_model=false"])
    run(cfg, job)
    run(cfg, job)
    client = mlflow.MlflowClient(store)
    first, second = client.search_runs(["1"], order_by=["start_time ASC"])

    def history(run_id: str) -> dict[str, list[tuple[int, float]]]:
        keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith(("time/", "throughput/"))]
        return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}

    assert history(first.info.run_id) == history(second.info.run_id)
    other_seed = run(
        compose_cfg([*FAST, "seed=8", "tracking.figures=false", "tracking.log_model=false"]), job
    )
    assert other_seed != {k: v for k, v in first.data.metrics.items() if k in other_seed}


def test_val_size_zero_trains_on_every_training_sample(compose_cfg, store: str, job) -> None:
    results = run(
        compose_cfg([*FAST, "data.val_size=0", "tracking.figures=false", "tracking.log_model=false"]), job
    )
    logged = _only_run(store)
    assert "val/acc" not in logged.data.metrics and "best/val_acc" not in results
    assert logged.data.metrics["throughput/samples_per_s"] > 0


def test_a_model_whose_files_cannot_be_written_ends_failed_with_its_run(
    compose_cfg, store: str, job, monkeypatch
) -> None:
    def full_disk(files: ModelFiles, path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelFiles, "__call__", full_disk)  # in the writing child and here
    with pytest.raises(OSError, match="No space left"):
        run(compose_cfg([*FAST, "tracking.figures=false"]), job)
    logged = _only_run(store)
    assert logged.info.status == "FAILED" and "No space left" in logged.data.tags["sweeplab.failure"]
    client = mlflow.MlflowClient(store)
    (model,) = client.search_logged_models([logged.info.experiment_id])
    assert model.status == "FAILED"


def test_diverging_run_ends_failed(compose_cfg, store: str, job) -> None:
    with pytest.raises(RuntimeError, match="non-finite"):
        run(compose_cfg([*FAST, "optimizer.lr=1e12", "model.dropout=0"]), job)
    assert _only_run(store).info.status == "FAILED"


def test_normalize_standardises_every_split_by_the_training_split(compose_cfg) -> None:
    raw = load_data(compose_cfg(["data=synthetic"]).data, torch.device("cpu"))
    data = load_data(compose_cfg(["data=synthetic", "data.normalize=true"]).data, torch.device("cpu"))
    mean, std = raw.train.x.mean(), raw.train.x.std()
    assert float(data.train.x.mean()) == pytest.approx(0, abs=1e-6)
    assert float(data.train.x.std()) == pytest.approx(1, abs=1e-6)
    assert torch.allclose(data.test.x, (raw.test.x - mean) / std) and torch.equal(data.val.y, raw.val.y)
