"""Turn the ``device`` config value into a ``torch.device`` that really exists here."""

import re

import torch

from sweeplab.config.errors import ConfigError

_VALID = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must be available."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device=mps is not available on this machine: use device=auto or device=cpu.")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise ConfigError(f"device={spec!r} is invalid: expected one of {_VALID}.")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device={spec} was requested but no CUDA GPU is available "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): "
            "use device=auto or device=cpu."
        )
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={spec} is invalid: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}."
        )
    return torch.device("cuda", index)
