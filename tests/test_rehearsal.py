"""The rehearsal of a run's first GPU uses: every shape the run will take, and nothing of the
run's own state touched (weights, optimizer buffers, random streams)."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CUDA, FAST, training_state
from sweeplab.stacking.loop import Member, fit_stack, stack
from sweeplab.stacking.model import StackedModel
from sweeplab.stacking.rehearsal import stacked as stacked_rehearsal
from sweeplab.training import first_uses, rehearsal
from sweeplab.training.interrupt import SignalGuard
from sweeplab.training.loop import fit

# 600 synthetic samples: 360 train (5 batches of 64, then 40), 90 val (64, 26), 150 test (64, 64, 22)
SHAPED = [*FAST, "model=mlp", "model.dropout=0.25", "trainer.eval_batch_size=64"]


def _rng() -> list[torch.Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])]


def _same(a: object, b: object) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_run_is_rehearsed_on_every_batch_size_and_left_untouched(compose_cfg) -> None:
    cfg = compose_cfg([*SHAPED, "optimizer.momentum=0.9"])
    state, data = training_state(cfg)
    trainer = OmegaConf.to_object(cfg.trainer)
    seen: list[int] = []
    state.model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    before = copy.deepcopy((state.model.state_dict(), state.optimizer.state_dict()))
    rng = _rng()

    rehearsal.solo(state, data, trainer)()

    assert sorted(seen) == [22, 26, 40, 64, 64, 64]  # train, val and test: a full and a last batch each
    assert _same((state.model.state_dict(), state.optimizer.state_dict()), before)
    assert _same(_rng(), rng)
    assert state.model.training  # the run's own model keeps its mode


@pytest.mark.parametrize("norm", [[], ["model.norm=batchnorm"]], ids=["stacked-forms", "vmap"])
def test_a_stack_is_rehearsed_on_its_batch_shapes_and_left_untouched(compose_cfg, monkeypatch, norm) -> None:
    cfgs = [compose_cfg([*SHAPED, *norm, f"seed={seed}", "optimizer.momentum=0.9"]) for seed in range(3)]
    first, data = training_state(cfgs[0])
    states = [first, *(training_state(cfg, loaded=data)[0] for cfg in cfgs[1:])]
    together = stack(states, data.in_features)
    shapes: list[tuple[int, ...]] = []
    forward = StackedModel.__call__

    def recorded(self: StackedModel, x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape[:2]))
        return forward(self, x)

    monkeypatch.setattr(StackedModel, "__call__", recorded)
    params = {name: p.detach().clone() for name, p in together[0].params.items()}
    buffers = {name: b.clone() for name, b in together[0].buffers.items()}  # BatchNorm's statistics
    members = copy.deepcopy([s.model.state_dict() for s in states])
    rng = _rng()

    stacked_rehearsal(together, data, OmegaConf.to_object(cfgs[0].trainer))()

    assert sorted(shapes) == [(3, 40), (3, 64)]
    assert _same({n: p.detach() for n, p in together[0].params.items()}, params)
    assert _same(together[0].buffers, buffers)
    assert together[1].buffers == [None] * len(params)  # no momentum buffer made for the real stack
    assert _same([s.model.state_dict() for s in states], members)
    assert _same(_rng(), rng)


def _raise(error: Exception) -> None:
    raise error


@CUDA
def test_a_rehearsed_cuda_run_trains_as_an_unrehearsed_one(compose_cfg) -> None:
    """Rehearsed in the background thread, as a run does, then trained: the same numbers."""
    cfg = compose_cfg([*SHAPED, "device=cuda"])
    trainer = OmegaConf.to_object(cfg.trainer)
    histories = []
    for rehearsed in (False, True):
        state, data = training_state(cfg, "cuda")
        if rehearsed:
            first_uses.rehearse(rehearsal.solo(state, data, trainer))
            first_uses.wait()
        histories.append(fit(state, data, trainer, lambda rows: None, SignalGuard()))
    assert (histories[0].step_loss == histories[1].step_loss).all()
    assert histories[0].val_acc == histories[1].val_acc


@CUDA
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_rehearsed_cuda_stack_trains_as_an_unrehearsed_one(compose_cfg, optimizer: str) -> None:
    cfgs = [compose_cfg([*SHAPED, "device=cuda", f"optimizer={optimizer}", f"seed={s}"]) for s in range(3)]
    trainer = OmegaConf.to_object(cfgs[0].trainer)
    losses = []
    for rehearsed in (False, True):
        first, data = training_state(cfgs[0], "cuda")
        states = [first, *(training_state(cfg, "cuda", data)[0] for cfg in cfgs[1:])]
        together = stack(states, data.in_features)
        if rehearsed:
            first_uses.rehearse(stacked_rehearsal(together, data, trainer))
            first_uses.wait()
        members = [Member(s, lambda rows: None, _raise) for s in states]
        fit_stack(members, together, data, trainer, SignalGuard())
        losses.append(torch.stack([s.progress.step_loss for s in states]))
    assert torch.equal(losses[0], losses[1])
