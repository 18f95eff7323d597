"""The warm-up thread's first uses of the GPU leave a run's results alone."""

import pytest
import torch

from conftest import CUDA
from sweeplab.training import first_uses


def _rng_states() -> list[torch.Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])]


def _draws_nothing(device: torch.device) -> None:
    torch.manual_seed(0)
    before = _rng_states()
    first_uses._prepare(device)
    assert all(torch.equal(a, b) for a, b in zip(_rng_states(), before, strict=True))


def test_the_warmup_draws_no_random_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """What it runs, run on CPU (no context to create): a seeded run's streams are untouched."""
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    _draws_nothing(torch.device("cpu"))


@CUDA
def test_the_cuda_warmup_draws_no_random_numbers() -> None:
    torch.cuda.init()
    _draws_nothing(torch.device("cuda"))
