"""K same-shaped models run as one: stacked weights, one batched forward.

Each member is an ordinary model built by the registry (its own seed, so its own initial weights);
``StackedModel`` stacks their parameters along a new leading dimension (``torch.func``'s
``stack_module_state``) and runs every member at once: a model type with a stacked form
(``STACKED_FORMS``, filled with ``@stacked_form``; the built-in models' are at the end of this
module) through batched matrix products, any other model through its own ``forward`` under
``torch.vmap``; dropout draws different masks per member.

``write_back`` copies member ``k``'s slice into its own model, which is then what it would be
after the same steps alone: evaluation, checkpoints, figures and model logging use it as for
any run, and a member's checkpoint resumes as a solo run.
"""

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from sweeplab.models import MLP, LogisticRegression


class StackedModel:
    """The members' parameters and buffers as stacked tensors, and their forward, batched.

    A model whose type has a stacked form runs it: batched matrix products over the stacked
    weights (``layers`` knows Linear, LayerNorm, Dropout with each member's rate, the
    activations, Sequential). Any other model, or one with a layer ``layers`` does not know
    (BatchNorm), runs its own ``forward`` per member under ``torch.vmap`` (generic, slower on
    CPU); one that vmap cannot run either is ``NotStackable``.
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
        self._own = _form_of(type(self.base))
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


class NotStackable(Exception):
    """The group's models or optimizer cannot be trained stacked; its members train one by one."""


StackedForm = Callable[[StackedModel, torch.Tensor], torch.Tensor]
STACKED_FORMS: dict[type[nn.Module], StackedForm] = {}


def stacked_form(kind: type[nn.Module]) -> Callable[[StackedForm], StackedForm]:
    """Register how every member of a stack of ``kind`` (and its subclasses) runs at once:
    ``form(stacked, x)`` with ``x`` of shape (members, batch, features)."""

    def register(form: StackedForm) -> StackedForm:
        STACKED_FORMS[kind] = form
        return form

    return register


def _form_of(kind: type) -> StackedForm | None:
    return next((STACKED_FORMS[base] for base in kind.__mro__ if base in STACKED_FORMS), None)


@stacked_form(LogisticRegression)
def _logistic_regression(stacked: StackedModel, x: torch.Tensor) -> torch.Tensor:
    return linear(x, stacked.param("W").transpose(1, 2), stacked.param("b"))


@stacked_form(MLP)
def _mlp(stacked: StackedModel, x: torch.Tensor) -> torch.Tensor:
    return stacked.sequence(stacked.base, x)
