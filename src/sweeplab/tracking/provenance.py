"""What a run was made from: the code's git state, library versions, device and data digest."""

import hashlib
import platform
import warnings
from pathlib import Path

import git
import mlflow
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

import sweeplab
from sweeplab.data import Data
from sweeplab.tracking.tags import (
    TAG_DEVICE,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_MLFLOW,
    TAG_PYTHON,
    TAG_TORCH,
    TAG_VERSION,
)


def code_state(path: Path) -> tuple[dict[str, str], str | None]:
    """Git commit and dirty flag of the repository holding ``path``, and its diff when dirty."""
    try:
        repo = git.Repo(path, search_parent_directories=True)
        commit = repo.head.commit.hexsha
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError):
        return {}, None  # not a checkout, or one without commits
    dirty = repo.is_dirty()
    tags = {TAG_GIT_COMMIT: commit, TAG_GIT_DIRTY: str(dirty).lower()}
    return tags, repo.git.diff("HEAD") if dirty else None


def environment_tags(device: torch.device) -> dict[str, str]:
    """Versions that change results, and the device the run used, by name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {
        TAG_VERSION: sweeplab.__version__,
        TAG_PYTHON: platform.python_version(),
        TAG_TORCH: torch.__version__,
        TAG_MLFLOW: mlflow.__version__,
        TAG_DEVICE: f"{device} ({name})",
    }


def md5_of_files(files: list[Path]) -> str:
    """One MD5 over the bytes of ``files`` in name order, read in 1 MiB blocks."""
    digest = hashlib.md5()
    for path in sorted(files, key=lambda p: p.name):
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def md5_of_tensors(data: Data) -> str:
    """One MD5 over every split's inputs and labels, for datasets built in memory."""
    digest = hashlib.md5()
    for split in (data.train, data.val, data.test):
        digest.update(split.x.cpu().numpy().tobytes())
        digest.update(split.y.cpu().numpy().tobytes())
    return digest.hexdigest()


def dataset_input(name: str, data: Data) -> MetaDataset:
    """An MLflow dataset input: the files read (with their MD5) or the generated arrays."""
    if data.files:
        with warnings.catch_warnings():  # MLflow registers two alike local-file sources and says so
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
            source = resolve_dataset_source(str(data.files[0].parent.resolve()))
        return MetaDataset(source, name=name, digest=md5_of_files(data.files))
    return MetaDataset(CodeDatasetSource({"builder": name}), name=name, digest=md5_of_tensors(data))
