"""Runs record the code, versions, device and data they were made from."""

import hashlib
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException

from conftest import FAST
from sweeplab.run.task import run
from sweeplab.tracking.provenance import code_state, environment_tags, md5_of_files


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_code_state_of_clean_dirty_and_missing_checkouts(tmp_path: Path) -> None:
    assert code_state(tmp_path) == ({}, None)
    _git(tmp_path, "init", "-q")
    assert code_state(tmp_path) == ({}, None)  # no commit yet
    (tmp_path / "model.py").write_text("width = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    tags, diff = code_state(tmp_path / "model.py")
    assert (
        tags["sweeplab.git_dirty"] == "false" and len(tags["mlflow.source.git.commit"]) == 40 and diff is None
    )
    (tmp_path / "model.py").write_text("width = 2\n")
    tags, diff = code_state(tmp_path)
    assert tags["sweeplab.git_dirty"] == "true" and "-width = 1" in diff and "+width = 2" in diff


def test_md5_of_files_is_the_md5_of_their_bytes_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"second")
    (tmp_path / "a").write_bytes(b"first" * 300_000)
    expected = hashlib.md5(b"first" * 300_000 + b"second").hexdigest()
    assert md5_of_files([tmp_path / "b", tmp_path / "a"]) == expected


def test_environment_tags_name_versions_and_device() -> None:
    tags = environment_tags(torch.device("cpu"))
    assert tags["sweeplab.torch"] == torch.__version__ and tags["sweeplab.mlflow"] == mlflow.__version__
    assert tags["sweeplab.device"].startswith("cpu (")


def test_run_logs_provenance_and_a_dataset_input(compose_cfg, store: str, job) -> None:
    run(compose_cfg([*FAST, "tracking.figures=false", "tracking.log_model=false"]), job)
    client = mlflow.MlflowClient(store)
    (logged,) = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
    assert {"sweeplab.python", "sweeplab.torch", "sweeplab.mlflow", "sweeplab.device"} <= set(
        logged.data.tags
    )
    (dataset_input,) = logged.inputs.dataset_inputs
    assert dataset_input.dataset.name == "synthetic" and len(dataset_input.dataset.digest) == 32
    if logged.data.tags.get("sweeplab.git_dirty") == "true":
        assert "code/diff.patch" in {a.path for a in client.list_artifacts(logged.info.run_id, "code")}


def test_dataset_input_survives_a_parallel_job_inserting_it_first(
    compose_cfg, store: str, job, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_inputs = mlflow.MlflowClient.log_inputs
    calls = []

    def lose_the_race(client, run_id, datasets=None, models=None):  # what a job losing the race sees
        calls.append(datasets[0].dataset.digest)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
        log_inputs(client, run_id, datasets=datasets, models=models)

    monkeypatch.setattr(mlflow.MlflowClient, "log_inputs", lose_the_race)
    run(compose_cfg([*FAST, "tracking.figures=false", "tracking.log_model=false"]), job)
    client = mlflow.MlflowClient(store)
    (logged,) = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
    assert logged.info.status == "FINISHED" and len(calls) == 2
    (dataset_input,) = logged.inputs.dataset_inputs
    assert dataset_input.dataset.digest == calls[0]
