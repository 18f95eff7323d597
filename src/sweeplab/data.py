"""Dataset registry and the device-resident splits the training loop slices batches from.

Builders return whole train/test arrays; ``load_data`` carves a fixed validation split from the
training set and moves every split to the device once, as float tensors, so an epoch is a
``randperm`` and slicing, never a per-sample ``Dataset.__getitem__``. Builders import their
libraries (torchvision, scikit-learn) themselves: importing both costs the CLI seconds of
start-up, which a config error or a synthetic-data run should not pay.
"""

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from sweeplab.config.errors import ConfigError, require
from sweeplab.config.registry import NamedConfig, Registry


@dataclasses.dataclass
class DataConfig(NamedConfig):
    """Keys every dataset has: how the validation split is carved from the training set."""

    val_size: int = 5000
    split_seed: int = 0
    # standardise inputs with the mean and standard deviation of the training split (all splits)
    normalize: bool = False

    def __post_init__(self) -> None:
        require(self.val_size >= 0, "data.val_size", self.val_size, "an integer >= 0 (0: no validation)")


@dataclasses.dataclass
class Split:
    """Inputs ``x`` (N x features, float32) and integer labels ``y`` (N), on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclasses.dataclass
class Source:
    """What a dataset builder returns: whole train and test sets plus how to show a sample."""

    train: Split
    test: Split
    classes: list[str]
    sample_shape: tuple[int, ...]
    files: list[Path] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Data:
    """The splits used for one run, all on the run's device."""

    train: Split
    val: Split
    test: Split
    classes: list[str]
    sample_shape: tuple[int, ...]
    files: list[Path]

    @property
    def in_features(self) -> int:
        return self.train.x.shape[1]


DATASETS: Registry[Source] = Registry("data", base=DataConfig)


def load_data(cfg: DictConfig, device: torch.device) -> Data:
    """Build the dataset named by ``cfg.name``, carve ``cfg.val_size`` validation samples, and
    with ``cfg.normalize`` standardise every split by the training split's mean and std (one
    scalar each, as for images: a per-pixel std is zero on MNIST's always-black border)."""
    source = DATASETS.build(cfg)
    n_train = len(source.train)
    require(
        0 <= cfg.val_size < n_train,
        "data.val_size",
        cfg.val_size,
        f"an integer in [0, {n_train - 1}] ({cfg.name} has {n_train} training samples)",
    )
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    full = source.train
    train, val, test = (
        Split(full.x[train_idx], full.y[train_idx]),
        Split(full.x[val_idx], full.y[val_idx]),
        source.test,
    )
    if cfg.normalize:
        mean, std = train.x.mean(), train.x.std()
        train, val, test = (Split((s.x - mean) / std, s.y) for s in (train, val, test))
    return Data(
        train=train.to(device),
        val=val.to(device),
        test=test.to(device),
        classes=source.classes,
        sample_shape=source.sample_shape,
        files=source.files,
    )


def _from_numpy(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


# The MNIST-format datasets torchvision reads: their folder under the data root (torchvision's
# class name) and class names, and the files of each split
IDX_CLASSES = {
    "MNIST": [
        f"{i} - {n}" for i, n in enumerate("zero one two three four five six seven eight nine".split())
    ],
    "FashionMNIST": "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(","),
}
IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_split(name: str, root: str, train: bool, download: bool) -> tuple[Split, list[Path]]:
    """One split of an MNIST-format dataset, read from its raw IDX files. torchvision (slow to
    import) is asked only for what is missing: it downloads the files, or says
    they cannot be had, which becomes advice."""
    raw = Path(root) / name / "raw"
    used = [raw / file for file in IDX_FILES[train]]
    if not all(path.is_file() for path in used):
        _torchvision_download(name, root, train, download)
    images, labels = (_read_idx(path) for path in used)
    x = torch.from_numpy(images).reshape(len(images), -1).float().div_(255)
    return Split(x, torch.from_numpy(labels.astype(np.int64))), used


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes as an array of its shape. Its header gives its element type
    and shape, so its size is known: a truncated or padded file is named here, instead of failing
    inside the reshape."""
    with path.open("rb") as handle:
        header = handle.read(4)
        if len(header) < 4 or header[:2] != b"\0\0" or header[2] not in _IDX_ITEM_SIZE:
            raise ConfigError(f"{path} is not an IDX file (its first bytes are {header!r}). {_REPLACE}")
        kind, ndim = header[2], header[3]
        dims = handle.read(4 * ndim)
        shape = [int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4)]
        expected = 4 + 4 * ndim + _IDX_ITEM_SIZE[kind] * math.prod(shape)
        size = path.stat().st_size
        if size != expected:
            raise ConfigError(
                f"{path} is truncated or corrupt: {size} bytes, expected {expected} for its "
                f"{'x'.join(map(str, shape))} array. {_REPLACE}"
            )
        if kind != 0x08:
            raise ConfigError(
                f"{path} holds IDX type 0x{kind:02x}, not the unsigned bytes of MNIST. {_REPLACE}"
            )
        return np.fromfile(handle, np.uint8).reshape(shape)


def _torchvision_download(name: str, root: str, train: bool, download: bool) -> None:
    """Let torchvision fetch the split's files into ``<root>/<name>/raw``; its failures become
    advice, and a failed download leaves no empty folders behind."""
    from torchvision import datasets

    raw = Path(root) / name / "raw"
    existed = raw.exists()
    try:
        getattr(datasets, name)(root=root, train=train, download=download)
    except RuntimeError as exc:
        if not existed and raw.is_dir() and not any(raw.iterdir()):
            shutil.rmtree(raw.parent)
        files = [file for split in IDX_FILES.values() for file in split]
        raise ConfigError(
            f"{name} not found in {raw}"
            + (" and it could not be downloaded" if download else " (data.download=false)")
            + f". Put the files {files} in that folder, point data.root (or the env var "
            "SWEEPLAB_DATA_DIR) at the folder that holds "
            f"{name}/raw, or use data=digits, which works offline."
        ) from exc


# IDX element type code -> bytes per element (unsigned/signed byte, short, int, float, double)
_IDX_ITEM_SIZE = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}
_REPLACE = "Replace it with the original file (or delete it and run again with data.download=true)."


def _idx_source(name: str, root: str, download: bool) -> Source:
    train, train_files = _idx_split(name, root, True, download)
    test, test_files = _idx_split(name, root, False, download)
    return Source(train, test, IDX_CLASSES[name], (1, 28, 28), train_files + test_files)


@DATASETS.register("mnist")
def mnist(*, root: str = "./data", download: bool = True) -> Source:
    """MNIST handwritten digits (60k train / 10k test, 28x28), downloaded by torchvision."""
    return _idx_source("MNIST", root, download)


@DATASETS.register("fashion_mnist")
def fashion_mnist(*, root: str = "./data", download: bool = True) -> Source:
    """Fashion-MNIST clothing images, a harder drop-in for MNIST."""
    return _idx_source("FashionMNIST", root, download)


@DATASETS.register("digits")
def digits(*, test_size: float = 0.2) -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images): works offline, trains in seconds."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    require(0 < test_size < 1, "data.test_size", test_size, "a fraction in (0, 1)")
    bunch = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data / 16.0, bunch.target, test_size=test_size, stratify=bunch.target, random_state=0
    )
    classes = [str(c) for c in bunch.target_names]
    return Source(_from_numpy(x_train, y_train), _from_numpy(x_test, y_test), classes, (1, 8, 8))


@DATASETS.register("synthetic")
def synthetic(
    *,
    n_samples: int = 600,
    n_features: int = 16,
    n_informative: int = 8,
    n_classes: int = 3,
    test_size: float = 0.25,
    seed: int = 0,
) -> Source:
    """A tiny ``make_classification`` problem for tests and smoke runs."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    require(n_samples >= 20, "data.n_samples", n_samples, "an integer >= 20")
    require(0 < test_size < 1, "data.test_size", test_size, "a fraction in (0, 1)")
    require(
        0 < n_informative <= n_features,
        "data.n_informative",
        n_informative,
        f"an integer in [1, data.n_features={n_features}]",
    )
    x, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_informative,
        n_redundant=0,
        n_classes=n_classes,
        random_state=seed,
    )
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed)
    classes = [str(c) for c in range(n_classes)]
    return Source(_from_numpy(x_train, y_train), _from_numpy(x_test, y_test), classes, (1, n_features))
