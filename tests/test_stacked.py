"""Stacked sweeps: same-shaped jobs trained as one program, each recorded as an ordinary run."""

import os
import re
import signal
import subprocess
import warnings
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CUDA, SWEEPLAB, host_never_waits, run_cli, training_state
from frozen_graphs import FrozenGraphs
from sweeplab.data import Data, load_data
from sweeplab.models import MLP, MODELS
from sweeplab.optimizers import OPTIMIZERS
from sweeplab.schedulers import SCHEDULERS
from sweeplab.stacking import loop as stacked_train
from sweeplab.stacking.grouping import group, stackable
from sweeplab.stacking.loop import Member, fit_stack, make_stacked_steps, stack
from sweeplab.stacking.model import NotStackable, StackedModel
from sweeplab.stacking.optimizers import stack_optimizers
from sweeplab.sweep.summary import objective_vs
from sweeplab.training.interrupt import SignalGuard
from sweeplab.training.loop import evaluate

STACKED = ["-m", "hydra/launcher=stacked"]
FORK = ["-m", "hydra/launcher=fork", "hydra.launcher.n_jobs=2"]
# digits: 1187 training images in 19 batches of 64 (the last one smaller), logged every 5 steps
SMALL = ["data=digits", "trainer.epochs=3", "trainer.log_every_n_steps=5", "device=cpu"]
QUIET = ["tracking.figures=false", "tracking.log_model=false"]


def _children(uri: str) -> dict[str, mlflow.entities.Run]:
    """Every sweep child by its own overrides, without those that only change what is logged."""
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
    return {
        " ".join(o for o in r.data.tags["sweeplab.overrides"].split() if not o.startswith("tracking.")): r
        for r in runs
        if "mlflow.parentRunId" in r.data.tags
    }


def _sweep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)
    result = run_cli(args, cwd=cwd, env={"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_stackable_keys_are_seed_dropout_and_optimizer_and_scheduler_values() -> None:
    assert all(
        map(stackable, ["seed", "model.dropout", "optimizer.lr", "optimizer.betas", "scheduler.gamma"])
    )
    assert not any(
        map(
            stackable,
            ["optimizer.name", "scheduler.name", "model.hidden_dims", "trainer.batch_size", "data.name"],
        )
    )


def test_a_mixed_sweep_splits_by_model_into_two_stacks_of_four(compose_cfg) -> None:
    configs = [
        compose_cfg([f"model={model}", f"optimizer.lr={lr}", f"seed={seed}"])
        for model in ["logreg", "mlp"]
        for lr in [0.1, 0.01]
        for seed in [0, 1]
    ]
    assert group(configs) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    tracking_only = compose_cfg(["model=logreg", "tracking.figures=false"])
    assert group([configs[0], tracking_only]) == [[0, 1]]  # what is logged never splits a stack


@pytest.mark.parametrize("scheduler", ["none", "onecycle"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_stack_steps_each_member_as_its_own_optimizer_would(
    compose_cfg, optimizer: str, scheduler: str
) -> None:
    """Members with their own init, lr, momentum/betas and weight decay: after 5 steps each
    member's weights and optimizer state equal those of its own model and torch optimizer, also
    under one-cycle, which sets each member's lr and momentum (Adam's first beta) every step."""
    extra = {"sgd": ["optimizer.nesterov=true"], "adam": [], "adamw": []}[optimizer]
    momentum = "optimizer.momentum=0.5" if optimizer == "sgd" else "optimizer.betas=[0.8,0.99]"
    common = ["model=mlp", "model.dropout=0", f"optimizer={optimizer}", f"scheduler={scheduler}"]
    peak = ["scheduler.max_lr=0.02"] if scheduler == "onecycle" else []  # a schedule of its own
    configs = [
        compose_cfg([*common, "optimizer.lr=0.05", *extra]),
        compose_cfg([*common, "optimizer.lr=0.01", momentum, *peak]),
        compose_cfg([*common, "optimizer.weight_decay=0.1"]),
    ]

    def members() -> tuple[list[torch.nn.Module], list[torch.optim.Optimizer], list]:
        models = []
        for seed, cfg in enumerate(configs):
            torch.manual_seed(seed)
            models.append(MODELS.build(cfg.model, 20, 3))
        optimizers = [
            OPTIMIZERS.build(c.optimizer, m.parameters()) for c, m in zip(configs, models, strict=True)
        ]
        schedules = [SCHEDULERS.build(c.scheduler, o, 5, 5) for c, o in zip(configs, optimizers, strict=True)]
        return models, optimizers, schedules

    x, y = torch.randn(3, 32, 20), torch.randint(0, 3, (3, 32))
    solo, solo_optimizers, solo_schedules = members()
    for _ in range(5):
        for model, opt, schedule, xk, yk in zip(solo, solo_optimizers, solo_schedules, x, y, strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xk), yk).backward()
            opt.step()
            schedule.step()
    models, optimizers, schedules = members()
    stacked = StackedModel(models, 20)
    stepper = stack_optimizers(list(stacked.params.values()), optimizers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        for _ in range(5):
            stepper.refresh()
            losses = torch.nn.functional.cross_entropy(stacked(x).transpose(1, 2), y, reduction="none").mean(
                1
            )
            stepper.zero_grad()
            losses.sum().backward()
            stepper.step()
            for schedule in schedules:
                schedule.step()
    for k in range(3):
        stacked.write_back(k)
        stepper.write_back(k)
        for a, b in zip(solo[k].parameters(), models[k].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for p_solo, p in zip(solo[k].parameters(), models[k].parameters(), strict=True):
            for key, value in solo_optimizers[k].state[p_solo].items():
                torch.testing.assert_close(optimizers[k].state[p][key], value, rtol=1e-4, atol=1e-5)


def test_members_match_solo_runs_and_carry_the_whole_record(
    tmp_path: Path, compose_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every member of a 4-member stack (logreg; MLP without dropout) starts from the solo run's
    weights and sees its batches (the same first logged loss) and ends within 0.002 test accuracy
    of it; each has its own run with figures, a model that loads back and reproduces its test
    accuracy, checkpoints and the stack's tags. (With dropout: ``test_mnist.py``.)"""
    logreg = ["model=logreg", "optimizer.lr=0.1,0.03", "seed=0,1", *SMALL]
    mlp = ["model=mlp", "model.dropout=0", "optimizer.lr=0.1,0.03", "seed=0,1", *SMALL]
    stacked_dir, solo_dir = tmp_path / "stacked", tmp_path / "solo"
    for grid in (logreg, mlp):
        out = _sweep([*STACKED, *grid], stacked_dir).stdout
        assert "as 1 stack(s)" in out and "4 member(s)" in out
        _sweep([*FORK, *grid, *QUIET], solo_dir)
    stacked, solo = (
        _children(f"sqlite:///{stacked_dir / 'mlflow.db'}"),
        _children(f"sqlite:///{solo_dir / 'mlflow.db'}"),
    )
    assert len(stacked) == 8 and stacked.keys() == solo.keys()
    client = mlflow.MlflowClient(f"sqlite:///{stacked_dir / 'mlflow.db'}")
    solo_client = mlflow.MlflowClient(f"sqlite:///{solo_dir / 'mlflow.db'}")
    for overrides, run in stacked.items():
        alone = solo[overrides]
        first = client.get_metric_history(run.info.run_id, "train/loss")[0]
        first_alone = solo_client.get_metric_history(alone.info.run_id, "train/loss")[0]
        assert first.step == first_alone.step == 5
        assert first.value == pytest.approx(first_alone.value, abs=1e-5)  # same weights, same batches
        assert run.data.metrics["test/acc"] == pytest.approx(alone.data.metrics["test/acc"], abs=0.002)
        assert run.data.tags["sweeplab.stack_size"] == "4" and run.data.tags["sweeplab.stack"]
        assert run.data.tags["sweeplab.config_hash"] == alone.data.tags["sweeplab.config_hash"]
        assert run.data.params == alone.data.params | {
            "tracking.figures": "True",
            "tracking.log_model": "True",
        }
    (run,) = [r for o, r in stacked.items() if "model=mlp" in o and "lr=0.03" in o and "seed=1" in o]
    figures = {Path(a.path).stem for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"samples", "curves", "pca_input", "pca_hidden1", "pca_hidden2", "confusion_matrix"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {".hydra", "config", "figures"}
    checkpoints = sorted(p.name for p in Path(run.data.tags["sweeplab.checkpoint_dir"]).iterdir())
    assert "best.pt" in checkpoints and "epoch3-step57.pt" in checkpoints  # 19 steps per epoch
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{stacked_dir / 'mlflow.db'}")
    loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert isinstance(loaded, MLP)
    data = load_data(compose_cfg(["data=digits"]).data, torch.device("cpu"))
    assert evaluate(loaded, data.test, 8192).acc == pytest.approx(run.data.metrics["test/acc"], abs=1e-6)


def test_a_diverging_member_fails_alone(tmp_path: Path) -> None:
    grid = ["model=mlp", "model.dropout=0", "optimizer.lr=0.05,1e6,0.01", *SMALL, *QUIET]
    result = _sweep([*STACKED, *grid], tmp_path)
    children = {
        r.data.params["optimizer.lr"]: r for r in _children(f"sqlite:///{tmp_path / 'mlflow.db'}").values()
    }
    assert {lr: r.info.status for lr, r in children.items()} == {
        "0.05": "FINISHED",
        "1000000.0": "FAILED",
        "0.01": "FINISHED",
    }
    assert re.match(
        r"DivergedError: train/loss became non-finite at step 5",
        children["1000000.0"].data.tags["sweeplab.failure"],
    )
    assert "job failed, the sweep goes on: DivergedError" in result.stdout
    assert (
        len(
            mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
                children["0.01"].info.run_id, "val/acc"
            )
        )
        == 3
    )


def test_an_interrupted_stack_checkpoints_every_member_and_a_rerun_finishes_them(tmp_path: Path) -> None:
    sweep = [*STACKED, "model=logreg", "optimizer.lr=0.1,0.03", "data=synthetic", "data.n_samples=40000"]
    sweep += ["trainer.batch_size=16", "trainer.epochs=3", "device=cpu", *QUIET]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    process = subprocess.Popen(
        [str(SWEEPLAB), *sweep],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "epoch 1/3" in line:
            process.send_signal(signal.SIGINT)
            break
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 130, "".join(seen) + rest
    children = _children(env["MLFLOW_TRACKING_URI"])
    assert {r.info.status for r in children.values()} == {"KILLED"}
    assert all("checkpoint: " in r.data.tags["sweeplab.stopped"] for r in children.values())

    rerun = _sweep(sweep, tmp_path)
    assert rerun.stdout.count("resuming run") == 2
    after = _children(env["MLFLOW_TRACKING_URI"])
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    assert {r.info.run_id for r in after.values()} == {r.info.run_id for r in children.values()}


def test_a_mixed_sweep_trains_two_stacks_and_summarises_each_config_over_its_seeds(tmp_path: Path) -> None:
    """``model=logreg,mlp optimizer.lr=0.1,0.01 seed=0,1``: two stacks of four; the same runs
    (names, config hashes) as the fork launcher makes; the parent's summary has every config's
    mean and spread over its two seeds."""
    grid = ["model=logreg,mlp", "optimizer.lr=0.1,0.01", "seed=0,1", *SMALL]
    out = _sweep([*STACKED, *grid], tmp_path / "stacked").stdout
    assert "Launching 8 jobs as 2 stack(s)" in out and out.count("4 member(s)") == 2
    _sweep([*FORK, *grid], tmp_path / "fork")
    uri = f"sqlite:///{tmp_path / 'stacked' / 'mlflow.db'}"
    stacked, forked = _children(uri), _children(f"sqlite:///{tmp_path / 'fork' / 'mlflow.db'}")
    assert {(r.info.run_name, r.data.tags["sweeplab.config_hash"]) for r in stacked.values()} == {
        (r.info.run_name, r.data.tags["sweeplab.config_hash"]) for r in forked.values()
    }
    assert {r.info.status for r in stacked.values()} == {"FINISHED"}
    for overrides, run in stacked.items():
        if "model=logreg" in overrides:  # no dropout: the same numbers
            assert run.data.metrics["test/acc"] == pytest.approx(
                forked[overrides].data.metrics["test/acc"], abs=0.002
            )

    client = mlflow.MlflowClient(uri)
    parent = next(
        r
        for r in client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
        if r.data.tags.get("sweeplab.sweep") == "parent"
    )
    assert {"summary/seeds.csv", "summary/seeds.md", "summary/seeds.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "summary")
    }
    seeds = pd.read_csv(client.download_artifacts(parent.info.run_id, "summary/seeds.csv", str(tmp_path)))
    assert len(seeds) == 4 and set(seeds.seeds) == {2}
    row = seeds[seeds.config == "model=logreg, optimizer.lr=0.1"].iloc[0]
    accs = [
        r.data.metrics["test/acc"] for o, r in stacked.items() if "model=logreg" in o and "lr=0.1 " in o + " "
    ]
    assert row["test/acc mean"] == pytest.approx(np.mean(accs)) and row["test/acc std"] == pytest.approx(
        np.std(accs, ddof=1)
    )


def test_objective_plots_tell_the_other_swept_values_apart() -> None:
    table = pd.DataFrame(
        {
            "status": ["FINISHED"] * 4,
            "model": ["logreg", "logreg", "mlp", "mlp"],
            "optimizer.lr": [0.1, 0.01, 0.1, 0.01],
            "val/acc": [0.9, 0.8, 0.95, 0.85],
        }
    )
    fig = objective_vs(table, "optimizer.lr", "val/acc", ["model", "optimizer.lr"])
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["model=logreg", "model=mlp"]


def test_optuna_asks_for_a_batch_of_trials_that_train_as_one_stack(tmp_path: Path) -> None:
    args = ["+sweep=optuna_stacked", "hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=4", *SMALL, *QUIET]
    out = _sweep(["-m", *args], tmp_path).stdout
    assert out.count("Launching 4 jobs as 1 stack(s)") == 2
    children = _children(f"sqlite:///{tmp_path / 'mlflow.db'}").values()
    assert len(children) == 8 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["sweeplab.stack_size"] for r in children} == {"4"}
    assert len({r.data.params["model.dropout"] for r in children}) == 8  # searched, per member


class _Bilinear(torch.nn.Module):
    """A model without a stacked form: the stack runs its own forward under torch.vmap."""

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(in_features, 8)
        self.out = torch.nn.Linear(8, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.out(h * torch.tanh(h))


def test_a_model_without_a_stacked_form_runs_its_own_forward_per_member() -> None:
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(_Bilinear(5, 3))
    x = torch.randn(3, 4, 5)
    stacked = StackedModel(models, 5)(x)
    for k, model in enumerate(models):
        torch.testing.assert_close(stacked[k], model(x[k]))


def test_batchnorm_members_stack_through_vmap_and_match_solo_runs(tmp_path: Path) -> None:
    """BatchNorm has no stacked form: the MLP then runs its own forward per member under
    torch.vmap, running statistics included, and ends where solo runs end."""
    grid = ["model=mlp", "model.norm=batchnorm", "model.dropout=0", "optimizer.lr=0.1,0.05", *SMALL, *QUIET]
    _sweep([*STACKED, *grid], tmp_path / "stacked")
    _sweep([*FORK, *grid], tmp_path / "fork")
    stacked = _children(f"sqlite:///{tmp_path / 'stacked' / 'mlflow.db'}")
    forked = _children(f"sqlite:///{tmp_path / 'fork' / 'mlflow.db'}")
    assert len(stacked) == 2 and {r.data.tags["sweeplab.stack_size"] for r in stacked.values()} == {"2"}
    for overrides, run in stacked.items():
        assert run.data.metrics["test/acc"] == pytest.approx(
            forked[overrides].data.metrics["test/acc"], abs=0.002
        )


def test_a_diverging_member_under_on_error_raise_stops_its_stack_with_one_line(tmp_path: Path) -> None:
    grid = ["model=mlp", "model.dropout=0", "optimizer.lr=0.05,1e6", "sweep.on_error=raise", *SMALL, *QUIET]
    tmp_path.mkdir(exist_ok=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli([*STACKED, *grid], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    children = {r.data.params["optimizer.lr"]: r for r in _children(uri).values()}
    assert children["1000000.0"].data.tags["sweeplab.failure"].startswith("DivergedError: train/loss")
    assert "sweep.on_error=raise stops its stack" in children["0.05"].data.tags["sweeplab.failure"]
    assert {r.info.status for r in children.values()} == {"FAILED"}


class _Branching(torch.nn.Module):
    """Python control flow on a tensor's value: torch.vmap cannot batch ``.item()``."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) if x.sum().item() >= 0 else -self.out(x)


@CUDA
def test_a_replayed_cuda_stack_and_its_members_schedules_never_make_the_host_wait(compose_cfg) -> None:
    """The members' learning rates reach the device tensors the graph reads without the host
    waiting for the step in flight (each member's cosine schedule: new values every step)."""
    base = ["model=mlp", "scheduler=cosine", *SMALL, "device=cuda"]
    cfgs = [compose_cfg([*base, f"optimizer.lr={lr}", f"seed={k}"]) for k, lr in enumerate([0.05, 0.01])]
    states, loaded = _member_states(cfgs, "cuda")
    stacked, optimizer = stack(states, loaded.in_features)
    losses = torch.zeros(len(states), 18, device="cuda")
    step = make_stacked_steps("true", stacked, optimizer, loaded.train, 64, losses, torch.zeros_like(losses))
    step.begin(torch.stack([torch.randperm(len(loaded.train), device="cuda") for _ in states]), 0, 0)

    def train_on(i: int) -> None:
        optimizer.refresh()
        step(i, i)
        for state in states:
            state.scheduler.step()

    with warnings.catch_warnings():  # the members' own optimizers never step: their schedules warn
        warnings.simplefilter("ignore", UserWarning)
        for i in range(3):  # two warm-ups, then the capture (which synchronizes)
            train_on(i)
        with host_never_waits():
            for i in range(3, 18):
                train_on(i)


def test_a_model_vmap_cannot_batch_is_refused_before_training() -> None:
    with pytest.raises(NotStackable, match="_Branching cannot run under torch.vmap"):
        StackedModel([_Branching(), _Branching()], 5)


def _member_states(cfgs: list, device: str) -> tuple[list, Data]:
    """Each member's training state, built as a solo run's on data read once."""
    states, loaded = [], None
    for cfg in cfgs:
        state, loaded = training_state(cfg, device, loaded)
        states.append(state)
    return states, loaded


def _fit_stack(
    cfgs: list, recorder: FrozenGraphs | None, monkeypatch: pytest.MonkeyPatch, device: str = "cpu"
) -> tuple[list, list[list]]:
    """``fit_stack`` on ``cfgs``' members (their steps replayed under ``recorder`` when given);
    each member's state and logged rows."""
    states, loaded = _member_states(cfgs, device)
    rows: list[list] = [[] for _ in cfgs]

    def failed(error: Exception) -> None:
        raise error

    members = [Member(state, rows[k].extend, failed) for k, state in enumerate(states)]
    if recorder is not None:
        monkeypatch.setattr(
            stacked_train, "make_stacked_steps", partial(make_stacked_steps, recorder=recorder)
        )
    trainer = OmegaConf.to_object(cfgs[0].trainer)
    fit_stack(members, stack(states, loaded.in_features), loaded, trainer, SignalGuard())
    monkeypatch.undo()
    return states, rows


def _without_timings(rows: list) -> list:
    return [(s, {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))}) for s, m in rows]


@pytest.mark.parametrize("optimizer,scheduler", [("sgd", "onecycle"), ("adam", "cosine"), ("adamw", "none")])
def test_a_replayed_stacked_step_trains_exactly_like_eager_steps(
    compose_cfg, monkeypatch: pytest.MonkeyPatch, optimizer: str, scheduler: str
) -> None:
    """Under CUDA graph semantics (``FrozenGraphs``: the captured ops replayed, Python frozen),
    members with their own lr, dropout and schedule (one-cycle also moves the momentum) train to
    the same numbers, to the bit, as eager stacked steps: everything the step reads between
    replays is a device tensor. Each epoch's smaller last batch runs eagerly."""
    base = ["model=mlp", f"optimizer={optimizer}", f"scheduler={scheduler}", *SMALL, "trainer.epochs=2"]
    own = [["seed=0"], ["model.dropout=0.1", "seed=1"], ["model.dropout=0", "seed=2"]]
    cfgs = []
    for lr, extra in zip([0.05, 0.01, 0.02], own, strict=True):
        peak = [f"scheduler.max_lr={2 * lr}"] if scheduler == "onecycle" else []  # one-cycle's own lr
        cfgs.append(compose_cfg([*base, f"optimizer.lr={lr}", *peak, *extra]))
    recorder = FrozenGraphs()
    replayed, replayed_rows = _fit_stack(cfgs, recorder, monkeypatch)
    assert (recorder.warmups, recorder.captures, recorder.replays) == (2, 1, 2 * 18 - 2)  # 18 full batches
    eager, eager_rows = _fit_stack(cfgs, None, monkeypatch)
    for a, b, rows_a, rows_b in zip(replayed, eager, replayed_rows, eager_rows, strict=True):
        assert torch.equal(a.progress.step_loss, b.progress.step_loss)
        assert _without_timings(rows_a) == _without_timings(rows_b)  # every logged number, lrs included
        for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
            assert torch.equal(p, q)
    assert len({rows[0][1]["train/lr"] for rows in eager_rows}) == 3  # each member's own schedule


@CUDA
@pytest.mark.parametrize("model", ["logreg", "mlp", "mlp-batchnorm"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_a_stack_captures_as_a_cuda_graph_and_trains_like_eager(
    compose_cfg, monkeypatch: pytest.MonkeyPatch, model: str, optimizer: str
) -> None:
    """Which stacks a graph supports is decided here: stacked forms and the vmap path (BatchNorm)."""
    name, _, norm = model.partition("-")
    base = [f"model={name}", f"optimizer={optimizer}", "scheduler=cosine", *SMALL, "device=cuda"]
    if norm:
        base += [f"model.norm={norm}", "model.dropout=0"]
    results = {}
    for setting in ("true", "false"):
        cfgs = [
            compose_cfg([*base, f"optimizer.lr={lr}", f"seed={k}", f"trainer.cuda_graph={setting}"])
            for k, lr in enumerate([0.05, 0.01])
        ]
        states, _ = _fit_stack(cfgs, None, monkeypatch, "cuda")
        results[setting] = [s.progress.history.val_acc[-1] for s in states]
    assert results["true"] == pytest.approx(results["false"], abs=0.03)
