"""Learning-rate scheduler registry. Every scheduler is stepped once per optimizer step."""

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LRScheduler, OneCycleLR, StepLR

from sweeplab.config.errors import require
from sweeplab.config.registry import Registry

SCHEDULERS: Registry[LRScheduler] = Registry("scheduler")


@SCHEDULERS.register("none")
def constant(optimizer: Optimizer, total_steps: int, steps_per_epoch: int) -> LRScheduler:
    """Keep the optimizer's learning rate (a real scheduler, so the loop has no special case)."""
    return ConstantLR(optimizer, factor=1.0, total_iters=0)


@SCHEDULERS.register("cosine")
def cosine(
    optimizer: Optimizer, total_steps: int, steps_per_epoch: int, *, eta_min: float = 0.0
) -> LRScheduler:
    """Cosine decay from ``optimizer.lr`` to ``eta_min`` over the whole run."""
    require(eta_min >= 0, "scheduler.eta_min", eta_min, "a learning rate >= 0")
    return CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=eta_min)


@SCHEDULERS.register("step")
def step(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    *,
    step_epochs: int = 5,
    gamma: float = 0.1,
) -> LRScheduler:
    """Multiply the learning rate by ``gamma`` every ``step_epochs`` epochs."""
    require(step_epochs >= 1, "scheduler.step_epochs", step_epochs, "an integer >= 1")
    require(0 < gamma <= 1, "scheduler.gamma", gamma, "a factor in (0, 1]")
    return StepLR(optimizer, step_size=step_epochs * steps_per_epoch, gamma=gamma)


@SCHEDULERS.register("onecycle")
def onecycle(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    *,
    max_lr: float = 0.1,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> LRScheduler:
    """One-cycle policy (Smith 2018): warm up to ``max_lr``, then anneal far below the start."""
    require(max_lr > 0, "scheduler.max_lr", max_lr, "a learning rate > 0")
    require(0 < pct_start < 1, "scheduler.pct_start", pct_start, "a fraction in (0, 1)")
    return OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )
