"""Shared fixtures: composed configs, a fresh MLflow sqlite store per test, tiny MNIST files."""

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

# importing the registries stores every group's schema in Hydra's ConfigStore, as the CLI does
from sweeplab import CONFIG_MODULE, data, models, optimizers, schedulers  # noqa: F401
from sweeplab.config.job import Job
from sweeplab.data import Data, load_data
from sweeplab.run.seeding import seed_everything
from sweeplab.training.loop import steps_per_epoch
from sweeplab.training.state import Progress, TrainingState

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SWEEPLAB = Path(sys.executable).with_name("sweeplab")
DATA_ENV = "SWEEPLAB_DATA_DIR"

# a small, fast run on the synthetic dataset; tests add what they exercise
FAST = ["data=synthetic", "trainer.epochs=2", "trainer.log_every_n_steps=2", "device=cpu"]


def real_mnist_root() -> Path | None:
    root = os.environ.get(DATA_ENV)
    if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return Path(root)
    return None


@pytest.fixture
def compose_cfg() -> Iterator[Callable[[list[str]], DictConfig]]:
    """Compose the project's config like the CLI does; Hydra's global state is cleared after."""
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        yield lambda overrides: compose("config", overrides=overrides)
    GlobalHydra.instance().clear()


def training_state(
    cfg: DictConfig, device: str = "cpu", loaded: Data | None = None
) -> tuple[TrainingState, Data]:
    """What ``sweeplab.run.phases.build`` makes for ``cfg`` (on ``loaded`` data, if given), without a
    run around it."""
    generator = seed_everything(cfg.seed)
    loaded = loaded or load_data(cfg.data, torch.device(device))
    trainer = OmegaConf.to_object(cfg.trainer)
    model = models.MODELS.build(cfg.model, loaded.in_features, len(loaded.classes)).to(device)
    optimizer = optimizers.OPTIMIZERS.build(cfg.optimizer, model.parameters())
    per_epoch = steps_per_epoch(len(loaded.train), trainer)
    scheduler = schedulers.SCHEDULERS.build(cfg.scheduler, optimizer, per_epoch * trainer.epochs, per_epoch)
    progress = Progress.start(per_epoch * trainer.epochs, torch.device(device))
    return TrainingState(model, optimizer, scheduler, generator, progress), loaded


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def host_never_waits() -> Iterator[None]:
    """Inside the block, whatever makes the host wait for the GPU (a blocking copy from host
    memory, a device tensor read as a number) raises instead."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sqlite store migrated once per session; creating one costs seconds, copying it does not."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, migrated_store: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite tracking URI for this test, also exported to subprocesses."""
    db = tmp_path / "mlflow.db"
    shutil.copy(migrated_store, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def job(tmp_path: Path) -> Job:
    out = tmp_path / "outputs"
    out.mkdir()
    return Job(
        launch_dir=tmp_path,
        output_dir=out,
        overrides=["data=synthetic"],
        choices={"data": "synthetic", "hydra/launcher": "basic"},
    )


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the installed ``sweeplab`` command the way a user would."""
    return subprocess.run(
        [str(SWEEPLAB), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format MNIST ships in."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    """A data root with MNIST-format files of 200 train / 50 test images of three easy classes."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in [("train", 200), ("t10k", 50)]:
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(labels):  # a bright bar whose row depends on the class
            images[i, 5 + 8 * label : 9 + 8 * label, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path / "data"


def start_cli(
    args: list[str], cwd: Path, until: str, count: int = 1, **popen
) -> tuple[subprocess.Popen, str]:
    """Start the CLI and return once ``until`` has appeared ``count`` times in its log."""
    process = subprocess.Popen(
        [str(SWEEPLAB), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if sum(until in s for s in seen) >= count:
            return process, "".join(seen)
    process.wait()
    pytest.fail(f"the run ended before {until!r} was logged:\n" + "".join(seen)[-3000:])
