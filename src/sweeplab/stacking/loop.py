"""The training loop of a stack: every member's step at once, each member's bookkeeping its own.

Each member keeps the ``TrainingState`` a solo run of its config would have (model, optimizer,
scheduler, shuffle generator, progress), so it sees the batches a solo run sees in the same
order; ``sweeplab.stacking.model`` steps their stacked weights together, eagerly or replayed from a CUDA
graph (``trainer.cuda_graph``, as for a solo run). At every epoch end (and at a
stop) each member's weights and optimizer buffers are written back into its own objects, which
its record then checkpoints, evaluates and logs as for any run.

A member whose loss becomes NaN/inf is reported through ``failed`` and left out from then on;
the others train on.
"""

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from sweeplab.config.schema import TrainerConfig
from sweeplab.data import Data, Split
from sweeplab.stacking.model import StackedModel
from sweeplab.stacking.optimizers import StackedOptimizer, stack_optimizers
from sweeplab.training.interrupt import Interrupted, SignalGuard
from sweeplab.training.loop import DivergedError, close_epoch, final_history, step_weights, steps_per_epoch
from sweeplab.training.state import MetricRows, TrainingState
from sweeplab.training.steps import Recorder, StepOutput, Steps, graphed, wants_graph

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Member:
    """One member's training state and where its epoch rows and its failure go."""

    state: TrainingState
    log_rows: Callable[[MetricRows], None]
    failed: Callable[[DivergedError], None]
    alive: bool = True


def stack(states: list[TrainingState], in_features: int) -> tuple[StackedModel, StackedOptimizer]:
    """The members' models and optimizers stacked; ``NotStackable`` where they cannot be."""
    stacked = StackedModel([s.model for s in states], in_features)
    return stacked, stack_optimizers(list(stacked.params.values()), [s.optimizer for s in states])


class StackedStep:
    """Every member's step on its own batch: ``indices`` ``(K, batch)``; each member's loss and
    accuracy ``(K,)``. Losses are summed for one backward: the members' gradients stay apart."""

    def __init__(self, stacked: StackedModel, optimizer: StackedOptimizer, train: Split) -> None:
        self.stacked, self.optimizer, self.train = stacked, optimizer, train

    def __call__(self, indices: torch.Tensor) -> StepOutput:
        k, flat_indices = len(indices), indices.reshape(-1)
        # index_select on flat indices: faster on CPU than indexing by the (K, batch) tensor
        x = self.train.x.index_select(0, flat_indices).view(k, -1, self.train.x.shape[1])
        y = self.train.y.index_select(0, flat_indices)
        logits = self.stacked(x)
        flat = logits.reshape(-1, logits.shape[-1])  # contiguous: the loss and argmax read it fast
        loss = F.cross_entropy(flat, y, reduction="none").view(k, -1).mean(1)
        self.optimizer.zero_grad()
        loss.sum().backward()
        self.optimizer.step()
        return loss.detach(), (flat.argmax(1) == y).float().view(k, -1).mean(1)


def make_stacked_steps(
    setting: str,
    stacked: StackedModel,
    optimizer: StackedOptimizer,
    train: Split,
    batch_size: int,
    losses: torch.Tensor,
    accs: torch.Tensor,
    recorder: Recorder | None = None,
) -> Steps:
    """The stack's steps as ``trainer.cuda_graph`` asks: on CUDA (``auto``, ``true``) captured
    once and replayed; every hyperparameter it reads is a device tensor (``StackedOptimizer``)."""
    one = StackedStep(stacked, optimizer, train)
    if not wants_graph(setting, train.x.device, recorder):
        return Steps(one, batch_size, losses, accs)
    return graphed(setting, one, batch_size, losses, accs, (len(stacked.members), len(train)), recorder)


def fit_stack(
    members: list[Member],
    stacked: tuple[StackedModel, StackedOptimizer],
    data: Data,
    cfg: TrainerConfig,
    stop: SignalGuard,
) -> None:
    """Train every member (``stacked``: their models and optimizers, from ``stack``) from step 0
    to ``cfg.epochs`` epochs; members start together, a resumed run trains alone. ``stop`` ends
    training at a step boundary with every living member's state written back and current."""
    states = [member.state for member in members]
    stacked, optimizer = stacked
    train = data.train
    n, batch, k = len(train), cfg.batch_size, len(members)
    per_epoch = steps_per_epoch(n, cfg)
    device = train.x.device
    losses = torch.zeros(k, per_epoch * cfg.epochs, device=device)
    accs = torch.zeros_like(losses)
    for row, s in enumerate(states):  # each member's progress reads its row of the stack's
        s.progress.step_loss, s.progress.step_acc = losses[row], accs[row]
    weights = step_weights(n, cfg)
    window, step = cfg.log_every_n_steps, 0
    train_steps = make_stacked_steps(cfg.cuda_graph, stacked, optimizer, train, batch, losses, accs)
    with warnings.catch_warnings():
        # each member's own optimizer never steps (the stack steps for it): a schedule's first
        # step would warn about that order
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        for epoch in range(1, cfg.epochs + 1):
            started = time.perf_counter()
            stacked.train()
            train_steps.begin(_shuffle(states, n, device), 0, step)
            try:
                for i in range(per_epoch):
                    lrs = optimizer.refresh()  # what the members' schedules set for this step
                    train_steps(i, step)  # each member's loss and accuracy into its row's column
                    step += 1
                    if step % window == 0:
                        for s, lr in zip(states, lrs, strict=True):
                            s.progress.lrs[step] = lr
                        _check_finite(members, losses[:, step - 1], f"at step {step} (epoch {epoch})")
                    for s in states:
                        s.scheduler.step()
                    stop.raise_if_requested()
            except Interrupted:
                _write_back(members, stacked, optimizer, epoch - 1, step)
                raise
            _write_back(members, stacked, optimizer, epoch, step)
            if device.type == "cuda":  # the epoch's time is the device's work, not its queueing
                torch.cuda.synchronize(device)
            _epoch_end(members, data, cfg, epoch, weights, time.perf_counter() - started)
    for member in members:
        final_history(member.state.progress)


def _shuffle(states: list[TrainingState], n: int, device: torch.device) -> torch.Tensor:
    """Each member's order for this epoch ``(K, n)``, drawn from its own generator as its solo
    run draws it. Drawn one after another, the members' draws would keep the device
    waiting; torch releases the interpreter during a draw, so they run in threads."""
    with ThreadPoolExecutor(min(len(states), os.cpu_count() or 1)) as pool:
        drawn = list(pool.map(lambda s: torch.randperm(n, generator=s.generator), states))
    orders = torch.stack(drawn).to(device)
    for s, order in zip(states, orders, strict=True):
        s.progress.order = order
    return orders


def _check_finite(members: list[Member], loss: torch.Tensor, where: str) -> None:
    for member, finite in zip(members, torch.isfinite(loss).tolist(), strict=True):
        if member.alive and not finite:
            member.alive = False
            member.failed(DivergedError(f"train/loss became non-finite {where}: lower optimizer.lr"))


def _write_back(
    members: list[Member], stacked: StackedModel, optimizer: StackedOptimizer, epoch: int, step: int
) -> None:
    """Each living member's weights, optimizer buffers and position into its own objects."""
    for row, member in enumerate(members):
        if member.alive:
            stacked.write_back(row)
            optimizer.write_back(row)
            member.state.progress.epoch, member.state.progress.step = epoch, step


def _epoch_end(
    members: list[Member],
    data: Data,
    cfg: TrainerConfig,
    epoch: int,
    weights: torch.Tensor,
    train_seconds: float,
) -> None:
    """Per living member, as ``train.fit`` ends an epoch: its metrics from its own rows,
    validation with its own model, rows to its record (which checkpoints, then logs them)."""
    for member in members:
        if not member.alive:
            continue
        state = member.state
        try:
            rows, metrics = close_epoch(state.model, state.progress, data, cfg, epoch, weights, train_seconds)
        except DivergedError as error:
            member.alive = False
            member.failed(error)
            continue
        metrics["time/epoch_s"] = train_seconds  # the stack's, shared
        member.log_rows([*rows, (state.progress.step, metrics)])
    alive = [m for m in members if m.alive]
    vals = [m.state.progress.history.val_acc[-1] for m in alive if m.state.progress.history.val_acc]
    best = max(vals, default=None)
    log.info(
        "epoch %d/%d | %d of %d members training | best val/acc %s | time/epoch_s %.4g (all members)",
        epoch,
        cfg.epochs,
        len(alive),
        len(members),
        f"{best:.4f}" if best is not None else "-",
        train_seconds,
    )
