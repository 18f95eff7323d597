"""One experiment, config in, metrics out: build, train, evaluate, track.

A plain function of a composed config and a ``Job``, callable from tests without Hydra's global
state. Everything that can reject the config (values, device, data, tracking store) runs before
the MLflow run opens, so a bad config leaves no run behind.
"""

import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sweeplab import figures
from sweeplab.data import Data, load_data
from sweeplab.device import resolve_device
from sweeplab.job import Job
from sweeplab.models import MODELS
from sweeplab.optimizers import OPTIMIZERS
from sweeplab.provenance import code_state, dataset_input, environment_tags
from sweeplab.representations import representations
from sweeplab.schedulers import SCHEDULERS
from sweeplab.schema import SweepConfig, TrackingConfig, TrainerConfig
from sweeplab.seeding import seed_everything
from sweeplab.tracking import TAG_REUSED, RunLog, Tracker, config_hash
from sweeplab.train import History, MetricRows, evaluate, fit, steps_per_epoch

log = logging.getLogger(__name__)


class Stopwatch:
    """Seconds spent per named phase, logged as ``time/<phase>_s``.

    Phases may nest (metric logging inside training); each second counts for the innermost
    phase only, so the phases add up to the task's wall time.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._nested: list[float] = []

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[phase] += elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed

    def metrics(self) -> dict[str, float]:
        return {f"time/{phase}_s": seconds for phase, seconds in self.seconds.items()}


def run(cfg: DictConfig, job: Job) -> dict[str, float]:
    """Train and evaluate the configured model, logging everything to one MLflow run."""
    watch = Stopwatch()
    with watch("setup"):
        trainer: TrainerConfig = OmegaConf.to_object(cfg.trainer)
        tracking: TrackingConfig = OmegaConf.to_object(cfg.tracking)
        sweep: SweepConfig = OmegaConf.to_object(cfg.sweep)
        device = resolve_device(cfg.device)
        tracker = None
        if job.parent_run_id:  # a sweep's store exists already: ask it before loading any data
            tracker = Tracker(tracking, job.launch_dir, os.environ, job.parent_run_id)
            done = _reuse_finished(tracker, cfg, job) if sweep.skip_completed else None
            if done is not None:
                return done
        generator = seed_everything(cfg.seed)
    with watch("data"):
        data = load_data(cfg.data, device)
        dataset = dataset_input(cfg.data.name, data)  # hashing what was read is part of reading it
    with watch("setup"):
        model = MODELS.build(cfg.model, data.in_features, len(data.classes)).to(device)
        optimizer = OPTIMIZERS.build(cfg.optimizer, model.parameters())
        per_epoch = steps_per_epoch(len(data.train), trainer)
        scheduler = SCHEDULERS.build(cfg.scheduler, optimizer, per_epoch * trainer.epochs, per_epoch)
        # a single run opens its store only once everything else is known to be valid
        tracker = tracker or Tracker(tracking, job.launch_dir, os.environ)
        code_tags, diff = code_state(Path(__file__).parent)
    log.info(
        "%s on %s (%d threads): %d train / %d val / %d test samples, %s",
        cfg.model.name,
        device,
        torch.get_num_threads(),
        len(data.train),
        len(data.val),
        len(data.test),
        tracker,
    )
    with contextlib.ExitStack() as open_run:
        with watch("tracking"):  # creating the run and logging its params count as tracking too
            run_log = open_run.enter_context(
                tracker.start_run(cfg, job, code_tags | environment_tags(device))
            )
            run_log.log_dataset(dataset)
            run_log.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
            if diff:
                run_log.log_text(diff, "code/diff.patch")
            hydra_dir = job.output_dir / ".hydra"
            if hydra_dir.is_dir():
                run_log.log_folder(hydra_dir, ".hydra")

        def log_rows(rows: MetricRows) -> None:
            with watch("tracking"):
                run_log.log_rows(rows)

        with watch("training"):
            history = fit(model, data, optimizer, scheduler, trainer, generator, log_rows)
        with watch("evaluation"):
            test = evaluate(model, data.test, trainer.eval_batch_size)
        final = {"test/loss": test.loss, "test/acc": test.acc}
        if history.best_val_acc is not None:
            final["best/val_acc"] = history.best_val_acc
        with watch("tracking"):
            run_log.log_metrics(final, step=history.epoch_end_steps[-1])
        log.info("test/loss %.4f | test/acc %.4f", test.loss, test.acc)
        if tracking.figures:
            with watch("figures"):
                _log_figures(run_log, model, data, history, test.predictions, tracking.pca_samples, cfg.seed)
        if tracking.log_model:
            with watch("model_logging"):
                run_log.log_model(model, data.test.x[:5])
        run_log.log_metrics(watch.metrics(), step=history.epoch_end_steps[-1])
    last_val = {"val/loss": history.val_loss[-1], "val/acc": history.val_acc[-1]} if history.val_acc else {}
    return final | last_val


def _reuse_finished(tracker: Tracker, cfg: DictConfig, job: Job) -> dict[str, float] | None:
    """Metrics of a FINISHED run with this job's config hash, recorded on the sweep's parent."""
    digest = config_hash(cfg)
    done = tracker.finished_run(digest)
    if done is None:
        return None
    tracker.client.set_tag(job.parent_run_id, f"{TAG_REUSED}{digest}", done.info.run_id)
    log.info("skipped: run %s (%s) already FINISHED with this config", done.info.run_id, done.info.run_name)
    return dict(done.data.metrics)


def _log_figures(
    run_log: RunLog,
    model: torch.nn.Module,
    data: Data,
    history: History,
    test_predictions: torch.Tensor,
    pca_samples: int,
    seed: int,
) -> None:
    """The notebook's figures: samples, curves, PCA of the input and each hidden layer, confusion."""
    rng = torch.Generator().manual_seed(seed)
    n = len(data.train)
    shown = torch.randperm(n, generator=rng)[:16].to(data.train.x.device)
    run_log.log_figure(
        figures.samples(data.train.x[shown], data.train.y[shown], data.classes, data.sample_shape), "samples"
    )
    run_log.log_figure(figures.curves(history), "curves")
    picked = torch.randperm(n, generator=rng)[: pca_samples or n].to(data.train.x.device)
    x, labels = data.train.x[picked], data.train.y[picked].cpu().numpy()
    run_log.log_figure(
        figures.pca_scatter(x.cpu().numpy(), labels, data.classes, f"input space ({len(picked)} samples)"),
        "pca_input",
    )
    for layer, reps in representations(model, x).items():
        run_log.log_figure(
            figures.pca_scatter(reps.numpy(), labels, data.classes, f"after {layer} ({len(picked)} samples)"),
            f"pca_{layer}",
        )
    run_log.log_figure(
        figures.confusion_matrix(data.test.y.cpu().numpy(), test_predictions.cpu().numpy(), data.classes),
        "confusion_matrix",
    )
