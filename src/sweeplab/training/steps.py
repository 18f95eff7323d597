"""An epoch's training steps, run eagerly or captured once as a CUDA graph and replayed.

At the batch sizes people sweep (64), a GPU step is bound by kernel launches and Python, not by
arithmetic. A CUDA graph records the step's kernels once (gather the batch by an index tensor,
forward, loss, backward, optimizer step, the step's loss and accuracy written into the run's
per-step buffers) and replays them with one launch. What a replay reads lives in tensors it was
captured with: the epoch's order is copied into ``GraphSteps.order`` once per epoch, and device
counters the graph advances itself say which batch it gathers and which step's loss it writes,
so between replays the host launches nothing but the replay. The learning rate the fused
optimizer kernels read is a device tensor (``DeviceRates``), filled from the float the schedule
sets only when that changes.

``Steps`` runs an epoch eagerly around any one-batch step, a model's (``EagerStep``) or a
stack's (``sweeplab.stacking.loop``); ``GraphSteps`` replays it, and is written against a
``Recorder`` (warm up, capture) so that its bookkeeping runs on CPU under a stand-in;
``CudaGraphs`` is the real one.
"""

import logging
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from sweeplab.config.errors import ConfigError
from sweeplab.data import Split

log = logging.getLogger(__name__)

StepOutput = tuple[torch.Tensor, torch.Tensor]  # the step's loss and accuracy, on the device


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


class Steps:
    """An epoch's steps: step ``i`` of the epoch trains ``one`` on batch ``i`` of ``order`` and
    writes its loss and accuracy into column ``step`` of ``losses`` and ``accs`` (the run's
    per-step buffers: ``(steps,)``, or ``(members, steps)`` for a stack, whose order is
    ``(members, samples)``). ``refresh``, if given, runs before every step: it brings what the
    step reads from device tensors up to date (``DeviceRates.refresh``)."""

    def __init__(
        self,
        one: Step,
        batch_size: int,
        losses: torch.Tensor,
        accs: torch.Tensor,
        refresh: Callable[[], None] | None = None,
    ) -> None:
        self.one, self.batch_size, self.losses, self.accs = one, batch_size, losses, accs
        self.refresh = refresh
        self.epoch_order: torch.Tensor | None = None

    def begin(self, order: torch.Tensor, first: int, step: int) -> None:
        """An epoch over ``order`` starts (or resumes) at its batch ``first``, the run's ``step``."""
        self.epoch_order = order

    def __call__(self, i: int, step: int) -> None:
        assert self.epoch_order is not None, "begin() an epoch first"
        if self.refresh is not None:
            self.refresh()
        loss, acc = self.one(self.epoch_order[..., i * self.batch_size : (i + 1) * self.batch_size])
        self.losses[..., step], self.accs[..., step] = loss, acc


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


class GraphSteps(Steps):
    """``Steps`` whose full batches are, after ``warmup_steps`` eager ones, captured and replayed.

    The graph gathers batch ``start / batch_size`` of ``order`` (a copy of the epoch's order, made
    by ``begin``) and writes column ``slot`` of the buffers, then advances both counters; nothing
    but the replay is launched per step. The epoch's smaller last batch (``drop_last=false``)
    runs eagerly: it updates the same parameters and optimizer buffers in place, which the graph
    reads on its next replay. A capture that fails falls back to eager steps (``required=False``,
    with one log line) or raises (``required=True``).
    """

    def __init__(
        self,
        one: Step,
        batch_size: int,
        losses: torch.Tensor,
        accs: torch.Tensor,
        order_shape: tuple[int, ...],
        recorder: Recorder,
        *,
        required: bool,
        refresh: Callable[[], None] | None = None,
        warmup_steps: int = 2,
    ) -> None:
        super().__init__(one, batch_size, losses, accs, refresh)
        self.recorder, self.required = recorder, required
        device = losses.device
        self.order = torch.zeros(order_shape, dtype=torch.long, device=device)
        self.offsets = torch.arange(batch_size, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)  # the batch's first position
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the step's column
        self.warmup_left = warmup_steps
        self.replay: Callable[[], None] | None = None
        self.failed = False

    def begin(self, order: torch.Tensor, first: int, step: int) -> None:
        super().begin(order, first, step)
        self.order.copy_(order)
        self.start.fill_(first * self.batch_size)
        self.slot.fill_(step)

    def _step(self) -> None:
        """One step as the graph holds it: batch, train, write, advance."""
        loss, acc = self.one(self.order.index_select(-1, self.offsets + self.start))
        self.losses.index_copy_(-1, self.slot, loss.unsqueeze(-1))
        self.accs.index_copy_(-1, self.slot, acc.unsqueeze(-1))
        self.start.add_(self.batch_size)
        self.slot.add_(1)

    def __call__(self, i: int, step: int) -> None:
        if self.failed or (i + 1) * self.batch_size > self.order.shape[-1]:
            return super().__call__(i, step)
        if self.refresh is not None:
            self.refresh()
        if self.replay is None:
            if self.warmup_left:
                self.warmup_left -= 1
                self.recorder.warm_up(self._step)
                return None
            self._capture()
            if self.failed:
                return super().__call__(i, step)
        self.replay()
        return None

    def _capture(self) -> None:
        try:
            self.replay = self.recorder.capture(self._step)
        except Exception as exc:  # what a model or optimizer does that a graph cannot hold
            if self.required:
                raise GraphCaptureError(
                    f"trainer.cuda_graph=true: the training step could not be captured: {exc}"
                ) from exc
            log.warning(
                "trainer.cuda_graph=auto: the training step could not be captured, training eagerly: %s", exc
            )
            self.failed = True
            self.one.optimizer.zero_grad()  # gradients the failed capture left


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


class DeviceRates:
    """The learning rates a graph reads: a device tensor per param group, beside its float.

    The schedule sets the groups' floats, as in any run, and launches nothing; ``refresh``
    fills a tensor only when its rate has changed (never, without a schedule); the optimizer
    steps with the tensors in its groups (``RatedStep``), so a replay reads the current rate.
    Tensors kept in the groups themselves would cost every scheduler step two or three kernel
    launches (its copies of the rates and the fill), a rate changed or not.
    """

    def __init__(self, optimizer: Optimizer, device: torch.device) -> None:
        self.groups = optimizer.param_groups
        self.seen = [group["lr"] for group in self.groups]
        self.tensors = [torch.tensor(lr, device=device) for lr in self.seen]

    def refresh(self) -> None:
        now = [group["lr"] for group in self.groups]
        if now != self.seen:
            for tensor, lr in zip(self.tensors, now, strict=True):
                tensor.fill_(lr)
            self.seen = now


class RatedStep:
    """``one`` stepping its optimizer with ``rates``' tensors as the learning rates; the groups
    hold their floats again after it."""

    def __init__(self, one: Step, rates: DeviceRates) -> None:
        self.one, self.rates, self.optimizer = one, rates, one.optimizer

    def __call__(self, indices: torch.Tensor) -> StepOutput:
        groups = self.rates.groups
        floats = [group["lr"] for group in groups]
        for group, tensor in zip(groups, self.rates.tensors, strict=True):
            group["lr"] = tensor
        try:
            return self.one(indices)
        finally:
            for group, lr in zip(groups, floats, strict=True):
                group["lr"] = lr


def make_capturable(optimizer: Optimizer, device: torch.device) -> DeviceRates:
    """Switch ``optimizer`` to its fused kernels, in place, and return the device tensors its
    learning rates are read from inside a graph.

    Done after a checkpoint is restored. Optimizers with a ``capturable`` flag (Adam, AdamW)
    refuse to step inside a capture without it; their step counts move to the device.
    """
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # saved so by an earlier version: a float, as any run's
            group["lr"] = float(group["lr"])
        group["fused"], group["foreach"] = True, False
        if "capturable" in optimizer.defaults:
            group["capturable"] = True
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):  # the fused Adam kernels count steps on the device
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
    return DeviceRates(optimizer, device)


def make_steps(
    setting: str,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    train: Split,
    batch_size: int,
    losses: torch.Tensor,
    accs: torch.Tensor,
    recorder: Recorder | None = None,
) -> Steps:
    """The steps ``trainer.cuda_graph`` asks for: ``auto`` graphs on CUDA where supported,
    ``true`` insists (an error where it cannot), ``false`` never. ``recorder`` replaces CUDA
    graphs in tests."""
    one = EagerStep(model, optimizer, train)
    if not wants_graph(setting, train.x.device, recorder):
        return Steps(one, batch_size, losses, accs)
    reason = unsupported(optimizer, scheduler)
    if reason:
        if setting == "true":
            raise GraphCaptureError(
                f"trainer.cuda_graph=true: {reason}; use trainer.cuda_graph=auto or false"
            )
        log.info("trainer.cuda_graph=auto: training eagerly, %s", reason)
        return Steps(one, batch_size, losses, accs)
    rates = make_capturable(optimizer, train.x.device)
    rated = RatedStep(one, rates)
    return graphed(setting, rated, batch_size, losses, accs, (len(train),), recorder, rates.refresh)


def wants_graph(setting: str, device: torch.device, recorder: Recorder | None) -> bool:
    """Whether ``trainer.cuda_graph`` asks for a graph on ``device``; ``true`` off CUDA is an error."""
    if setting == "false" or (setting == "auto" and recorder is None and device.type != "cuda"):
        return False
    if setting == "true" and recorder is None and device.type != "cuda":
        raise ConfigError(f"trainer.cuda_graph=true needs a CUDA device, not {device}: use auto or false")
    return True


def graphed(
    setting: str,
    one: Step,
    batch_size: int,
    losses: torch.Tensor,
    accs: torch.Tensor,
    order_shape: tuple[int, ...],
    recorder: Recorder | None,
    refresh: Callable[[], None] | None = None,
) -> GraphSteps:
    """``one``'s steps replayed from a CUDA graph (or ``recorder``'s stand-in), as ``setting``
    requires; ``refresh`` runs before each."""
    return GraphSteps(
        one,
        batch_size,
        losses,
        accs,
        order_shape,
        recorder or CudaGraphs(),
        required=setting == "true",
        refresh=refresh,
    )
