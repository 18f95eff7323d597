"""One training step, run eagerly or captured once as a CUDA graph and replayed.

At the batch sizes people sweep (64), a GPU step is bound by kernel launches and Python, not by
arithmetic. A CUDA graph records the step's kernels once (gather the batch by an index tensor,
forward, loss, backward, optimizer step, the step's loss and accuracy) and replays them with one
launch. What a replay reads lives in tensors it was captured with: the batch indices are copied
into ``GraphStep.indices`` before each replay, and the learning rate is a device tensor in the
optimizer's param group, which schedulers ``fill_`` and the fused optimizer kernels read.

``GraphStep`` wraps any eager step, a model's (``EagerStep``) or a stack's
(``sweeplab.stacked_train``), and is written against a ``Recorder`` (warm up, capture) so that
its bookkeeping runs on CPU under a stand-in; ``CudaGraphs`` is the real one.
"""

import logging
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from sweeplab.data import Split
from sweeplab.errors import ConfigError

log = logging.getLogger(__name__)

StepOutput = tuple[torch.Tensor, torch.Tensor]  # the step's loss and accuracy, 0-dim, on the device


class Clearable(Protocol):
    def zero_grad(self) -> None: ...


class Step(Protocol):
    optimizer: Clearable

    def __call__(self, indices: torch.Tensor) -> StepOutput: ...


class EagerStep:
    """Train on the samples ``indices`` picks from ``train``: one forward, backward and update."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, train: Split) -> None:
        self.model, self.optimizer, self.train = model, optimizer, train

    def __call__(self, indices: torch.Tensor) -> StepOutput:
        x, y = self.train.x.index_select(0, indices), self.train.y.index_select(0, indices)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.argmax(1) == y).float().mean()


class Recorder(Protocol):
    def warm_up(self, step: Callable[[], None]) -> None:
        """Run ``step`` once, as capture needs it run before (lazy initialisation)."""

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        """Record ``step`` without running it; return what replays it."""


class CudaGraphs:
    """``torch.cuda.graph`` as its documentation prescribes: warm-up on a side stream."""

    def warm_up(self, step: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay


class GraphStep:
    """An eager step for ``warmup_steps`` batches of the full shape, then captured and replayed.

    ``eager`` is any step whose optimizer (``eager.optimizer``) can clear gradients: a model's
    (``EagerStep``) or a stack's. ``indices`` is the full batch's index tensor (``(batch,)``,
    or ``(members, batch)`` for a stack), ``outputs`` the shape of its loss and accuracy. Indices
    of another shape (the epoch's last batch, with ``drop_last=false``) run eagerly: they update
    the same parameters and optimizer buffers in place, which the graph reads on its next replay.
    A capture that fails falls back to eager steps (``required=False``, with one log line) or
    raises (``required=True``).
    """

    def __init__(
        self,
        eager: Step,
        indices: torch.Tensor,
        outputs: tuple[int, ...],
        recorder: Recorder,
        *,
        required: bool,
        warmup_steps: int = 2,
    ) -> None:
        self.eager, self.recorder, self.required = eager, recorder, required
        self.indices = indices
        self.loss = torch.zeros(outputs, device=indices.device)
        self.acc = torch.zeros(outputs, device=indices.device)
        self.warmup_left = warmup_steps
        self.replay: Callable[[], None] | None = None
        self.failed = False

    def _step_into_buffers(self) -> None:
        loss, acc = self.eager(self.indices)
        self.loss.copy_(loss)
        self.acc.copy_(acc)

    def __call__(self, indices: torch.Tensor) -> StepOutput:
        if self.failed or indices.shape != self.indices.shape:
            return self.eager(indices)
        self.indices.copy_(indices)
        if self.replay is None:
            if self.warmup_left:
                self.warmup_left -= 1
                self.recorder.warm_up(self._step_into_buffers)
                return self.loss, self.acc
            self._capture()
            if self.failed:
                return self.eager(indices)
        self.replay()
        return self.loss, self.acc

    def _capture(self) -> None:
        try:
            self.replay = self.recorder.capture(self._step_into_buffers)
        except Exception as exc:  # what a model or optimizer does that a graph cannot hold
            if self.required:
                raise GraphCaptureError(
                    f"trainer.cuda_graph=true: the training step could not be captured: {exc}"
                ) from exc
            log.warning(
                "trainer.cuda_graph=auto: the training step could not be captured, training eagerly: %s", exc
            )
            self.failed = True
            self.eager.optimizer.zero_grad()  # gradients the failed capture left


class GraphCaptureError(ConfigError):
    """``trainer.cuda_graph=true`` for a step that cannot be captured."""


def unsupported(optimizer: Optimizer, scheduler: LRScheduler) -> str | None:
    """Why this optimizer and schedule cannot be replayed from a graph, or None.

    A replay reads the learning rate from a tensor, which only the fused optimizer kernels take
    as a tensor; any other value a scheduler changes (one-cycle's momentum) would stay frozen at
    its captured value.
    """
    if "fused" not in optimizer.defaults:
        return (
            f"{type(optimizer).__name__} has no fused implementation to read its learning rate from a tensor"
        )
    if getattr(scheduler, "cycle_momentum", False):
        return f"{type(scheduler).__name__} changes the momentum every step, which a graph would freeze"
    return None


def make_capturable(optimizer: Optimizer, device: torch.device) -> None:
    """Switch ``optimizer`` to its fused kernels with a device-tensor learning rate, in place.

    Done after a checkpoint is restored (which brings back float learning rates); the schedule
    then writes into the tensor (``fill_``) and the graph reads it on every replay. Optimizers
    with a ``capturable`` flag (Adam, AdamW) refuse to step inside a capture without it.
    """
    for group in optimizer.param_groups:
        lr = group["lr"]
        group["lr"] = torch.tensor(float(lr), device=device) if not torch.is_tensor(lr) else lr.to(device)
        group["fused"], group["foreach"] = True, False
        if "capturable" in optimizer.defaults:
            group["capturable"] = True
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):  # the fused Adam kernels count steps on the device
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


def make_step(
    setting: str,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    train: Split,
    batch_size: int,
    recorder: Recorder | None = None,
) -> Step:
    """The step ``trainer.cuda_graph`` asks for: ``auto`` graphs on CUDA where supported, ``true``
    insists (an error where it cannot), ``false`` never. ``recorder`` replaces CUDA graphs in tests."""
    eager = EagerStep(model, optimizer, train)
    device = train.x.device
    if not wants_graph(setting, device, recorder):
        return eager
    reason = unsupported(optimizer, scheduler)
    if reason:
        if setting == "true":
            raise GraphCaptureError(
                f"trainer.cuda_graph=true: {reason}; use trainer.cuda_graph=auto or false"
            )
        log.info("trainer.cuda_graph=auto: training eagerly, %s", reason)
        return eager
    make_capturable(optimizer, device)
    return graphed(setting, eager, torch.zeros(batch_size, dtype=torch.long, device=device), (), recorder)


def wants_graph(setting: str, device: torch.device, recorder: Recorder | None) -> bool:
    """Whether ``trainer.cuda_graph`` asks for a graph on ``device``; ``true`` off CUDA is an error."""
    if setting == "false" or (setting == "auto" and recorder is None and device.type != "cuda"):
        return False
    if setting == "true" and recorder is None and device.type != "cuda":
        raise ConfigError(f"trainer.cuda_graph=true needs a CUDA device, not {device}: use auto or false")
    return True


def graphed(
    setting: str, eager: Step, indices: torch.Tensor, outputs: tuple[int, ...], recorder: Recorder | None
) -> GraphStep:
    """``eager`` replayed from a CUDA graph (or ``recorder``'s stand-in), as ``setting`` requires."""
    return GraphStep(eager, indices, outputs, recorder or CudaGraphs(), required=setting == "true")
