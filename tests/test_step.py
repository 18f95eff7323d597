"""The training step: eager, or captured as a CUDA graph and replayed.

On CPU, ``FrozenGraphs`` stands in for CUDA graphs with their semantics (a capture records the
step's ops without running them; a replay reruns those ops and no Python), so the bookkeeping
around a graph is checked here; the CUDA tests at the end need a GPU.
"""

import logging
import signal
from collections.abc import Callable
from functools import partial

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from conftest import CUDA, host_never_waits, training_state
from frozen_graphs import CannotCapture, FrozenGraphs
from sweeplab.config.errors import ConfigError
from sweeplab.data import Data
from sweeplab.training import loop as train_module
from sweeplab.training.interrupt import Interrupted, SignalGuard
from sweeplab.training.loop import fit
from sweeplab.training.state import TrainingState
from sweeplab.training.steps import (
    EagerStep,
    GraphCaptureError,
    GraphSteps,
    RatedStep,
    Steps,
    make_capturable,
    make_steps,
)


class StopAfter(SignalGuard):
    """A SIGINT that arrives after ``steps`` steps."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.left = steps

    def raise_if_requested(self) -> None:
        self.left -= 1
        if self.left == 0:
            raise Interrupted(signal.SIGINT, clean=True)


def _steps(
    cfg: DictConfig, recorder: FrozenGraphs | None = None, device: str = "cpu"
) -> tuple[TrainingState, Data, Callable[[str], Steps]]:
    """The training state and data ``cfg`` builds, and ``make_steps`` for them by
    ``trainer.cuda_graph`` value."""
    state, data = training_state(cfg, device)
    progress = state.progress

    def steps(setting: str) -> Steps:
        return make_steps(
            setting,
            state.model,
            state.optimizer,
            state.scheduler,
            data.train,
            64,
            progress.step_loss,
            progress.step_acc,
            recorder,
        )

    return state, data, steps


# 1400 training samples (1500 minus 100 for validation) in batches of 64: 21 full batches and a
# last one of 56 per epoch
SMALL = [
    "data=synthetic",
    "data.n_samples=2000",
    "data.val_size=100",
    "trainer.epochs=3",
    "trainer.batch_size=64",
    "trainer.log_every_n_steps=4",
    "scheduler=cosine",
]


def _fit(cfg: DictConfig, recorder: FrozenGraphs | None, monkeypatch: pytest.MonkeyPatch, stop=None):
    state, data = training_state(cfg)
    rows: list = []
    if recorder is not None:
        monkeypatch.setattr(train_module, "make_steps", partial(make_steps, recorder=recorder))
    history = fit(state, data, OmegaConf.to_object(cfg.trainer), rows.extend, stop or SignalGuard())
    return state, history, rows


def test_the_cpu_stand_in_replays_the_captured_ops_and_no_python() -> None:
    """What the step tests rely on: a value Python computes is frozen at capture, the captured
    tensors are what replays read and write, a capture changes nothing, a host sync fails."""
    total, counter = torch.zeros(()), [1.0]

    def step() -> None:
        total.add_(counter[0])
        counter[0] *= 10

    graphs = FrozenGraphs()
    replay = graphs.capture(step)
    assert total.item() == 0
    replay()
    replay()
    assert total.item() == 1 + 1  # eager steps would add 1 + 10: Python ran once, at capture
    with pytest.raises(RuntimeError, match="host sync"):
        graphs.capture(lambda: total.item())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_replayed_step_trains_exactly_like_eager_fused_steps(
    compose_cfg, monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    """Two warm-up steps, one capture, replays of every full batch, eager steps for each epoch's
    smaller last batch, the cosine schedule read through the lr tensor: the same numbers, to the
    bit, as eager steps with the same fused kernels; and close to the default (foreach) kernels."""
    cfg = compose_cfg([*SMALL, f"optimizer={optimizer}", "trainer.cuda_graph=true"])
    recorder = FrozenGraphs()
    graphed, graphed_history, graphed_rows = _fit(cfg, recorder, monkeypatch)
    assert (recorder.warmups, recorder.captures, recorder.replays) == (2, 1, 3 * 21 - 2)

    monkeypatch.setattr(train_module, "make_steps", lambda *a, **k: _fused_eager(*a, **k))
    fused, fused_history, fused_rows = _fit(cfg, None, monkeypatch)
    assert (graphed_history.step_loss == fused_history.step_loss).all()
    assert _without_timings(graphed_rows) == _without_timings(fused_rows)  # every logged number
    for a, b in zip(graphed.model.parameters(), fused.model.parameters(), strict=True):
        assert torch.equal(a, b)

    monkeypatch.undo()
    cfg.trainer.cuda_graph = "false"
    _, eager_history, _ = _fit(cfg, None, monkeypatch)
    assert eager_history.val_acc == pytest.approx(graphed_history.val_acc, abs=0.02)


def _fused_eager(setting, model, optimizer, scheduler, train, batch_size, losses, accs) -> Steps:
    rates = make_capturable(optimizer, train.x.device)
    return Steps(
        RatedStep(EagerStep(model, optimizer, train), rates), batch_size, losses, accs, rates.refresh
    )


def _without_timings(rows: list) -> list:
    return [(s, {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))}) for s, m in rows]


def test_interrupted_between_replays_resumes_to_the_uninterrupted_result(
    compose_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop part-way through an epoch saves exactly that step; restored, the step is captured
    again and training ends where an uninterrupted run ends."""
    cfg = compose_cfg([*SMALL, "trainer.cuda_graph=true"])
    full, full_history, _ = _fit(cfg, FrozenGraphs(), monkeypatch)

    state, data = training_state(cfg)
    monkeypatch.setattr(train_module, "make_steps", partial(make_steps, recorder=FrozenGraphs()))
    trainer = OmegaConf.to_object(cfg.trainer)
    with pytest.raises(Interrupted):
        fit(state, data, trainer, lambda rows: None, StopAfter(20))
    assert state.progress.step == 20
    saved = state.state_dict()

    restored, data = training_state(cfg)
    restored.load_state_dict(saved)
    recorder = FrozenGraphs()
    monkeypatch.setattr(train_module, "make_steps", partial(make_steps, recorder=recorder))
    history = fit(restored, data, trainer, lambda rows: None, SignalGuard())
    assert recorder.captures == 1
    assert (history.step_loss == full_history.step_loss).all()
    for a, b in zip(restored.model.parameters(), full.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_graphed_run_keeps_float_learning_rates_for_its_schedule_and_checkpoints(
    compose_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replays read device tensors, but the param groups the schedule sets and a checkpoint
    saves hold floats, as an eager run's; a checkpoint saved with tensor rates (by an earlier
    version) is made a float again on resume."""
    cfg = compose_cfg([*SMALL, "trainer.cuda_graph=true", "trainer.epochs=1"])
    state, _, _ = _fit(cfg, FrozenGraphs(), monkeypatch)
    group = state.optimizer.state_dict()["param_groups"][0]
    assert type(group["lr"]) is float and group["lr"] == state.scheduler.get_last_lr()[0]

    group = state.optimizer.param_groups[0]
    group["lr"] = torch.tensor(0.005)
    rates = make_capturable(state.optimizer, torch.device("cpu"))
    assert type(group["lr"]) is float and rates.tensors[0].item() == pytest.approx(0.005)


def test_a_step_that_cannot_be_captured_trains_eagerly_under_auto_and_fails_under_true(
    compose_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    state, _, steps = _steps(compose_cfg([*SMALL, "trainer.epochs=1"]), CannotCapture())
    step = steps("auto")
    order = torch.arange(1400)  # the 1400 training samples in order
    before = [p.clone() for p in state.model.parameters()]
    step.begin(order, 0, 0)
    with caplog.at_level(logging.WARNING, "sweeplab.training.steps"):
        for i in range(4):
            step(i, i)
    assert isinstance(step, GraphSteps) and step.failed
    losses = state.progress.step_loss[:5]
    assert torch.isfinite(losses[:4]).all() and (losses[:4] > 0).all() and losses[4] == 0  # each its own
    assert "could not be captured, training eagerly: operation not permitted" in caplog.text
    assert not any(torch.equal(a, b) for a, b in zip(before, state.model.parameters(), strict=True))

    step = steps("true")
    step.begin(order, 0, 0)
    with pytest.raises(
        GraphCaptureError, match="trainer.cuda_graph=true: the training step could not be captured"
    ):
        for i in range(3):
            step(i, i)


def test_a_schedule_that_cycles_momentum_is_not_captured(
    compose_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    """One-cycle sets the momentum every step; a graph would keep the captured value."""
    _, _, steps = _steps(compose_cfg([*SMALL, "scheduler=onecycle"]), FrozenGraphs())
    with caplog.at_level(logging.INFO, "sweeplab.training.steps"):
        assert type(steps("auto")) is Steps  # eager
    assert "OneCycleLR changes the momentum every step" in caplog.text
    with pytest.raises(ConfigError, match="use trainer.cuda_graph=auto or false"):
        steps("true")


def test_auto_is_eager_off_cuda_and_true_needs_cuda(compose_cfg) -> None:
    _, _, steps = _steps(compose_cfg([*SMALL]))
    assert type(steps("auto")) is Steps  # eager
    assert type(steps("false")) is Steps
    with pytest.raises(ConfigError, match="trainer.cuda_graph=true needs a CUDA device, not cpu"):
        steps("true")


@CUDA
@pytest.mark.parametrize("model", ["logreg", "mlp"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("scheduler", ["none", "cosine", "step"])
def test_cuda_graph_captures_every_registered_model_optimizer_and_schedule(
    compose_cfg, monkeypatch: pytest.MonkeyPatch, model: str, optimizer: str, scheduler: str
) -> None:
    """Which combinations a graph supports is decided here: each captures, and trains like eager."""
    overrides = [*SMALL, f"model={model}", f"optimizer={optimizer}", f"scheduler={scheduler}", "device=cuda"]
    cfg = compose_cfg(overrides)
    results = {}
    for setting in ("true", "false"):
        cfg.trainer.cuda_graph = setting
        state, data = training_state(cfg, "cuda")
        results[setting] = fit(
            state, data, OmegaConf.to_object(cfg.trainer), lambda rows: None, SignalGuard()
        )
    assert results["true"].val_acc == pytest.approx(results["false"].val_acc, abs=0.03)


@CUDA
def test_cuda_graph_runs_are_deterministic(compose_cfg) -> None:
    cfg = compose_cfg([*SMALL, "model=mlp", "trainer.cuda_graph=true", "device=cuda"])
    losses = []
    for _ in range(2):
        state, data = training_state(cfg, "cuda")
        losses.append(
            fit(state, data, OmegaConf.to_object(cfg.trainer), lambda rows: None, SignalGuard()).step_loss
        )
    assert (losses[0] == losses[1]).all()


@CUDA
def test_cuda_graph_replays_and_their_schedule_never_make_the_host_wait(compose_cfg) -> None:
    """Between replays the host only queues work; a step that waited for the GPU would add the
    replay's whole time to every step's Python instead of overlapping them."""
    cfg = compose_cfg([*SMALL, "model=mlp", "device=cuda"])  # a cosine schedule: a new lr every step
    state, data, steps = _steps(cfg, device="cuda")
    step = steps("true")
    step.begin(torch.randperm(len(data.train), device="cuda"), 0, 0)

    def train_on(i: int) -> None:
        step(i, i)
        state.scheduler.step()

    for i in range(3):  # two warm-ups, then the capture (which synchronizes)
        train_on(i)
    with host_never_waits():
        for i in range(3, 21):
            train_on(i)
