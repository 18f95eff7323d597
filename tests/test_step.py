"""The training step: eager, or captured as a CUDA graph and replayed.

On CPU, ``Replayed`` stands in for CUDA graphs with their semantics (capture records without
running; a replay runs the recorded step on whatever the captured buffers hold), so the
bookkeeping around a graph is checked here; the CUDA tests at the end need a GPU.
"""

import logging
import signal
from collections.abc import Callable
from functools import partial

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from sweeplab import train as train_module
from sweeplab.data import load_data
from sweeplab.errors import ConfigError
from sweeplab.interrupt import Interrupted, SignalGuard
from sweeplab.models import MODELS
from sweeplab.optimizers import OPTIMIZERS
from sweeplab.schedulers import SCHEDULERS
from sweeplab.seeding import seed_everything
from sweeplab.state import Progress, TrainingState
from sweeplab.step import EagerStep, GraphCaptureError, GraphStep, Step, make_capturable, make_step
from sweeplab.train import fit, steps_per_epoch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Replayed:
    """A CUDA graph's contract on CPU: ``capture`` only records, ``replay`` reruns the record."""

    def __init__(self) -> None:
        self.warmups = self.captures = self.replays = 0

    def warm_up(self, step: Callable[[], None]) -> None:
        self.warmups += 1
        step()

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        self.captures += 1

        def replay() -> None:
            self.replays += 1
            step()

        return replay


class CannotCapture(Replayed):
    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        raise RuntimeError("operation not permitted when stream is capturing")


class StopAfter(SignalGuard):
    """A SIGINT that arrives after ``steps`` steps."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.left = steps

    def raise_if_requested(self) -> None:
        self.left -= 1
        if self.left == 0:
            raise Interrupted(signal.SIGINT, clean=True)


def _state(cfg: DictConfig, device: str = "cpu") -> tuple[TrainingState, object]:
    """What ``sweeplab.phases.build`` makes, without a run around it."""
    generator = seed_everything(cfg.seed)
    data = load_data(cfg.data, torch.device(device))
    trainer = OmegaConf.to_object(cfg.trainer)
    model = MODELS.build(cfg.model, data.in_features, len(data.classes)).to(device)
    optimizer = OPTIMIZERS.build(cfg.optimizer, model.parameters())
    per_epoch = steps_per_epoch(len(data.train), trainer)
    scheduler = SCHEDULERS.build(cfg.scheduler, optimizer, per_epoch * trainer.epochs, per_epoch)
    progress = Progress.start(per_epoch * trainer.epochs, torch.device(device))
    return TrainingState(model, optimizer, scheduler, generator, progress), data


def _steps(cfg: DictConfig, recorder: Replayed | None = None) -> tuple[TrainingState, Callable[[str], Step]]:
    """The training state ``cfg`` builds, and ``make_step`` for it by ``trainer.cuda_graph`` value."""
    state, data = _state(cfg)

    def steps(setting: str) -> Step:
        return make_step(setting, state.model, state.optimizer, state.scheduler, data.train, 64, recorder)

    return state, steps


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


def _fit(cfg: DictConfig, recorder: Replayed | None, monkeypatch: pytest.MonkeyPatch, stop=None):
    state, data = _state(cfg)
    rows: list = []
    if recorder is not None:
        monkeypatch.setattr(train_module, "make_step", partial(make_step, recorder=recorder))
    history = fit(state, data, OmegaConf.to_object(cfg.trainer), rows.extend, stop or SignalGuard())
    return state, history, rows


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_replayed_step_trains_exactly_like_eager_fused_steps(
    compose_cfg, monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    """Two warm-up steps, one capture, replays of every full batch, eager steps for each epoch's
    smaller last batch, the cosine schedule read through the lr tensor: the same numbers, to the
    bit, as eager steps with the same fused kernels; and close to the default (foreach) kernels."""
    cfg = compose_cfg([*SMALL, f"optimizer={optimizer}", "trainer.cuda_graph=true"])
    recorder = Replayed()
    graphed, graphed_history, graphed_rows = _fit(cfg, recorder, monkeypatch)
    assert (recorder.warmups, recorder.captures, recorder.replays) == (2, 1, 3 * 21 - 2)

    monkeypatch.setattr(train_module, "make_step", lambda *a, **k: _fused_eager(*a, **k))
    fused, fused_history, fused_rows = _fit(cfg, None, monkeypatch)
    assert (graphed_history.step_loss == fused_history.step_loss).all()
    assert _without_timings(graphed_rows) == _without_timings(fused_rows)  # every logged number
    for a, b in zip(graphed.model.parameters(), fused.model.parameters(), strict=True):
        assert torch.equal(a, b)

    monkeypatch.undo()
    cfg.trainer.cuda_graph = "false"
    _, eager_history, _ = _fit(cfg, None, monkeypatch)
    assert eager_history.val_acc == pytest.approx(graphed_history.val_acc, abs=0.02)


def _fused_eager(setting, model, optimizer, scheduler, train, batch_size) -> EagerStep:
    make_capturable(optimizer, train.x.device)
    return EagerStep(model, optimizer, train)


def _without_timings(rows: list) -> list:
    return [(s, {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))}) for s, m in rows]


def test_interrupted_between_replays_resumes_to_the_uninterrupted_result(
    compose_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop part-way through an epoch saves exactly that step; restored, the step is captured
    again and training ends where an uninterrupted run ends."""
    cfg = compose_cfg([*SMALL, "trainer.cuda_graph=true"])
    full, full_history, _ = _fit(cfg, Replayed(), monkeypatch)

    state, data = _state(cfg)
    monkeypatch.setattr(train_module, "make_step", partial(make_step, recorder=Replayed()))
    trainer = OmegaConf.to_object(cfg.trainer)
    with pytest.raises(Interrupted):
        fit(state, data, trainer, lambda rows: None, StopAfter(20))
    assert state.progress.step == 20
    saved = state.state_dict()

    restored, data = _state(cfg)
    restored.load_state_dict(saved)
    recorder = Replayed()
    monkeypatch.setattr(train_module, "make_step", partial(make_step, recorder=recorder))
    history = fit(restored, data, trainer, lambda rows: None, SignalGuard())
    assert recorder.captures == 1
    assert (history.step_loss == full_history.step_loss).all()
    for a, b in zip(restored.model.parameters(), full.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_step_that_cannot_be_captured_trains_eagerly_under_auto_and_fails_under_true(
    compose_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    state, steps = _steps(compose_cfg([*SMALL, "trainer.epochs=1"]), CannotCapture())
    step = steps("auto")
    before = [p.clone() for p in state.model.parameters()]
    with caplog.at_level(logging.WARNING, "sweeplab.step"):
        for i in range(4):
            loss, _ = step(torch.arange(i * 64, (i + 1) * 64))
    assert isinstance(step, GraphStep) and step.failed and torch.isfinite(loss)
    assert "could not be captured, training eagerly: operation not permitted" in caplog.text
    assert not any(torch.equal(a, b) for a, b in zip(before, state.model.parameters(), strict=True))

    step = steps("true")
    with pytest.raises(
        GraphCaptureError, match="trainer.cuda_graph=true: the training step could not be captured"
    ):
        for i in range(3):
            step(torch.arange(i * 64, (i + 1) * 64))


def test_a_schedule_that_cycles_momentum_is_not_captured(
    compose_cfg, caplog: pytest.LogCaptureFixture
) -> None:
    """One-cycle sets the momentum every step; a graph would keep the captured value."""
    _, steps = _steps(compose_cfg([*SMALL, "scheduler=onecycle"]), Replayed())
    with caplog.at_level(logging.INFO, "sweeplab.step"):
        assert isinstance(steps("auto"), EagerStep)
    assert "OneCycleLR changes the momentum every step" in caplog.text
    with pytest.raises(ConfigError, match="use trainer.cuda_graph=auto or false"):
        steps("true")


def test_auto_is_eager_off_cuda_and_true_needs_cuda(compose_cfg) -> None:
    _, steps = _steps(compose_cfg([*SMALL]))
    assert isinstance(steps("auto"), EagerStep)
    assert isinstance(steps("false"), EagerStep)
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
        state, data = _state(cfg, "cuda")
        results[setting] = fit(
            state, data, OmegaConf.to_object(cfg.trainer), lambda rows: None, SignalGuard()
        )
    assert results["true"].val_acc == pytest.approx(results["false"].val_acc, abs=0.03)


@CUDA
def test_cuda_graph_runs_are_deterministic(compose_cfg) -> None:
    cfg = compose_cfg([*SMALL, "model=mlp", "trainer.cuda_graph=true", "device=cuda"])
    losses = []
    for _ in range(2):
        state, data = _state(cfg, "cuda")
        losses.append(
            fit(state, data, OmegaConf.to_object(cfg.trainer), lambda rows: None, SignalGuard()).step_loss
        )
    assert (losses[0] == losses[1]).all()
