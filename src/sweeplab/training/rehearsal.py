"""A run's first uses of its own GPU kernels, made on throwaway copies while its MLflow run opens.

On a GPU every kernel is loaded on its first use, and cuBLAS picks (and loads) a kernel per
product shape: a first epoch pays for the full batch's step, the epoch's smaller last batch and
each evaluation shape, on top of the capture. Opening the MLflow run (the run, its params, its
inputs) needs no GPU; meanwhile the thread of ``sweeplab.training.first_uses`` runs what is built
here: a copy of the model (or of a stack, ``sweeplab.stacking.rehearsal``) and of its optimizer
takes one step for each batch size an epoch has, and evaluates one batch for each size
validation and testing use. The copies run in eval mode, so no dropout mask is drawn and the
run's seeded random streams are untouched; the run's own model, optimizer and buffers are never
written. The driver waits for it before training.
"""

import copy
from collections.abc import Callable

import torch
from torch import nn

from sweeplab.config.schema import TrainerConfig
from sweeplab.data import Data
from sweeplab.training.state import TrainingState
from sweeplab.training.steps import EagerStep, RatedStep, Step, make_capturable, unsupported, wants_graph

Rehearsal = Callable[[], None]


def solo(training: TrainingState, data: Data, trainer: TrainerConfig) -> Rehearsal:
    """The run's step (with the fused optimizer kernels its graph would use) and evaluation."""
    model, optimizer = copy.deepcopy((training.model, training.optimizer))  # one memo: shared params
    device = data.train.x.device
    one: Step = EagerStep(model, optimizer, data.train)
    if wants_graph(trainer.cuda_graph, device, None) and unsupported(optimizer, training.scheduler) is None:
        one = RatedStep(one, make_capturable(optimizer, device))  # as the run's graph steps
    model.eval()
    return lambda: rehearse_shapes(one, model, data, trainer, ())


def rehearse_shapes(
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
