"""Where a GPU run spends what ``time/epoch_s`` does not break down, in a process of its own
(a first use is paid once per process, so run this script alone, not after other work).

1. ``first-epoch``: a preset's first epoch step by step, as ``train.fit`` runs it: the two eager
   warm-up steps, the capture, the replays, the epoch's smaller last batch, validation; then
   the whole second epoch. Before it, building the run (data, model, and the CUDA context and
   first uses that ``sweeplab.training.first_uses`` makes in a thread meanwhile), waited for, and the
   rehearsal of the run's own shapes (``sweeplab.training.rehearsal``; ``--no-rehearsal`` leaves it
   out, to see what it takes from the first epoch), which a run overlaps with opening its
   MLflow run.
2. ``stack``: the 64-job ``seed_mlp`` sweep's members stacked, one epoch: seconds per step of
   the replays alone (the device's share), of the stacked loop around a step that does
   nothing (the host's share: the members' schedules and bookkeeping), and of the loop as it
   trains (``fit_stack``); its rehearsal first, as for the first epoch.

Usage: python scripts/cuda_anatomy.py [--device cuda] [--parts first-epoch stack]
       [--preset seed_logreg] [--members 64] [--no-rehearsal] [--data-root DIR]
The data root defaults to $SWEEPLAB_DATA_DIR; it must hold MNIST/raw/.
"""

import argparse
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from benchmark import WIDE_LRS, WIDE_SEEDS
from sweeplab import CONFIG_MODULE
from sweeplab.run.phases import Session, Start, build_many
from sweeplab.run.timing import Stopwatch
from sweeplab.stacking import loop as stacked_train
from sweeplab.stacking.loop import Member, fit_stack, make_stacked_steps, stack
from sweeplab.stacking.rehearsal import stacked as stacked_rehearsal
from sweeplab.training import first_uses, rehearsal
from sweeplab.training.interrupt import SignalGuard
from sweeplab.training.loop import evaluate, steps_per_epoch
from sweeplab.training.steps import make_steps

T = TypeVar("T")
QUIET = ["tracking.figures=false", "tracking.log_model=false"]  # no artifacts child to fork


def timed(label: str, fn: Callable[[], T], device: torch.device, steps: int = 0) -> T:
    """``fn()``, its seconds printed once the device has finished it (per step if ``steps``)."""
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    per_step = f"  ({seconds / steps * 1e3:.3f} ms per step)" if steps else ""
    print(f"  {seconds:8.3f} s  {label}{per_step}")
    return out


def sessions(cfgs: list[DictConfig]) -> list[Session]:
    """The runs' built objects, as a stack builds them (the data read once), warm-up done."""
    built = build_many([(Start(cfg), Stopwatch()) for cfg in cfgs])
    first_uses.wait()
    return built


def rehearse(work: Callable[[], Callable[[], None]], device: torch.device) -> None:
    """The rehearsal ``work()`` makes, timed alone (a run overlaps it with opening its run)."""
    timed(
        "rehearsal: the run's own shapes on copies",
        lambda: (first_uses.rehearse(work()), first_uses.wait()),
        device,
    )


def first_epoch(preset: str, root: str, device: torch.device, rehearsed: bool) -> None:
    print(f"\n== {preset} on {device}: a fresh process's first epoch, then its second")
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"experiment={preset}", f"data.root={root}", f"device={device}", *QUIET]
        )
    (session,) = timed(
        "build: data, model; CUDA context and first uses in a thread", lambda: sessions([cfg]), device
    )
    state, data, trainer = session.training, session.data, session.trainer
    if rehearsed:
        rehearse(lambda: rehearsal.solo(state, data, trainer), device)
    n, batch = len(data.train), trainer.batch_size
    per_epoch = steps_per_epoch(n, trainer)
    losses = torch.zeros(2 * per_epoch, device=device)  # two epochs' steps, whatever the preset's
    steps = make_steps(
        trainer.cuda_graph,
        state.model,
        state.optimizer,
        state.scheduler,
        data.train,
        batch,
        losses,
        torch.zeros_like(losses),
    )

    def begin(epoch: int) -> None:
        steps.begin(torch.randperm(n, generator=state.generator).to(device), 0, epoch * per_epoch)

    begin(0)
    for i, what in enumerate(["eager warm-up", "eager warm-up", "capture and first replay"]):
        timed(f"step {i + 1} ({what})", functools.partial(steps, i, i), device)
    full = range(3, per_epoch - 1)
    timed(f"{len(full)} replays", lambda: [steps(i, i) for i in full], device, len(full))
    last = n - batch * (per_epoch - 1)
    timed(f"the last batch ({last} samples)", lambda: steps(per_epoch - 1, per_epoch - 1), device)
    timed("validation", lambda: evaluate(state.model, data.val, trainer.eval_batch_size), device)

    def second_epoch() -> None:
        begin(1)
        for i in range(per_epoch):
            steps(i, per_epoch + i)
        evaluate(state.model, data.val, trainer.eval_batch_size)

    timed("second epoch: every step and validation", second_epoch, device, per_epoch)


class NoSteps:
    """Steps that do nothing: what is timed is the loop around them."""

    def begin(self, order: torch.Tensor, first: int, step: int) -> None:
        pass

    def __call__(self, i: int, step: int) -> None:
        pass


def stack_step(members: int, root: str, device: torch.device, rehearsed: bool) -> None:
    grid = [(lr, seed) for lr in WIDE_LRS.split(",") for seed in WIDE_SEEDS.split(",")]  # the sweep's
    print(f"\n== {members} seed_mlp members stacked on {device}, one epoch")
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfgs = [
            compose(
                "config",
                overrides=[
                    "experiment=seed_mlp",
                    f"optimizer.lr={lr}",
                    f"seed={seed}",
                    "trainer.epochs=1",
                    f"data.root={root}",
                    f"device={device}",
                    *QUIET,
                ],
            )
            for lr, seed in grid[:members]
        ]
    built = timed("build the members", lambda: sessions(cfgs), device)
    first, states = built[0], [s.training for s in built]
    together = stack(states, first.data.in_features)
    train, trainer = first.data.train, first.trainer
    if rehearsed:
        rehearse(lambda: stacked_rehearsal(together, first.data, trainer), device)
    n, batch = len(train), trainer.batch_size
    per_epoch = steps_per_epoch(n, trainer)
    losses = torch.zeros(members, per_epoch, device=device)
    steps = make_stacked_steps(trainer.cuda_graph, *together, train, batch, losses, torch.zeros_like(losses))
    steps.begin(torch.stack([torch.randperm(n) for _ in states]).to(device), 0, 0)
    timed("first 3 steps (2 eager warm-ups, the capture)", lambda: [steps(i, i) for i in range(3)], device)
    full = range(3, per_epoch - 1)
    timed(f"{len(full)} replays alone", lambda: [steps(i, i) for i in full], device, len(full))

    def epoch_seconds(label: str) -> None:
        logged: list[float] = []
        rows = [Member(s, lambda r: logged.append(r[-1][1]["time/epoch_s"]), print) for s in states]
        fit_stack(rows, together, first.data, trainer, SignalGuard())
        print(f"  {logged[0]:8.3f} s  {label}  ({logged[0] / per_epoch * 1e3:.3f} ms per step)")

    real = stacked_train.make_stacked_steps
    stacked_train.make_stacked_steps = lambda *args, **kwargs: NoSteps()
    try:
        epoch_seconds("fit_stack's epoch around steps that do nothing (time/epoch_s)")
    finally:
        stacked_train.make_stacked_steps = real
    epoch_seconds("fit_stack's epoch, training (time/epoch_s, its capture included)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=os.environ.get("SWEEPLAB_DATA_DIR"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--parts", nargs="+", choices=["first-epoch", "stack"], default=["first-epoch", "stack"]
    )
    parser.add_argument("--preset", default="seed_logreg", help="the first-epoch part's experiment")
    parser.add_argument("--members", type=int, default=64, help="the stack part's members")
    parser.add_argument("--no-rehearsal", action="store_true", help="leave out the rehearsal of first uses")
    args = parser.parse_args()
    if not args.data_root or not (Path(args.data_root) / "MNIST" / "raw").is_dir():
        parser.error("give --data-root (or set SWEEPLAB_DATA_DIR) to a folder holding MNIST/raw/")
    root, device = str(Path(args.data_root).resolve()), torch.device(args.device)
    if "first-epoch" in args.parts:
        first_epoch(args.preset, root, device, not args.no_rehearsal)
    if "stack" in args.parts:
        stack_step(args.members, root, device, not args.no_rehearsal)


if __name__ == "__main__":
    main()
