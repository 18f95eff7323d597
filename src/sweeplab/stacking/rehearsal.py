"""A stack's first uses of its GPU kernels, rehearsed on throwaway copies as a solo run's are
(``sweeplab.training.rehearsal``)."""

import copy

from sweeplab.config.schema import TrainerConfig
from sweeplab.data import Data
from sweeplab.stacking.loop import StackedStep
from sweeplab.stacking.model import StackedModel
from sweeplab.stacking.optimizers import StackedOptimizer
from sweeplab.training.rehearsal import Rehearsal, rehearse_shapes


def stacked(together: tuple[StackedModel, StackedOptimizer], data: Data, trainer: TrainerConfig) -> Rehearsal:
    """The stack's step and a member's evaluation (every member's model has the same shapes).

    The members' own models and optimizers are shared, not copied: the step never touches them
    (only ``write_back`` does, which a rehearsal never calls)."""
    stacked_model, optimizer = together
    shared = {id(m): m for m in [*stacked_model.members, *optimizer.members]}
    model, optimizer = copy.deepcopy((stacked_model, optimizer), shared)
    model.train(False)
    member = copy.deepcopy(model.members[0]).eval()
    step = StackedStep(model, optimizer, data.train)
    return lambda: rehearse_shapes(step, member, data, trainer, (len(model.members),))
