"""Training state on disk: what a checkpoint holds, written atomically, found again by resume.

A checkpoint is one ``torch.save`` file of plain tensors, numbers and strings (so it loads with
``weights_only=True``): the ``TrainingState``'s state dict (model, optimizer, scheduler, every
random generator, progress), the metric rows of the epoch it closed, and the config and data
digest it was trained with. Files are named ``epoch<E>-step<S>.pt`` (no "=", which a Hydra
override would need quoted); ``best.pt`` is the state with the highest ``val/acc``.
"""

import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sweeplab.config.errors import ConfigError
from sweeplab.config.schema import CheckpointConfig
from sweeplab.training.state import MetricRows, TrainingState

log = logging.getLogger(__name__)

FORMAT = 1
BEST = "best.pt"
_NAME = re.compile(r"epoch(\d+)-step(\d+)\.pt")


def contents(training: TrainingState, rows: MetricRows, meta: dict[str, Any]) -> dict[str, Any]:
    """What one checkpoint file holds: the training state, the run it belongs to, and ``rows``,
    the metrics of the epoch it closes (a resume logs them again if the process died after
    saving and before MLflow received them)."""
    return {"format": FORMAT, **meta, **training.state_dict(), "rows": rows}


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
    """A checkpoint's state on the CPU; a file that is not one is a one-line user-facing error,
    whatever the unpickler raised for it (truncated zip, text, another pickle)."""
    try:
        with warnings.catch_warnings():  # the unpickler's notes on foreign pickles are noise here
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc}).") from exc
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:120]
        raise ConfigError(
            f"{path} is not a readable sweeplab checkpoint ({type(exc).__name__}: {reason}). {_EXPECTED}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a sweeplab checkpoint (format {FORMAT}). {_EXPECTED}")
    return state


_EXPECTED = "Expected a .pt file from a run's checkpoints/ folder."


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
