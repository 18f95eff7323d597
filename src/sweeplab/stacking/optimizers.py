"""The stacked forms of torch's SGD, Adam and AdamW: one step over a stack's parameters.

``StackedSGD`` and ``StackedAdam`` step the stacked parameters with per-member hyperparameters
read from each member's own optimizer, by the update rules of ``torch.optim.SGD``, ``Adam`` and
``AdamW``; ``write_back`` leaves member ``k``'s own optimizer as it would be after the same
steps alone.
"""

import torch
from torch.optim import SGD, Adam, AdamW, Optimizer

from sweeplab.stacking.model import NotStackable


def _view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-member values ``(K,)`` shaped to broadcast over a stacked tensor ``(K, ...)``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class StackedOptimizer:
    """Steps stacked parameters; each member's hyperparameters come from its own optimizer.

    What a schedule may change every step (``scheduled``: the learning rate; SGD's momentum and
    Adam's first beta under one-cycle) lives in device tensors that ``refresh`` fills from the
    members' param groups before each step; everything ``step`` reads is a tensor or fixed at
    construction, so the step can be replayed from a CUDA graph.
    """

    scheduled: dict[str, tuple[str, int | None]] = {"lr": ("lr", None)}

    def __init__(self, params: list[torch.Tensor], members: list[Optimizer]) -> None:
        self.params, self.members = params, members
        self.device = params[0].device
        self._seen: list[list[float]] = []
        for attribute, (key, index) in self.scheduled.items():
            setattr(self, attribute, self.hyper(key, index))

    def _floats(self, key: str, index: int | None = None) -> list[float]:
        groups = [optimizer.param_groups[0] for optimizer in self.members]
        return [float(group[key] if index is None else group[key][index]) for group in groups]

    def hyper(self, key: str, index: int | None = None) -> torch.Tensor:
        """``key`` of every member's (single) param group, as a float tensor ``(K,)``."""
        return torch.tensor(self._floats(key, index), device=self.device)

    def refresh(self) -> list[float]:
        """Bring the scheduled tensors to what the members' schedules set for the coming step;
        the members' learning rates."""
        now = [self._floats(key, index) for key, index in self.scheduled.values()]
        if now != self._seen:
            for attribute, values in zip(self.scheduled, now, strict=True):
                # queued behind the step in flight, as a blocking copy from host memory would
                # wait for it (every step under a schedule)
                getattr(self, attribute).copy_(torch.tensor(values), non_blocking=True)
            self._seen = now
        return now[0]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class StackedSGD(StackedOptimizer):
    """``torch.optim.SGD``: weight decay into the gradient, momentum (the first step's buffer is
    the gradient), Nesterov per member, no dampening."""

    scheduled = {"lr": ("lr", None), "momentum": ("momentum", None)}
    lr: torch.Tensor
    momentum: torch.Tensor

    def __init__(self, params: list[torch.Tensor], members: list[Optimizer]) -> None:
        super().__init__(params, members)
        self.weight_decay = self.hyper("weight_decay")
        self.nesterov = self.hyper("nesterov").bool()
        self.decays, self.looks_ahead = any(self._floats("weight_decay")), any(self._floats("nesterov"))
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self) -> None:
        # each update one pass over its tensors (addcmul), not a product into a temporary and
        # a second pass: the stacked weights are many megabytes, and the step is bound by memory
        for i, p in enumerate(self.params):
            grad = p.grad.addcmul_(_view(self.weight_decay, p), p) if self.decays else p.grad
            momentum = _view(self.momentum, p)
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = grad.clone()
            else:
                torch.addcmul(grad, momentum, buf, out=buf)  # momentum * buf + grad
            update = buf
            if self.looks_ahead:  # only the members with nesterov=true look ahead
                update = torch.where(_view(self.nesterov, p), grad + momentum * buf, buf)
            p.addcmul_(_view(self.lr, p), update, value=-1)

    def write_back(self, k: int) -> None:
        optimizer = self.members[k]
        if optimizer.param_groups[0]["momentum"] == 0:
            return
        for param, buf in zip(optimizer.param_groups[0]["params"], self.buffers, strict=True):
            if buf is not None:
                optimizer.state[param]["momentum_buffer"] = buf[k].clone()


class StackedAdam(StackedOptimizer):
    """``torch.optim.Adam`` (L2 weight decay into the gradient) or, with ``decoupled``,
    ``AdamW`` (weights shrunk by lr x weight decay before the update). The step count is a device
    tensor, as in Adam's capturable form."""

    scheduled = {"lr": ("lr", None), "beta1": ("betas", 0)}
    lr: torch.Tensor
    beta1: torch.Tensor

    def __init__(self, params: list[torch.Tensor], members: list[Optimizer], decoupled: bool) -> None:
        super().__init__(params, members)
        self.decoupled = decoupled
        self.beta2 = self.hyper("betas", 1)
        self.eps, self.weight_decay = self.hyper("eps"), self.hyper("weight_decay")
        self.decays = any(self._floats("weight_decay"))
        self.steps = torch.zeros((), device=self.device)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        # the update of torch's capturable Adam, every hyperparameter a member's (K,) tensor:
        # what depends only on the members is computed once, the stacked tensors are passed
        # over as few times as the rule allows (they are many megabytes; the step is bound by
        # memory)
        self.steps.add_(1)
        step_size_neg = -self.lr / (1 - self.beta1**self.steps)
        scale = (1 - self.beta2**self.steps).sqrt() * step_size_neg
        eps, new_avg, new_sq = self.eps / step_size_neg, 1 - self.beta1, 1 - self.beta2
        shrink = 1 - self.lr * self.weight_decay if self.decays and self.decoupled else None
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            grad = p.grad
            if shrink is not None:
                p.mul_(_view(shrink, p))
            elif self.decays:
                grad = torch.addcmul(grad, _view(self.weight_decay, p), p)
            m.lerp_(grad, _view(new_avg, p))
            v.mul_(_view(self.beta2, p)).addcmul_(grad * _view(new_sq, p), grad)
            p.addcdiv_(m, v.sqrt().div_(_view(scale, p)).add_(_view(eps, p)))

    def write_back(self, k: int) -> None:
        optimizer = self.members[k]
        params = optimizer.param_groups[0]["params"]
        for param, m, v in zip(params, self.exp_avg, self.exp_avg_sq, strict=True):
            optimizer.state[param] = {
                "step": self.steps.to("cpu", copy=True),
                "exp_avg": m[k].clone(),
                "exp_avg_sq": v[k].clone(),
            }


def stack_optimizers(params: list[torch.Tensor], members: list[Optimizer]) -> StackedOptimizer:
    """The stacked form of the members' optimizer (all of one type: the group's shape says so)."""
    kind = type(members[0])
    if any(len(optimizer.param_groups) != 1 for optimizer in members):
        raise NotStackable("the optimizer has more than one parameter group")
    if kind is SGD:
        return StackedSGD(params, members)
    if kind in (Adam, AdamW):
        return StackedAdam(params, members, decoupled=kind is AdamW)
    raise NotStackable(f"{kind.__name__} has no stacked form (SGD, Adam and AdamW have)")
