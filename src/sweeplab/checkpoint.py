"""Training state on disk: what a checkpoint holds, written atomically, found again by resume.

A checkpoint is one ``torch.save`` file of plain tensors, numbers and strings (so it loads with
``weights_only=True``): model, optimizer and scheduler state, every random generator's state,
the ``Progress`` of training, the metric rows of the epoch it closed, and the config and data
digest it was trained with. Files are named ``epoch<E>-step<S>.pt`` (no "=", which a Hydra
override would need quoted); ``best.pt`` is the state with the highest ``val/acc``.
"""

import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from sweeplab.errors import ConfigError
from sweeplab.schema import CheckpointConfig
from sweeplab.train import MetricRows, Progress

log = logging.getLogger(__name__)

FORMAT = 1
BEST = "best.pt"
_NAME = re.compile(r"epoch(\d+)-step(\d+)\.pt")


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Python, numpy, torch (CPU and every initialised GPU) and the batch-shuffling generator."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "shuffle": generator.get_state(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    generator: torch.Generator,
    progress: Progress,
    rows: MetricRows,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Everything needed to continue bit-for-bit where training stands now.

    ``rows`` are the metrics of the epoch this checkpoint closes: a resume logs them again if
    the process died after saving and before MLflow received them.
    """
    return {
        "format": FORMAT,
        **meta,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(generator),
        "progress": progress.state_dict(),
        "rows": rows,
    }


def restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    generator: torch.Generator,
    progress: Progress,
    reconfigured: bool = False,
) -> None:
    """Put every piece of training back where ``state`` left it.

    ``reconfigured`` (a forced resume under a changed config): the optimizer keeps its saved
    buffers (momentum, moments) but takes its hyperparameters from the new config, and the new
    scheduler is stepped forward to the current step instead of being restored.
    """
    model.load_state_dict(state["model"])
    saved = state["optimizer"]
    if reconfigured:
        groups = zip(saved["param_groups"], optimizer.state_dict()["param_groups"], strict=True)
        saved = {**saved, "param_groups": [{**new, "params": old["params"]} for old, new in groups]}
    optimizer.load_state_dict(saved)
    restore_rng(state["rng"], generator)
    progress.load_state_dict(state["progress"])
    if not reconfigured:
        scheduler.load_state_dict(state["scheduler"])
        return
    with warnings.catch_warnings():  # stepping a scheduler ahead of its optimizer is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(progress.step):
            scheduler.step()


def write_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename it over ``path``: a process
    killed at any point leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f"{path.name}.tmp")
    with tmp.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _publish(tmp, path)


def _publish(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's state on the CPU; a file that is not one is a user-facing error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{path} is not a readable sweeplab checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a sweeplab checkpoint (format {FORMAT}).")
    return state


def load_latest(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that loads, skipping any that do not (with a warning)."""
    for path in _numbered(folder):
        try:
            return path, load(path)
        except ConfigError as exc:
            log.warning("skipping %s", exc)
    return None


def _numbered(folder: Path) -> list[Path]:
    """The ``epoch<E>-step<S>.pt`` files in ``folder``, newest (highest step) first."""
    if not folder.is_dir():
        return []
    steps = {p: int(m.group(2)) for p in folder.glob("epoch*-step*.pt") if (m := _NAME.fullmatch(p.name))}
    return sorted(steps, key=steps.__getitem__, reverse=True)


class Checkpointer:
    """Saves into one folder: every N-th epoch and on interruption, newest K kept, plus best."""

    def __init__(self, folder: Path, cfg: CheckpointConfig) -> None:
        self.folder = folder
        self.cfg = cfg

    def save(self, state: dict[str, Any], epoch: int, step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"epoch{epoch}-step{step}.pt"
        write_atomic(state, path)
        self._prune()
        return path

    def epoch_end(self, state: Callable[[], dict[str, Any]], epoch: int, step: int, improved: bool) -> None:
        """Save if this epoch is due, and as ``best.pt`` if ``val/acc`` improved; ``state`` is
        only called when something is written."""
        best = improved and self.cfg.save_best
        if self.cfg.every_n_epochs and epoch % self.cfg.every_n_epochs == 0:
            path = self.save(state(), epoch, step)
            if best:  # the same bytes: a hard link costs no second write
                _link_atomic(path, self.folder / BEST)
        elif best:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(state(), self.folder / BEST)

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` numbered files; drop temp files of killed writes."""
        for path in _numbered(self.folder)[self.cfg.keep_last :]:
            path.unlink(missing_ok=True)
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink(missing_ok=True)


def _link_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f"{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, tmp)
    _publish(tmp, target)
