"""K same-shaped models trained as one program: stacked weights, one batched step.

Each member is an ordinary model built by the registry (its own seed, so its own initial weights);
``StackedModel`` stacks their parameters along a new leading dimension (``torch.func``'s
``stack_module_state``) and runs every member at once: the registered models through their
``stacked_forward`` (batched matrix products), any other model through its own ``forward`` under
``torch.vmap``; dropout draws different masks per member. ``StackedSGD`` and ``StackedAdam``
step the stacked parameters with per-member hyperparameters read from each member's own optimizer,
by the update rules of ``torch.optim.SGD``, ``Adam`` and ``AdamW``.

``write_back`` copies member ``k``'s slice into its own model and optimizer, which are then what
they would be after the same steps alone: evaluation, checkpoints, figures and model logging use
them as for any run, and a member's checkpoint resumes as a solo run.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state
from torch.optim import SGD, Adam, AdamW, Optimizer


class StackedModel:
    """The members' parameters and buffers as stacked tensors, and their forward, batched.

    A model with a ``stacked_forward(stacked, x)`` method (the registered ones) runs it: batched
    matrix products over the stacked weights (``layers`` knows Linear, LayerNorm, Dropout with each
    member's rate, the activations, Sequential). Any other model, or one with a layer ``layers``
    does not know (BatchNorm), runs its own ``forward`` per member under ``torch.vmap`` (generic,
    slower on CPU); one that vmap cannot run either is ``NotStackable``.
    """

    def __init__(self, members: list[nn.Module], in_features: int) -> None:
        self.members = members
        self.params, self.buffers = stack_module_state(members)
        for name, first in members[0].named_parameters():
            if first.dim() == 2 and first.T.is_contiguous() and not first.is_contiguous():
                # column-major weights (logreg's) stay column-major: their products are faster
                columns = torch.stack([m.get_parameter(name).detach().T for m in members])
                self.params[name] = columns.transpose(1, 2).detach().requires_grad_()
        self.base = copy.deepcopy(members[0]).to("meta")  # the module whose forward every member runs
        self.training = True
        self._rates: dict[str, tuple[torch.Tensor, bool]] = {}
        self._own = getattr(self.base, "stacked_forward", None)
        try:
            self._dry_run(in_features)
        except NotStackable:  # a layer without a stacked form (BatchNorm): the generic way
            if self._own is None:
                raise
            self._own = None
            self._dry_run(in_features)

    def _dry_run(self, in_features: int) -> None:
        """One training-mode forward on zeros, so that a model that cannot be stacked fails
        before any run is opened; the random generators and the buffers are left as they were."""
        device = next(iter(self.params.values())).device
        saved = {name: buffer.clone() for name, buffer in self.buffers.items()}
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self(torch.zeros(len(self.members), 2, in_features, device=device))
        except NotStackable:
            raise
        except Exception as exc:  # what torch.vmap cannot batch (in-place buffer updates...)
            raise NotStackable(
                f"{type(self.members[0]).__name__} cannot run under torch.vmap: {exc}"
            ) from exc
        finally:
            for name, buffer in saved.items():
                self.buffers[name].copy_(buffer)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: one batch per member, ``(K, batch, features)``; logits ``(K, batch, classes)``."""
        if self._own is not None:
            return self._own(self, x)
        self.base.train(self.training)
        return torch.vmap(self._forward_one, randomness="different")(self.params, self.buffers, x)

    def _forward_one(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def param(self, name: str) -> torch.Tensor:
        return self.params[name]

    def sequence(self, module: nn.Module, h: torch.Tensor, prefix: str = "") -> torch.Tensor:
        """``module``'s children, one after another, applied to stacked activations."""
        for name, child in module.named_children():
            h = self.layers(child, f"{prefix}{name}.", h)
        return h

    def layers(self, module: nn.Module, prefix: str, h: torch.Tensor) -> torch.Tensor:
        """``module`` (found at ``prefix`` in every member) applied to stacked activations."""
        kind = type(module)
        if kind is nn.Sequential:
            return self.sequence(module, h, prefix)
        if kind is nn.Linear:
            return linear(h, self.params[f"{prefix}weight"], self.params[f"{prefix}bias"])
        if kind is nn.LayerNorm:
            h = F.layer_norm(h, module.normalized_shape, eps=module.eps)
            return h * self.params[f"{prefix}weight"].unsqueeze(1) + self.params[f"{prefix}bias"].unsqueeze(1)
        if kind is nn.Dropout:
            rates, any_dropped = self._dropout_rates(prefix)
            if not self.training or not any_dropped:
                return h
            keep = 1 - rates.view(-1, 1, 1)
            return h * (torch.rand_like(h) < keep) / keep
        if kind in ELEMENTWISE:
            return module(h)
        raise NotStackable(f"{kind.__name__} ({prefix.rstrip('.')}) has no stacked form")

    def _dropout_rates(self, prefix: str) -> tuple[torch.Tensor, bool]:
        """Each member's own dropout rate at this layer (``model.dropout`` is stackable), and
        whether any member drops out there (known here, so the step never asks the device)."""
        if prefix not in self._rates:
            rates = [float(member.get_submodule(prefix.rstrip(".")).p) for member in self.members]
            device = next(iter(self.params.values())).device
            self._rates[prefix] = (torch.tensor(rates, device=device), any(rates))
        return self._rates[prefix]

    def train(self, mode: bool = True) -> None:
        self.training = mode

    @torch.no_grad()
    def write_back(self, k: int) -> None:
        """Member ``k``'s weights into its own model."""
        member = self.members[k]
        for name, tensor in [*member.named_parameters(), *member.named_buffers()]:
            stacked = self.params.get(name, self.buffers.get(name))
            tensor.copy_(stacked[k])


def linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``h @ weight.T + bias`` per member: ``h`` (K, batch, in), ``weight`` (K, out, in).

    Computed as ``(weight @ h.T).T``: the weights' gradient is then a product with the long
    input dimension as its wide side, about twice as fast on CPU for narrow outputs (10 classes).
    """
    return torch.baddbmm(bias.unsqueeze(2), weight, h.transpose(1, 2)).transpose(1, 2)


ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)


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


class NotStackable(Exception):
    """The group's models or optimizer cannot be trained stacked; its members train one by one."""
