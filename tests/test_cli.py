"""The ``sweeplab`` command as users run it: one run per call, clear errors for bad input."""

import gc
import hashlib
import os
import re
import socket
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import CONF, FAST, SWEEPLAB, run_cli
from sweeplab.run.process import imports_done


def _runs(uri: str) -> list[mlflow.entities.Run]:
    """Every job's run in the store (a multirun's parent run excluded)."""
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r for r in runs if r.data.tags.get("sweeplab.sweep") != "parent"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_run_records_hydra_choices_and_files(tmp_path: Path, store: str) -> None:
    result = run_cli([*FAST, "model=logreg", "optimizer.lr=0.1"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test/acc" in result.stdout
    (logged,) = _runs(store)
    assert logged.info.status == "FINISHED"
    assert (
        logged.info.run_name == "data=synthetic,device=cpu,model=logreg,optimizer.lr=0.1,"
        "trainer.epochs=2,trainer.log_every_n_steps=2"
    )
    assert logged.data.params["choice.model"] == "logreg" and logged.data.params["choice.optimizer"] == "sgd"
    client = mlflow.MlflowClient(store)
    hydra_files = {a.path for a in client.list_artifacts(logged.info.run_id, ".hydra")}
    assert hydra_files == {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}
    assert list(tmp_path.glob("outputs/*/*/sweeplab.log"))


def _only_sweeplab_lines(result: subprocess.CompletedProcess) -> list[str]:
    """A run prints its own log lines and nothing from the libraries under it."""
    lines = result.stdout.splitlines()
    ours = [re.match(r"\[[^]]+\]\[(sweeplab|HYDRA)", line) for line in lines]
    assert result.stderr == "" and all(ours), result.stdout + result.stderr
    return lines


def test_default_store_is_sqlite_in_the_launch_dir_and_the_last_line_says_how_to_open_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_cli([*FAST, "tracking.figures=false"], cwd=tmp_path)  # a fresh store, a logged model
    assert result.returncode == 0, result.stdout + result.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (logged,) = _runs(uri)
    assert logged.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    last = _only_sweeplab_lines(result)[-1]
    acc = logged.data.metrics["val/acc"]
    assert f"run {logged.info.run_id} FINISHED: val/acc {acc:.4f}" in last
    assert f"mlflow ui --backend-store-uri {uri}" in last and f"/runs/{logged.info.run_id}" in last
    experiment = mlflow.MlflowClient(uri).get_experiment(logged.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs


def test_help_lists_every_group_option_and_where_runs_go(tmp_path: Path) -> None:
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("sweeplab: train PyTorch models")
    lines = result.stdout.splitlines()
    for group in [p for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")]:
        line = next(line for line in lines if re.match(rf"\s+\+?{group.name}\s", line))
        assert all(yaml.stem in line for yaml in group.glob("*.yaml")), (group.name, line)
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in result.stdout


def test_runs_started_together_on_a_fresh_store_all_land_in_one_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = [str(SWEEPLAB), *FAST, "trainer.epochs=1", "tracking.figures=false", "tracking.log_model=false"]
    processes = [
        subprocess.Popen(
            [*args, f"seed={seed}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for seed in range(4)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [p.returncode for p in processes] == [0] * 4, outputs
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.experiment_id for r in runs} == {client.get_experiment_by_name("sweeplab").experiment_id}


def test_multirun_gives_one_run_per_job(tmp_path: Path, store: str) -> None:
    result = run_cli(
        ["-m", *FAST, "tracking.figures=false", "tracking.log_model=false", "model=logreg,mlp"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = _runs(store)
    assert sorted(r.data.params["model.name"] for r in runs) == ["logreg", "mlp"]
    assert {r.info.experiment_id for r in runs} != {"0"} and len({r.info.experiment_id for r in runs}) == 1
    assert sorted(r.info.run_name for r in runs) == ["model=logreg", "model=mlp"]  # the rest is shared
    best = max(runs, key=lambda r: r.data.metrics["val/acc"])
    last = _only_sweeplab_lines(result)[-1]
    finished = (
        rf"sweep FINISHED: parent run \w+, 2 of 2 children finished, best model=\w+ \({best.info.run_id}\)"
    )
    assert (
        re.search(finished, last) and "summary/sweep.md" in last and "mlflow ui --backend-store-uri" in last
    )


def test_every_preset_runs_in_one_sweep(tmp_path: Path, store: str) -> None:
    result = run_cli(
        [
            "-m",
            "experiment=glob(*)",
            *FAST,
            "trainer.epochs=1",
            "tracking.figures=false",
            "tracking.log_model=false",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = _runs(store)
    assert sorted(r.data.params["choice.experiment"] for r in runs) == ["mlp_best", "seed_logreg", "seed_mlp"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["data.name"] for r in runs} == {"synthetic"}  # the command line wins


def test_diverging_run_exits_nonzero_and_is_failed(tmp_path: Path, store: str) -> None:
    result = run_cli(
        [*FAST, "optimizer.lr=1e12", "model.dropout=0", "tracking.log_model=false"], cwd=tmp_path
    )
    assert result.returncode == 1
    assert re.search(
        r"train/loss became non-finite at step \d+ \(epoch 1\): lower optimizer.lr", result.stdout
    )
    assert "Traceback" not in result.stdout + result.stderr
    (logged,) = _runs(store)
    assert logged.info.status == "FAILED"


BAD_INPUTS = [
    (["model=mlpp"], "Could not find 'model/mlpp'", "logreg"),
    (["foo=1"], "Key 'foo' not in", "+foo=1"),
    (["optimizer.lr=abc"], "full_key: optimizer.lr", "could not be converted to Float"),
    (["optimizer.lr=0"], "optimizer.lr=0.0 is invalid", "> 0"),
    (["optimizer.momentum=1.5"], "optimizer.momentum=1.5 is invalid", "[0, 1)"),
    (["model.dropout=1.0"], "model.dropout=1.0 is invalid", "[0, 1)"),
    (["model.norm=groupnorm"], "model.norm='groupnorm' is invalid", "batchnorm"),
    (["scheduler=step", "scheduler.gamma=0"], "scheduler.gamma=0.0 is invalid", "(0, 1]"),
    (["trainer.epochs=0"], "trainer.epochs=0 is invalid", ">= 1"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 is invalid", ">= 1"),
    (["data.val_size=70000"], "data.val_size=70000 is invalid", "[0, 449]"),
    (["device=tpu"], "device='tpu' is invalid", "auto, cpu, cuda, cuda:N or mps"),
    (["trainer.cuda_graph=maybe"], "trainer.cuda_graph='maybe' is invalid", "auto, true, false"),
    (["trainer.cuda_graph=true"], "trainer.cuda_graph=true needs a CUDA device, not cpu", "auto or false"),
]


@pytest.mark.parametrize(("overrides", "names", "valid"), BAD_INPUTS, ids=[b[0][0] for b in BAD_INPUTS])
def test_bad_input_exits_nonzero_with_one_clear_message(
    tmp_path: Path, store: str, overrides: list[str], names: str, valid: str
) -> None:
    result = run_cli([*FAST, *overrides], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert names in output and valid in output, output
    assert "Traceback" not in output
    assert _runs(store) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu_is_refused(tmp_path: Path, store: str) -> None:
    result = run_cli([*FAST, "device=cuda"], cwd=tmp_path)
    assert result.returncode == 2
    assert "device=cuda was requested but no CUDA GPU is available" in result.stdout
    assert "device=auto or device=cpu" in result.stdout
    assert _runs(store) == []


def test_missing_mnist_without_network_says_where_to_put_it(tmp_path: Path, store: str) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    proxy = f"http://127.0.0.1:{_closed_port()}"  # every download attempt fails at once, as offline
    result = run_cli(
        ["data=mnist", f"data.root={root}", "device=cpu"],
        cwd=tmp_path,
        env={"https_proxy": proxy, "http_proxy": proxy, "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy},
    )
    assert result.returncode == 2
    message = result.stdout
    assert f"MNIST not found in {root}/MNIST/raw and it could not be downloaded" in message
    assert (
        "train-images-idx3-ubyte" in message and "SWEEPLAB_DATA_DIR" in message and "data=digits" in message
    )
    assert list(root.iterdir()) == []  # nothing half-downloaded left behind
    assert _runs(store) == []


def test_truncated_idx_file_is_named(tmp_path: Path, store: str, tiny_mnist: Path) -> None:
    images = tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    result = run_cli(
        ["data=mnist", f"data.root={tiny_mnist}", "data.val_size=20", "device=cpu"], cwd=tmp_path
    )
    assert result.returncode == 2
    assert f"{images} is truncated or corrupt: 5000 bytes, expected 156816 for its 200x28x28 array" in (
        result.stdout
    )
    assert "Traceback" not in result.stdout + result.stderr and _runs(store) == []


def test_unreachable_tracking_server_fails_fast(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    # retries are capped (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2): MLflow's defaults would wait minutes
    result = run_cli([*FAST], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert result.returncode == 2
    assert f"Cannot use the MLflow tracking store {uri} (from MLFLOW_TRACKING_URI)" in result.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_tiny_mnist_files_train_offline(tmp_path: Path, store: str, tiny_mnist: Path) -> None:
    """The MNIST path end to end, through torchvision's reader, on IDX files the test wrote."""
    result = run_cli(
        [
            "data=mnist",
            f"data.root={tiny_mnist}",
            "data.val_size=20",
            "model=logreg",
            "device=cpu",
            "optimizer.lr=0.1",
            "trainer.epochs=3",
            "tracking.log_model=false",
        ],
        cwd=tmp_path,
        env={"SWEEPLAB_DATA_DIR": os.devnull},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (logged,) = _runs(store)
    assert logged.data.metrics["test/acc"] > 0.9
    assert logged.data.params["data.root"] == str(tiny_mnist)
    (dataset_input,) = logged.inputs.dataset_inputs  # provenance: the MD5 of the files read
    raw = sorted((tiny_mnist / "MNIST" / "raw").iterdir())
    assert dataset_input.dataset.digest == hashlib.md5(b"".join(p.read_bytes() for p in raw)).hexdigest()
    assert str(tiny_mnist / "MNIST" / "raw") in dataset_input.dataset.source


def test_the_collector_comes_back_on_only_where_a_command_turned_it_off() -> None:
    """A command imports with the collector off, then freezes the imports and collects as
    usual; sweeplab imported as a library leaves the collector alone."""
    frozen = gc.get_freeze_count()
    imports_done()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    gc.disable()
    try:
        imports_done()
        assert gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.enable()
