"""Optimizer registry: thin builders over ``torch.optim`` that check the values users set."""

from collections.abc import Iterable, Sequence

import torch
from torch.optim import Optimizer

from sweeplab.config.errors import require
from sweeplab.config.registry import Registry

OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")

Params = Iterable[torch.nn.Parameter]


def _check_common(lr: float, weight_decay: float) -> None:
    require(lr > 0, "optimizer.lr", lr, "a learning rate > 0")
    require(weight_decay >= 0, "optimizer.weight_decay", weight_decay, "a value >= 0")


def _adam_family(
    cls: type[Optimizer], params: Params, lr: float, betas: Sequence[float], eps: float, weight_decay: float
) -> Optimizer:
    _check_common(lr, weight_decay)
    require(
        len(betas) == 2 and all(0 <= b < 1 for b in betas),
        "optimizer.betas",
        list(betas),
        "two values in [0, 1)",
    )
    require(eps > 0, "optimizer.eps", eps, "a value > 0")
    return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("sgd")
def sgd(
    params: Params,
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> Optimizer:
    """SGD with (optionally Nesterov) momentum."""
    _check_common(lr, weight_decay)
    require(0 <= momentum < 1, "optimizer.momentum", momentum, "a value in [0, 1)")
    require(not nesterov or momentum > 0, "optimizer.nesterov", nesterov, "false when momentum is 0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def adam(
    params: Params,
    *,
    lr: float = 0.001,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Optimizer:
    """Adam; ``weight_decay`` is L2 added to the gradient (use adamw for decoupled decay)."""
    return _adam_family(torch.optim.Adam, params, lr, betas, eps, weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(
    params: Params,
    *,
    lr: float = 0.001,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> Optimizer:
    """AdamW: Adam with decoupled weight decay."""
    return _adam_family(torch.optim.AdamW, params, lr, betas, eps, weight_decay)
