"""Model registry and the built-in models: multinomial logistic regression and an MLP.

Every model takes ``(in_features, n_classes)`` positionally and its YAML keys as keyword-only
arguments, and lists in ``representation_layers`` the submodules whose outputs are hidden
representations worth plotting (read with forward hooks, see ``sweeplab.tracking.representations``).
"""

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from sweeplab.config.errors import ConfigError, require
from sweeplab.config.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
NORMS: dict[str, type[nn.Module] | None] = {
    "none": None,
    "layernorm": nn.LayerNorm,
    "batchnorm": nn.BatchNorm1d,
}


@MODELS.register("logreg")
class LogisticRegression(nn.Module):
    """Multiclass logistic regression: logits = x W + b, W xavier-uniform, b zeros.

    W has shape (in_features, n_classes) but is stored column-major, the layout ``nn.Linear``
    uses: on CPU that makes ``x @ W`` and its gradient about twice as fast for 10 classes.
    """

    representation_layers: tuple[str, ...] = ()

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.W = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_classes, in_features).T))
        self.b = nn.Parameter(torch.zeros(n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, x.flatten(1), self.W)


@MODELS.register("mlp")
class MLP(nn.Sequential):
    """Fully connected network: ``hidden{i}`` = Linear -> [norm] -> activation -> Dropout, then
    ``output``. ``norm`` is none, layernorm or batchnorm (over each hidden layer's units); with
    batchnorm only the last hidden layer drops out."""

    def __init__(
        self,
        in_features: int,
        n_classes: int,
        *,
        hidden_dims: Sequence[int] = (256, 100),
        activation: str = "relu",
        dropout: float = 0.25,
        norm: str = "none",
    ) -> None:
        require(0.0 <= dropout < 1.0, "model.dropout", dropout, "a probability in [0, 1)")
        require(
            all(width > 0 for width in hidden_dims),
            "model.hidden_dims",
            list(hidden_dims),
            "a list of positive layer widths",
        )
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.activation={activation!r} is invalid: expected one of {sorted(ACTIVATIONS)}."
            )
        if norm not in NORMS:
            raise ConfigError(f"model.norm={norm!r} is invalid: expected one of {sorted(NORMS)}.")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width_in = in_features
        for i, width in enumerate(hidden_dims, start=1):
            normalization = [NORMS[norm](width)] if NORMS[norm] else []
            # Dropout feeding a BatchNorm shifts the variance its running statistics see between
            # training and evaluation (Li et al., CVPR 2019): with batchnorm, drop after the last
            # normalized layer only.
            last = i == len(hidden_dims)
            rate = dropout if norm != "batchnorm" or last else 0.0
            layers[f"hidden{i}"] = nn.Sequential(
                nn.Linear(width_in, width), *normalization, ACTIVATIONS[activation](), nn.Dropout(rate)
            )
            width_in = width
        layers["output"] = nn.Linear(width_in, n_classes)
        super().__init__(layers)
        self.representation_layers = tuple(name for name in layers if name != "output")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))
