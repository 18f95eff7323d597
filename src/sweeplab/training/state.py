"""Training state: everything that must be saved to continue a run exactly where it stopped.

``TrainingState`` holds the model, optimizer, scheduler, batch-shuffling generator and
``Progress``; the loop steps it, checkpoints save its ``state_dict`` and a resume loads it back.
A ``state_dict`` holds only tensors, numbers, strings and lists, so it loads with
``torch.load(weights_only=True)``.
"""

import dataclasses
import random
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

# metrics leave the loop as (step, {name: value}) rows, once per epoch
MetricRows = list[tuple[int, dict[str, float]]]


@dataclasses.dataclass
class History:
    """Per-step training curves and per-epoch validation points, for figures and summaries."""

    step_loss: np.ndarray
    step_acc: np.ndarray
    epoch_end_steps: list[int] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    val_acc: list[float] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0

    @property
    def best_val_acc(self) -> float | None:
        return max(self.val_acc) if self.val_acc else None

    @property
    def improved(self) -> bool:
        """The latest epoch's ``val/acc`` beats every earlier one."""
        return bool(self.val_acc) and self.val_acc[-1] > max(self.val_acc[:-1], default=-1.0)


@dataclasses.dataclass
class Progress:
    """Where training stands at a step boundary.

    The loop keeps it current after every step, so an interrupted run can be saved part-way
    through an epoch and continue with the same batches in the same order.
    """

    step_loss: torch.Tensor  # every step's loss (on the device, sized for the whole run)
    step_acc: torch.Tensor
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    order: torch.Tensor | None = None  # the shuffle of an epoch stopped part-way
    lrs: dict[int, float] = dataclasses.field(default_factory=dict)  # that epoch's logged lrs
    history: History = dataclasses.field(default_factory=lambda: History(np.empty(0), np.empty(0)))

    @classmethod
    def start(cls, total_steps: int, device: torch.device) -> "Progress":
        return cls(torch.zeros(total_steps, device=device), torch.zeros(total_steps, device=device))

    def state_dict(self) -> dict[str, Any]:
        history = self.history
        return {
            "epoch": self.epoch,
            "step": self.step,
            "order": None if self.order is None else self.order.cpu(),
            "lrs": dict(self.lrs),
            "step_loss": self.step_loss[: self.step].cpu(),
            "step_acc": self.step_acc[: self.step].cpu(),
            "epoch_end_steps": list(history.epoch_end_steps),
            "val_loss": list(history.val_loss),
            "val_acc": list(history.val_acc),
            "train_seconds": history.train_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        device = self.step_loss.device
        self.order = None if state["order"] is None else state["order"].to(device)
        self.lrs = dict(state["lrs"])
        self.step_loss[: self.step] = state["step_loss"].to(device)
        self.step_acc[: self.step] = state["step_acc"].to(device)
        self.history = History(
            np.empty(0),
            np.empty(0),
            list(state["epoch_end_steps"]),
            list(state["val_loss"]),
            list(state["val_acc"]),
            state["train_seconds"],
        )


@dataclasses.dataclass
class TrainingState:
    """The objects one run trains with, saved and restored as one."""

    model: nn.Module
    optimizer: Optimizer
    scheduler: LRScheduler
    generator: torch.Generator  # shuffles batches, apart from the global generator
    progress: Progress

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit where training stands now."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.generator),
            "progress": self.progress.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], reconfigured: bool = False) -> None:
        """Put every piece of training back where ``state`` left it.

        ``reconfigured`` (a forced resume under a changed config): the optimizer keeps its saved
        buffers (momentum, moments) but takes its hyperparameters from the new config, and the
        new scheduler is stepped forward to the current step instead of being restored.
        """
        self.model.load_state_dict(state["model"])
        saved = state["optimizer"]
        if reconfigured:
            groups = zip(saved["param_groups"], self.optimizer.state_dict()["param_groups"], strict=True)
            saved = {**saved, "param_groups": [{**new, "params": old["params"]} for old, new in groups]}
        self.optimizer.load_state_dict(saved)
        restore_rng(state["rng"], self.generator)
        self.progress.load_state_dict(state["progress"])
        if not reconfigured:
            self.scheduler.load_state_dict(state["scheduler"])
            return
        with warnings.catch_warnings():  # stepping a scheduler ahead of its optimizer is the point
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.progress.step):
                self.scheduler.step()


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
