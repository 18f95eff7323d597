"""Multiruns: one parent run, nested children, parallel-safe, resumable, failure-isolated."""

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.entities import RunStatus

from conftest import FAST, run_cli
from test_cli import _closed_port

QUIET = ["tracking.figures=false", "tracking.log_model=false"]
GRID = ["model=logreg,mlp", "optimizer.lr=0.1,0.03,0.01,0.003"]
JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def _sweep_runs(uri: str) -> tuple[list[mlflow.entities.Run], list[mlflow.entities.Run]]:
    """(parents newest first, children of the newest parent)."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweeplab")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if r.data.tags.get("sweeplab.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents, children


def _sweep(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    result = run_cli(["-m", *args], cwd=cwd, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The default store: an sqlite file that does not exist until the sweep creates it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_parallel_sweep_on_fresh_store_then_skip_then_rerun_missing(tmp_path: Path, fresh_store: str) -> None:
    _sweep([*JOBLIB, *GRID, *FAST, *QUIET], tmp_path)

    client = mlflow.MlflowClient(fresh_store)
    assert client.search_runs(["0"]) == []  # nothing landed in the Default experiment
    (parent,), children = _sweep_runs(fresh_store)
    assert parent.info.status == "FINISHED" and len(children) == 8
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.info.experiment_id for c in children} == {parent.info.experiment_id}
    assert sorted((c.data.params["model.name"], c.data.params["optimizer.lr"]) for c in children) == sorted(
        (m, lr) for m in ["logreg", "mlp"] for lr in ["0.1", "0.03", "0.01", "0.003"]
    )
    for child in children:
        assert "model=" in child.info.run_name and "optimizer.lr=" in child.info.run_name
        assert len(client.get_metric_history(child.info.run_id, "val/acc")) == 2  # both epochs
    assert parent.data.metrics["sweep/finished"] == 8 and parent.data.metrics["sweep/failed"] == 0
    best = max(children, key=lambda c: c.data.metrics["val/acc"])
    assert parent.data.tags["sweeplab.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best/val/acc"] == best.data.metrics["val/acc"]
    summary = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert summary == {
        "summary/sweep.csv",
        "summary/sweep.md",
        "summary/objective_vs_model.png",
        "summary/objective_vs_optimizer.lr.png",
        "summary/parallel_coordinates.png",
    }
    table = client.download_artifacts(parent.info.run_id, "summary/sweep.csv", str(tmp_path))
    lines = Path(table).read_text().splitlines()
    assert lines[0].startswith("run_id,run_name,status,origin,config_hash,model,optimizer.lr,val/acc")
    assert lines[1].startswith(best.info.run_id) and len(lines) == 9

    # the same command again: every job is already FINISHED
    result = _sweep([*JOBLIB, *GRID, *FAST, *QUIET], tmp_path)
    assert result.stdout.count("skipped: run") == 8
    parents, children = _sweep_runs(fresh_store)
    assert len(parents) == 2 and children == []
    assert (
        parents[0].data.metrics["sweep/reused"] == 8
        and parents[0].data.tags["sweeplab.best_run_id"] == best.info.run_id
    )

    # lose one result, fail another: only those two run again
    deleted, failed = [c for c in _sweep_runs_children_of(client, parent)][:2]
    client.delete_run(deleted.info.run_id)
    client.set_terminated(failed.info.run_id, RunStatus.to_string(RunStatus.FAILED))
    result = _sweep([*JOBLIB, *GRID, *FAST, *QUIET], tmp_path)
    assert result.stdout.count("skipped: run") == 6
    parents, children = _sweep_runs(fresh_store)
    assert sorted(c.info.run_name for c in children) == sorted([deleted.info.run_name, failed.info.run_name])
    assert parents[0].data.metrics["sweep/children"] == 8


def test_fork_launcher_on_fresh_store(tmp_path: Path, fresh_store: str) -> None:
    """Workers forked after the launcher opened the store: each opens its own connection."""
    result = _sweep(["hydra/launcher=fork", "hydra.launcher.n_jobs=2", *GRID, *FAST, *QUIET], tmp_path)
    assert "Launching 8 jobs in 2 forked workers" in result.stdout
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"({threads} threads)" in result.stdout  # 2 workers share the cores
    client = mlflow.MlflowClient(fresh_store)
    assert client.search_runs(["0"]) == []
    (parent,), children = _sweep_runs(fresh_store)
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/finished"] == 8
    assert len(children) == 8 and {c.info.status for c in children} == {"FINISHED"}
    assert {len(c.inputs.dataset_inputs) for c in children} == {1}
    assert len({c.data.tags["sweeplab.config_hash"] for c in children}) == 8


def _sweep_runs_children_of(
    client: mlflow.MlflowClient, parent: mlflow.entities.Run
) -> list[mlflow.entities.Run]:
    return client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def test_diverging_job_fails_alone(tmp_path: Path, store: str) -> None:
    _sweep(["optimizer.lr=0.05,1e6", "model.dropout=0", *FAST, *QUIET], tmp_path)
    (parent,), children = _sweep_runs(store)
    status = {c.data.params["optimizer.lr"]: c.info.status for c in children}
    assert status == {"0.05": "FINISHED", "1000000.0": "FAILED"}
    failed = next(c for c in children if c.info.status == "FAILED")
    assert re.match(r"DivergedError: train/loss became non-finite", failed.data.tags["sweeplab.failure"])
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["sweep/finished"], parent.data.metrics["sweep/failed"]) == (1, 1)


def test_fail_fast_stops_the_sweep_and_fails_the_parent(tmp_path: Path, store: str) -> None:
    result = run_cli(
        ["-m", "optimizer.lr=1e6,0.05", "model.dropout=0", "sweep.on_error=raise", *FAST, *QUIET],
        cwd=tmp_path,
    )
    assert result.returncode != 0
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweeplab.sweep") == "parent"]
    assert parent.info.status == "FAILED" and "DivergedError" in parent.data.tags["sweeplab.failure"]
    assert [r.info.status for r in runs if r is not parent] == ["FAILED"]  # the second job never ran


def test_optuna_sweep_records_the_best_trial(tmp_path: Path, store: str) -> None:
    result = _sweep(["+sweep=optuna", "hydra.sweeper.n_trials=6", *FAST, *QUIET], tmp_path)
    best_value = float(re.search(r"Best value: ([0-9.]+)", result.stdout).group(1))
    (parent,), children = _sweep_runs(store)
    assert len(children) == 6 and {c.info.status for c in children} == {"FINISHED"}
    assert parent.data.metrics["best/val/acc"] == pytest.approx(best_value)
    best = next(c for c in children if c.info.run_id == parent.data.tags["sweeplab.best_run_id"])
    assert best.data.metrics["val/acc"] == pytest.approx(best_value)
    assert all(c.data.params["choice.sweep"] == "optuna" for c in children)
    for child in children:  # dropout and widths are searched only for MLP trials
        assert ("model.dropout=" in child.info.run_name) == (child.data.params["model.name"] == "mlp")
        # names: what the trial chose, floats to 4 significant digits; what all trials share is not
        assert "+sweep" not in child.info.run_name and "data=" not in child.info.run_name
        lr = re.search(r"optimizer.lr=([^,]+)", child.info.run_name).group(1)
        assert (
            lr == f"{float(child.data.params['optimizer.lr']):.4g}"
            and len(child.data.params["optimizer.lr"]) > 6
        )

    # the study lives in memory: the same seed re-suggests the same trials, answered from MLflow
    rerun = _sweep(["+sweep=optuna", "hydra.sweeper.n_trials=6", *FAST, *QUIET], tmp_path)
    assert rerun.stdout.count("skipped: run") == 6
    assert float(re.search(r"Best value: ([0-9.]+)", rerun.stdout).group(1)) == best_value


def test_submitit_local_launcher(tmp_path: Path, store: str) -> None:
    _sweep(["hydra/launcher=submitit_local", "model=logreg,mlp", *FAST, *QUIET], tmp_path)
    (parent,), children = _sweep_runs(store)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}


def test_sweep_against_a_tracking_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        _sweep(
            [*JOBLIB, "model=logreg,mlp", "optimizer.lr=0.1,0.01", *FAST, "tracking.log_model=false"],
            tmp_path,
        )
        (parent,), children = _sweep_runs(uri)
        assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
        assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/finished"] == 4
        client = mlflow.MlflowClient(uri)
        assert {a.path for a in client.list_artifacts(children[0].info.run_id, "figures")} >= {
            "figures/curves.png"
        }
        # skip-completed asks the server, not local folders
        result = _sweep(
            [*JOBLIB, "model=logreg,mlp", "optimizer.lr=0.1,0.01", *FAST, "tracking.log_model=false"],
            tmp_path,
        )
        assert result.stdout.count("skipped: run") == 4
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_killed_run_whose_config_finished_later_is_not_left_to_resume() -> None:
    """A job killed before its first checkpoint trains again in a new run: the old KILLED run
    no longer keeps the sweep's parent KILLED."""
    from sweeplab.sweep.summary import unfinished_killed

    table = pd.DataFrame(
        {"status": ["KILLED", "FINISHED", "KILLED", "FAILED"], "config_hash": ["a", "a", "b", "c"]}
    )
    assert unfinished_killed(table) == 1
