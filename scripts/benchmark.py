"""Benchmark sweeplab against the course notebook's pipeline, in one invocation, on real MNIST.

1. Trains logreg and the MLP with the notebook's pipeline (``ToTensor`` + ``DataLoader(batch_size=64,
   shuffle=True)``, written out below as the baseline) and with sweeplab's own data, model,
   optimizer and training code (imported from the package), for the same epochs and seed, and
   prints seconds per epoch, test accuracy and the speed-up; ``--parts graph``, on a CUDA device,
   sweeplab's eager steps against its CUDA-graph replays (``trainer.cuda_graph``).
2. Runs ``sweeplab experiment=seed_mlp`` end to end in a subprocess against a throwaway sqlite
   store and prints where its time went (checkpointing included) and its peak RSS.
3. Runs an 8-job sweep of ``seed_logreg``-sized runs with 1 and 2 joblib workers and with 2
   workers of the fork launcher (wall time, speed-up) and measures what the sweep machinery adds
   per job: the parent run and the summary (shared by the 8 jobs) and each job's config-hash
   lookups, against a bare run's store setup.
4. Runs a 16-job ``seed_logreg`` sweep (4 learning rates x 4 seeds) with the stacked launcher and
   with 2 workers of the fork launcher, side by side: wall time, training seconds per
   model-epoch, and what recording a member costs (figures, model, MLflow logging).
5. ``--parts stacked-wide`` (not run by default; meant for a GPU): a 64-job ``seed_mlp`` sweep (8
   learning rates x 8 seeds) with the stacked launcher: wall time, the stack's ``time/epoch_s``
   of every epoch, the spread of test accuracy, and one member's logged model reloaded.

Usage: python scripts/benchmark.py [--data-root DIR] [--epochs N] [--device cpu] [--parts ...]
The data root defaults to $SWEEPLAB_DATA_DIR; it must hold MNIST/raw/.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms
from hydra import compose, initialize_config_module
from torch import nn

from sweeplab import CONFIG_MODULE
from sweeplab.config.schema import TrainerConfig
from sweeplab.data import load_data
from sweeplab.models import MODELS
from sweeplab.optimizers import OPTIMIZERS
from sweeplab.run.seeding import seed_everything
from sweeplab.schedulers import SCHEDULERS
from sweeplab.tracking.tags import TAG_SWEEP
from sweeplab.training.interrupt import SignalGuard
from sweeplab.training.loop import evaluate, fit, steps_per_epoch
from sweeplab.training.state import Progress, TrainingState


# ---- the notebook's pipeline (baseline) --------------------------------------------------------
class NotebookLogReg(nn.Module):
    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.W = nn.Parameter(nn.init.xavier_uniform_(torch.empty([n_features, n_classes])))
        self.b = nn.Parameter(torch.zeros([n_classes]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x.view(x.shape[0], -1), self.W) + self.b


class NotebookMLP(nn.Module):
    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.input_layer = nn.Linear(n_features, 256)
        self.hidden_layer = nn.Linear(256, 100)
        self.output_layer = nn.Linear(100, n_classes)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.relu(self.input_layer(x.view(x.shape[0], -1))))
        x = self.dropout(F.relu(self.hidden_layer(x)))
        return self.output_layer(x)


def notebook(model_name: str, root: str, epochs: int, seed: int) -> tuple[float, float]:
    """Seconds per epoch and test accuracy (all 10,000 images) of the notebook's pipeline."""
    torch.manual_seed(seed)
    trainset = torchvision.datasets.MNIST(root, train=True, transform=transforms.ToTensor())
    testset = torchvision.datasets.MNIST(root, train=False, transform=transforms.ToTensor())
    train_loader = torch.utils.data.DataLoader(trainset, batch_size=64, shuffle=True)
    test_loader = torch.utils.data.DataLoader(testset, batch_size=64, shuffle=False)
    model = (NotebookLogReg if model_name == "logreg" else NotebookMLP)(28 * 28, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, labels in train_loader:
            logits = model(x)
            loss = criterion(input=logits, target=labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    per_epoch = (time.perf_counter() - started) / epochs
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, labels in test_loader:
            correct += (model(x).argmax(1) == labels).sum().item()
    return per_epoch, correct / len(testset)


# ---- sweeplab's own code ---------------------------------------------------------------------
def sweeplab(
    preset: str, root: str, epochs: int, seed: int, device: str, cuda_graph: str = "false"
) -> tuple[float, float]:
    """Seconds per epoch and test accuracy of sweeplab's loop on the same data (no val split)."""
    overrides = [
        f"experiment={preset}",
        f"data.root={root}",
        "data.val_size=0",
        f"trainer.epochs={epochs}",
        f"seed={seed}",
        f"trainer.cuda_graph={cuda_graph}",
    ]
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    trainer = TrainerConfig(**cfg.trainer)
    torch_device = torch.device(device)
    generator = seed_everything(seed)
    data = load_data(cfg.data, torch_device)
    model = MODELS.build(cfg.model, data.in_features, len(data.classes)).to(torch_device)
    optimizer = OPTIMIZERS.build(cfg.optimizer, model.parameters())
    per_epoch = steps_per_epoch(len(data.train), trainer)
    scheduler = SCHEDULERS.build(cfg.scheduler, optimizer, per_epoch * epochs, per_epoch)
    progress = Progress.start(per_epoch * epochs, torch_device)
    state = TrainingState(model, optimizer, scheduler, generator, progress)
    history = fit(state, data, trainer, lambda rows: None, SignalGuard())
    return history.train_seconds / epochs, evaluate(model, data.test, trainer.eval_batch_size).acc


def compare(root: str, epochs: int, seed: int, device: str) -> None:
    print(
        f"== notebook pipeline vs sweeplab: {epochs} epoch(s), seed {seed}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'model':8} {'notebook s/epoch':>17} {'sweeplab s/epoch':>17} {'speed-up':>9} "
        f"{'notebook acc':>13} {'sweeplab acc':>13}"
    )
    for model_name, preset in [("logreg", "seed_logreg"), ("mlp", "seed_mlp")]:
        base_s, base_acc = notebook(model_name, root, epochs, seed)
        ours_s, ours_acc = sweeplab(preset, root, epochs, seed, device)
        print(
            f"{model_name:8} {base_s:17.3f} {ours_s:17.3f} {base_s / ours_s:8.1f}x "
            f"{base_acc:13.4f} {ours_acc:13.4f}"
        )


def graphs(root: str, epochs: int, seed: int, device: str) -> None:
    """sweeplab's eager steps against its CUDA-graph replays, same data, seed and epochs."""
    if torch.device(device).type != "cuda":
        print(f"\n== eager vs CUDA graph steps: skipped, device={device} is not a CUDA device")
        return
    print(f"\n== sweeplab eager vs CUDA graph steps on {torch.cuda.get_device_name(device)}")
    print(
        f"{'model':8} {'eager s/epoch':>14} {'graph s/epoch':>14} {'speed-up':>9} "
        f"{'eager acc':>10} {'graph acc':>10}"
    )
    for model_name, preset in [("logreg", "seed_logreg"), ("mlp", "seed_mlp")]:
        eager_s, eager_acc = sweeplab(preset, root, epochs, seed, device, "false")
        graph_s, graph_acc = sweeplab(preset, root, epochs, seed, device, "true")
        print(
            f"{model_name:8} {eager_s:14.3f} {graph_s:14.3f} {eager_s / graph_s:8.1f}x "
            f"{eager_acc:10.4f} {graph_acc:10.4f}"
        )


# ---- end-to-end run --------------------------------------------------------------------------
def end_to_end(root: str, device: str) -> None:
    print(f"\n== sweeplab experiment=seed_mlp device={device}, end to end")
    with tempfile.TemporaryDirectory() as workdir:
        uri = f"sqlite:///{workdir}/mlflow.db"
        command = [str(Path(sys.executable).with_name("sweeplab")), "experiment=seed_mlp", f"device={device}"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SWEEPLAB_DATA_DIR": root}
        started = time.perf_counter()
        subprocess.run(command, cwd=workdir, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - started
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
    metrics = run.data.metrics
    phases = {
        "data": metrics["time/data_s"],
        "setup (models, store)": metrics["time/setup_s"],
        "training (incl. val)": metrics["time/training_s"],
        "evaluation (test)": metrics["time/evaluation_s"],
        "figures": metrics["time/figures_s"],
        "MLflow logging": metrics["time/tracking_s"],
        "model logging": metrics["time/model_logging_s"],
        "checkpoints (every epoch + best)": metrics["time/checkpoint_s"],
    }
    phases = {"startup + exit (imports, Hydra)": wall - sum(phases.values()), **phases}
    for name, seconds in phases.items():
        print(f"  {name:32} {seconds:7.2f} s")
    print(f"  {'total wall time':32} {wall:7.2f} s")
    overhead = metrics["time/figures_s"] + metrics["time/tracking_s"] + metrics["time/model_logging_s"]
    print(
        f"  figures + MLflow + model logging = {overhead:.2f} s "
        f"= {overhead / metrics['time/training_s']:.1%} of training"
    )
    print(
        f"  checkpoints = {metrics['time/checkpoint_s']:.3f} s "
        f"= {metrics['time/checkpoint_s'] / metrics['time/training_s']:.2%} of training"
    )
    print(
        f"  test/acc {metrics['test/acc']:.4f}, mean epoch {metrics['time/training_s'] / 10:.2f} s, "
        f"peak RSS {peak_rss_mb:.0f} MB"
    )


# ---- sweeps ----------------------------------------------------------------------------------
SWEEP_JOBS = 8


def sweep_wall(root: str, launcher: str, workers: int, workdir: Path, epochs: int) -> float:
    """Wall time of an 8-job seed_logreg sweep (seeds 0-7) with ``workers`` workers of ``launcher``;
    every job must end FINISHED."""
    seeds = ",".join(str(s) for s in range(SWEEP_JOBS))
    command = [
        str(Path(sys.executable).with_name("sweeplab")),
        "-m",
        f"hydra/launcher={launcher}",
        f"hydra.launcher.n_jobs={workers}",
        "experiment=seed_logreg",
        f"trainer.epochs={epochs}",
        f"seed={seeds}",
        "device=cpu",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"SWEEPLAB_DATA_DIR": root}
    started = time.perf_counter()
    subprocess.run(command, cwd=workdir, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs(["1"])
    statuses = [r.info.status for r in runs if r.data.tags.get(TAG_SWEEP) != "parent"]
    if statuses != ["FINISHED"] * SWEEP_JOBS:
        raise RuntimeError(f"{launcher} with {workers} workers: job statuses {statuses}")
    return wall


def sweep_overhead(workdir: Path) -> dict[str, float]:
    """Seconds the sweep machinery adds, measured on the store and parent the sweep just left."""
    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    from sweeplab.config.schema import SweepConfig, TrackingConfig
    from sweeplab.sweep.summary import summarize
    from sweeplab.tracking.store import Tracker
    from sweeplab.tracking.tags import TAG_HASH, config_hash

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=seed_logreg", "seed=1"])
    tracking: TrackingConfig = OmegaConf.to_object(cfg.tracking)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    tracker = Tracker(tracking, workdir, env)  # a job's first contact with the store, warmed
    client: MlflowClient = tracker.client
    (parent,) = client.search_runs([tracker.experiment_id], f"tags.`{TAG_SWEEP}` = 'parent'")

    def best_of(fn, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    digest = config_hash(cfg)
    parent_start = best_of(lambda: client.create_run(tracker.experiment_id, tags={TAG_SWEEP: "benchmark"}))
    bare = best_of(lambda: Tracker(tracking, workdir, env))

    def lookup_job() -> None:  # a sweep job asks for a FINISHED run to reuse, then a KILLED one to resume
        job_tracker = Tracker(tracking, workdir, env, parent.info.run_id)
        job_tracker.newest_run("FINISHED", {TAG_HASH: digest})
        job_tracker.newest_run("KILLED", {TAG_HASH: digest})

    lookup = best_of(lookup_job)
    swept = ["seed"]
    summary = best_of(
        lambda: summarize(client, parent.info.run_id, tracker.experiment_id, swept, SweepConfig()), 2
    )
    return {
        "parent run created": parent_start,
        "summary on the parent (8 children)": summary,
        "job store setup, bare run": bare,
        "job store setup + config-hash lookup, in a sweep": lookup,
        "per job: lookup - bare + (parent + summary) / 8": lookup
        - bare
        + (parent_start + summary) / SWEEP_JOBS,
    }


def sweeps(root: str, epochs: int) -> None:
    print(
        f"\n== {SWEEP_JOBS}-job sweep of seed_logreg, {epochs} epoch(s) each (seeds 0-{SWEEP_JOBS - 1}), "
        "fresh sqlite store"
    )
    walls = {}
    for launcher, workers in [("joblib", 1), ("joblib", 2), ("fork", 2)]:
        with tempfile.TemporaryDirectory() as workdir:
            walls[launcher, workers] = sweep_wall(root, launcher, workers, Path(workdir), epochs)
            if workers == 2 and launcher == "joblib":
                overhead = sweep_overhead(Path(workdir))
        print(f"  hydra/launcher={launcher}, {workers} worker(s): {walls[launcher, workers]:6.1f} s wall")
    baseline = walls["joblib", 1]
    print(f"  speed-up of 2 workers over 1: joblib {baseline / walls['joblib', 2]:.2f}x, ", end="")
    print(f"fork {baseline / walls['fork', 2]:.2f}x")
    print("  sweep machinery:")
    for name, seconds in overhead.items():
        print(f"    {name:50} {seconds * 1000:7.1f} ms")


# ---- stacked sweeps ------------------------------------------------------------------------
STACKED_LRS = "0.1,0.05,0.02,0.01"
STACKED_SEEDS = "0,1,2,3"
WIDE_LRS = "0.1,0.07,0.05,0.03,0.02,0.01,0.007,0.005"  # the 64-job GPU sweep: 8 lrs x 8 seeds
WIDE_SEEDS = "0,1,2,3,4,5,6,7"


def stacked_sweep(
    root: str, launcher: list[str], workdir: Path, grid: list[str], device: str, figures: int
) -> tuple[float, list]:
    """Wall time of the sweep ``grid`` with ``launcher``, and its children, which must all be
    FINISHED with their ``figures`` figures and a logged model."""
    command = [str(Path(sys.executable).with_name("sweeplab")), "-m", *launcher, *grid, f"device={device}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"SWEEPLAB_DATA_DIR": root}
    started = time.perf_counter()
    subprocess.run(command, cwd=workdir, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    children = [r for r in client.search_runs(["1"]) if r.data.tags.get(TAG_SWEEP) != "parent"]
    complete = [
        r
        for r in children
        if r.info.status == "FINISHED"
        and len(client.list_artifacts(r.info.run_id, "figures")) == figures
        and r.data.metrics.get("time/model_logging_s") is not None
    ]
    if len(complete) != len(children):
        raise RuntimeError(f"{launcher}: {len(complete)} of {len(children)} children complete")
    return wall, children


def _mean(children: list, key: str) -> float:
    return sum(r.data.metrics[key] for r in children) / len(children)


def sweep_grid(preset: str, lrs: str, seeds: str, epochs: int) -> list[str]:
    """The overrides of a learning rate x seed sweep of ``preset``."""
    return [f"experiment={preset}", f"optimizer.lr={lrs}", f"seed={seeds}", f"trainer.epochs={epochs}"]


def stacked(root: str, epochs: int, device: str) -> None:
    grid = sweep_grid("seed_logreg", STACKED_LRS, STACKED_SEEDS, epochs)
    print(f"\n== 16-job sweep {' '.join(grid)} device={device}, fresh sqlite store each")
    launchers = {
        "stacked": ["hydra/launcher=stacked"],
        "fork, 2 workers": ["hydra/launcher=fork", "hydra.launcher.n_jobs=2"],
    }
    walls = {}
    print(f"{'launcher':18} {'wall s':>8} {'train s/model-epoch':>20} {'record s/member':>16}")
    for name, launcher in launchers.items():
        with tempfile.TemporaryDirectory() as workdir:
            wall, children = stacked_sweep(root, launcher, Path(workdir), grid, device, figures=4)
        walls[name] = wall
        # a member's training seconds are its stack's: per model-epoch divide by the stack's size
        per_model_epoch = _mean(children, "time/training_s") / epochs / (16 if name == "stacked" else 1)
        record = sum(_mean(children, f"time/{p}_s") for p in ("figures", "model_logging", "tracking"))
        print(f"{name:18} {wall:8.1f} {per_model_epoch:20.3f} {record:16.2f}")
    print(f"stacked is {walls['fork, 2 workers'] / walls['stacked']:.2f}x faster (wall)")


def stacked_wide(root: str, epochs: int, device: str) -> None:
    """The 64-job seed_mlp sweep, stacked only (one stack of 64): what a GPU makes of it."""
    grid = sweep_grid("seed_mlp", WIDE_LRS, WIDE_SEEDS, epochs)
    print(f"\n== 64-job sweep {' '.join(grid)} hydra/launcher=stacked device={device}")
    with tempfile.TemporaryDirectory() as workdir:
        # the MLP's figures: logreg's four and the PCA of its two hidden layers
        wall, children = stacked_sweep(
            root, ["hydra/launcher=stacked"], Path(workdir), grid, device, figures=6
        )
        client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
        run = children[0]
        # the stack's seconds per epoch, which every member logs
        epochs_s = [
            m.value
            for m in sorted(client.get_metric_history(run.info.run_id, "time/epoch_s"), key=lambda m: m.step)
        ]
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
        model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model", map_location=device)
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            data_cfg = compose("config", overrides=["experiment=seed_mlp", f"data.root={root}"]).data
        reloaded = evaluate(model, load_data(data_cfg, torch.device(device)).test, 8192).acc
    accs = sorted(r.data.metrics["test/acc"] for r in children)
    print(f"  {len(children)} children FINISHED with figures and a model; wall {wall:.1f} s")
    print(f"  time/epoch_s (all 64 members), epoch by epoch: {', '.join(f'{t:.3f}' for t in epochs_s)} s")
    print(f"  test/acc min {accs[0]:.4f} median {accs[len(accs) // 2]:.4f} max {accs[-1]:.4f}")
    print(
        f"  a logged model reloads with test/acc {reloaded:.4f} "
        f"(its run logged {run.data.metrics['test/acc']:.4f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=os.environ.get("SWEEPLAB_DATA_DIR"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["compare", "graph", "e2e", "sweep", "stacked", "stacked-wide"],
        default=["compare", "graph", "e2e", "sweep", "stacked"],
    )
    parser.add_argument(
        "--sweep-epochs", type=int, default=1, help="epochs of each sweep job (seed_logreg: 1)"
    )
    args = parser.parse_args()
    if not args.data_root or not (Path(args.data_root) / "MNIST" / "raw").is_dir():
        parser.error("give --data-root (or set SWEEPLAB_DATA_DIR) to a folder holding MNIST/raw/")
    root = str(Path(args.data_root).resolve())
    if "compare" in args.parts:
        compare(root, args.epochs, args.seed, args.device)
    if "graph" in args.parts:
        graphs(root, args.epochs, args.seed, args.device)
    if "e2e" in args.parts:
        end_to_end(root, args.device)
    if "sweep" in args.parts:
        sweeps(root, args.sweep_epochs)
    if "stacked" in args.parts:
        stacked(root, args.epochs, args.device)
    if "stacked-wide" in args.parts:
        stacked_wide(root, args.epochs, args.device)


if __name__ == "__main__":
    main()
