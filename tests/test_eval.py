"""``sweeplab-eval``: a trained run's model evaluated again, logged to a linked run."""

import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from conftest import SWEEPLAB, run_cli

EVAL = SWEEPLAB.with_name("sweeplab-eval")
TRAIN = ["data=synthetic", "trainer.epochs=3", "device=cpu", "tracking.figures=false"]


def _eval(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(EVAL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def trained(tmp_path: Path, store: str) -> mlflow.entities.Run:
    result = run_cli(TRAIN, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
    return run


def _eval_run(uri: str, evaluated: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("sweeplab").experiment_id],
        filter_string=f"tags.`sweeplab.evaluated_run` = '{evaluated}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return run


def test_eval_reproduces_test_acc_and_logs_figures(tmp_path: Path, store: str, trained) -> None:
    result = _eval([f"run_id={trained.info.run_id}"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"test/acc  {trained.data.metrics['test/acc']:.4f}" in result.stdout
    assert "per-class accuracy:" in result.stdout

    logged = _eval_run(store, trained.info.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == f"eval test: {trained.info.run_name}"
    metrics = logged.data.metrics
    assert metrics["test/acc"] == trained.data.metrics["test/acc"]  # exactly: same data, model, batches
    assert metrics["test/loss"] == pytest.approx(trained.data.metrics["test/loss"], rel=1e-6)
    assert {f"test/class_acc/{c}" for c in "012"} <= set(metrics)
    assert logged.data.params["data.name"] == "synthetic" and logged.data.params["split"] == "test"
    client = mlflow.MlflowClient(store)
    names = {Path(a.path).stem for a in client.list_artifacts(logged.info.run_id, "figures")}
    assert names == {"confusion_matrix", "pca_input", "pca_hidden1", "pca_hidden2"}

    # from another directory, the store given by tracking.uri alone: the model comes from that store
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [f"tracking.uri={store}", f"run_id={trained.info.run_id}", "split=val", "figures=false"]
    val = _eval(args, elsewhere, env)
    assert val.returncode == 0, val.stdout[-3000:] + val.stderr[-3000:]
    assert _eval_run(store, trained.info.run_id).data.metrics["val/acc"] == trained.data.metrics["val/acc"]
    assert not (elsewhere / "mlflow.db").exists()


def test_eval_of_a_checkpoint_matches_the_run_it_ends(tmp_path: Path, store: str, trained) -> None:
    folder = Path(trained.data.tags["sweeplab.checkpoint_dir"])
    (last,) = folder.glob("epoch3-step*.pt")
    result = _eval([f"checkpoint={last}", "figures=false"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = _eval_run(store, trained.info.run_id)
    assert logged.data.tags["sweeplab.evaluated_from"] == str(last)
    assert logged.data.metrics["test/acc"] == trained.data.metrics["test/acc"]

    other = _eval([f"run_id={trained.info.run_id}", "data=digits", "figures=false"], tmp_path)
    assert other.returncode == 2
    assert "data=digits (64 input features, 10 classes) does not fit the evaluated model" in other.stdout


def test_eval_errors_name_the_key(tmp_path: Path, store: str) -> None:
    neither = _eval([], tmp_path)
    assert neither.returncode == 2 and "run_id/checkpoint" in neither.stdout
    unknown = _eval(["run_id=0123456789abcdef"], tmp_path)
    assert unknown.returncode == 2 and "run_id=0123456789abcdef: no such MLflow run" in unknown.stdout
    split = _eval(["run_id=x", "split=holdout"], tmp_path)
    assert split.returncode == 2 and "split='holdout' is invalid: expected train, val or test" in split.stdout

    unlogged = run_cli([*TRAIN, "tracking.log_model=false"], cwd=tmp_path)
    assert unlogged.returncode == 0, unlogged.stderr[-3000:]
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
    no_model = _eval([f"run_id={run.info.run_id}"], tmp_path)
    assert no_model.returncode == 2 and "has no logged model" in no_model.stdout
