"""A run's first uses of its own GPU kernels, made on throwaway copies while its MLflow run opens.

On a GPU every kernel is loaded on its first use, and cuBLAS picks (and loads) a kernel per
product shape: a first epoch pays for the full batch's step, the epoch's smaller last batch and
each evaluation shape, on top of the capture. Opening the MLflow run (the run, its params, its
inputs) needs no GPU; meanwhile ``sweeplab.warmup`` runs what is built here: a copy of the model
(or of a stack) and of its optimizer takes one step for each batch size an epoch has, and
evaluates one batch for each size validation and testing use. The copies run in eval mode, so no
dropout mask is drawn and the run's seeded random streams are untouched; the run's own model,
optimizer and buffers are never written. The driver waits for it before training.
"""

import copy
from collections.abc import Callable

import torch
from torch import nn

from sweeplab.data import Data
from sweeplab.schema import TrainerConfig
from sweeplab.stack import StackedModel, StackedOptimizer
from sweeplab.stacked_train import StackedStep
from sweeplab.state import TrainingState
from sweeplab.step import EagerStep, RatedStep, Step, make_capturable, unsupported, wants_graph

Work = Callable[[], None]


def solo(training: TrainingState, data: Data, trainer: TrainerConfig) -> Work:
    """The run's step (with the fused optimizer kernels its graph would use) and evaluation."""
    model, optimizer = copy.deepcopy((training.model, training.optimizer))  # one memo: shared params
    device = data.train.x.device
    one: Step = EagerStep(model, optimizer, data.train)
    if wants_graph(trainer.cuda_graph, device, None) and unsupported(optimizer, training.scheduler) is None:
        one = RatedStep(one, make_capturable(optimizer, device))  # as the run's graph steps
    model.eval()
    return lambda: _first_uses(one, model, data, trainer, ())


def stacked(together: tuple[StackedModel, StackedOptimizer], data: Data, trainer: TrainerConfig) -> Work:
    """The stack's step and a member's evaluation (every member's model has the same shapes).

    The members' own models and optimizers are shared, not copied: the step never touches them
    (only ``write_back`` does, which a rehearsal never calls)."""
    stacked_model, optimizer = together
    shared = {id(m): m for m in [*stacked_model.members, *optimizer.members]}
    model, optimizer = copy.deepcopy((stacked_model, optimizer), shared)
    model.train(False)
    member = copy.deepcopy(model.members[0]).eval()
    step = StackedStep(model, optimizer, data.train)
    return lambda: _first_uses(step, member, data, trainer, (len(model.members),))


def _first_uses(
    step: Step, model: nn.Module, data: Data, cfg: TrainerConfig, members: tuple[int, ...]
) -> None:
    """``step`` on the batch sizes of an epoch (indices of sample 0: any valid index loads the
    same kernels), then ``model``'s forward on the sizes evaluation takes; ``members`` is the
    leading shape of a stack's indices. Both in eval mode: no random numbers drawn."""
    device = data.train.x.device
    for size in batch_sizes(len(data.train), cfg.batch_size, cfg.drop_last):
        step(torch.zeros(*members, size, dtype=torch.long, device=device))
    with torch.inference_mode():
        for split in (data.val, data.test):
            for size in batch_sizes(len(split), cfg.eval_batch_size, drop_last=False):
                model(split.x[:size])


def batch_sizes(n_samples: int, batch_size: int, drop_last: bool) -> set[int]:
    """The sizes of the batches ``n_samples`` are cut into: the full one, and a smaller last one
    unless it is dropped (none for no samples)."""
    if drop_last:
        return {batch_size} if n_samples >= batch_size else set()
    return {min(batch_size, n_samples), n_samples % batch_size} - {0}
