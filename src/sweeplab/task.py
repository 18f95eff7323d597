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
from mlflow.data.dataset import Dataset
from omegaconf import DictConfig, OmegaConf

from sweeplab import figures
from sweeplab.checkpoint import Checkpointer, restore, training_state
from sweeplab.data import Data, load_data
from sweeplab.device import resolve_device
from sweeplab.errors import ConfigError
from sweeplab.interrupt import Interrupted, SignalGuard
from sweeplab.job import Job
from sweeplab.models import MODELS
from sweeplab.optimizers import OPTIMIZERS
from sweeplab.provenance import code_state, dataset_input, environment_tags
from sweeplab.render import FigureJobs, rendering
from sweeplab.resume import ResumePoint, latest_checkpoint, locate, own_overrides, resumed_config
from sweeplab.schedulers import SCHEDULERS
from sweeplab.schema import CheckpointConfig, SweepConfig, TrackingConfig, TrainerConfig
from sweeplab.seeding import seed_everything
from sweeplab.tracking import (
    TAG_CHECKPOINTS,
    TAG_HASH,
    TAG_REUSED,
    TAG_STOPPED,
    RunLog,
    Tracker,
    config_hash,
    result_config,
)
from sweeplab.train import History, MetricRows, Progress, evaluate, fit, steps_per_epoch

log = logging.getLogger(__name__)

TAG_PARENT = "mlflow.parentRunId"
# on a resumed run: the checkpoint it last continued from
TAG_RESUMED = "sweeplab.resumed_from"
TAG_RESUME_CHANGED = "sweeplab.resume_changed"


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


def run(cfg: DictConfig, job: Job, guard: SignalGuard | None = None) -> dict[str, float]:
    """Train and evaluate the configured model, logging everything to one MLflow run.

    ``guard``, installed by the caller, turns SIGINT/SIGTERM into a checkpoint at the next step
    boundary and a KILLED run.

    With ``resume=<run id|checkpoint>``, or inside a sweep that finds a KILLED run with this
    config, the run is reopened and training continues from its latest checkpoint.
    """
    watch = Stopwatch()
    with watch("setup"):
        tracking: TrackingConfig = OmegaConf.to_object(cfg.tracking)
        sweep: SweepConfig = OmegaConf.to_object(cfg.sweep)
        tracker, point = None, None
        if cfg.resume:
            tracker = Tracker(tracking, job.launch_dir, os.environ)
            point = locate(cfg.resume, tracker.client)
            cfg = resumed_config(cfg, point, job.overrides)
        elif job.parent_run_id:  # a sweep's store exists already: ask it before loading any data
            tracker = Tracker(tracking, job.launch_dir, os.environ, job.parent_run_id)
            if sweep.skip_completed:
                digest = config_hash(cfg)
                done = _reuse_finished(tracker, digest, job)
                if done is not None:
                    return done
                point = _interrupted(tracker, digest, job)
        tracking = OmegaConf.to_object(cfg.tracking)  # a resumed run's own (figures, log_model)
        trainer: TrainerConfig = OmegaConf.to_object(cfg.trainer)
        checkpointing: CheckpointConfig = OmegaConf.to_object(cfg.checkpoint)
        device = resolve_device(cfg.device)
        generator = seed_everything(cfg.seed)
    with watch("data"):
        data = load_data(cfg.data, device)
        dataset = dataset_input(cfg.data.name, data)  # hashing what was read is part of reading it
    with watch("setup"):
        model = MODELS.build(cfg.model, data.in_features, len(data.classes)).to(device)
        optimizer = OPTIMIZERS.build(cfg.optimizer, model.parameters())
        per_epoch = steps_per_epoch(len(data.train), trainer)
        scheduler = SCHEDULERS.build(cfg.scheduler, optimizer, per_epoch * trainer.epochs, per_epoch)
        progress = Progress.start(per_epoch * trainer.epochs, device)
        if point:
            _restore(point, cfg, dataset, model, optimizer, scheduler, generator, progress)
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
    guard = guard or SignalGuard()  # not installed: nothing ever sets its flag
    with contextlib.ExitStack() as open_run:
        with watch("tracking"):  # creating the run and logging its params count as tracking too
            run_log = open_run.enter_context(
                tracker.start_run(
                    cfg,
                    job,
                    code_tags | environment_tags(device),
                    resume_run_id=point.run_id if point else None,
                )
            )
            if point:
                checkpoints = Checkpointer(point.folder, checkpointing)
                _reopen(run_log, point)
            else:
                # one folder per run: a fixed hydra.run.dir must not mix two runs' checkpoints
                checkpoints = Checkpointer(job.output_dir / "checkpoints" / run_log.run_id, checkpointing)
                run_log.set_tag(TAG_CHECKPOINTS, str(checkpoints.folder.resolve()))
                _log_inputs(run_log, cfg, job, dataset, diff)
        meta = {
            "run_id": run_log.run_id,
            "config": result_config(cfg),
            "overrides": own_overrides(job.overrides),
            "data_digest": dataset.digest,
        }

        def state(rows: MetricRows) -> dict:
            return training_state(model, optimizer, scheduler, generator, progress, rows, meta)

        def epoch_end(rows: MetricRows) -> None:
            """Checkpoint first, then log: a resume re-logs rows that never reached MLflow."""
            val_acc = progress.history.val_acc
            improved = bool(val_acc) and val_acc[-1] > max(val_acc[:-1], default=-1.0)
            with watch("checkpoint"):
                checkpoints.epoch_end(lambda: state(rows), progress.epoch, progress.step, improved)
            with watch("tracking"):
                run_log.log_rows(rows)

        try:
            with watch("training"), guard.deferred():
                history = fit(
                    model, data, optimizer, scheduler, trainer, generator, epoch_end, progress, guard
                )
        except Interrupted as stop:
            where = f"epoch {progress.epoch + 1} of {trainer.epochs}, step {progress.step}"
            saved = checkpoints.save(state([]), progress.epoch, progress.step) if stop.clean else None
            run_log.set_tag(
                TAG_STOPPED, f"{stop} at {where}; checkpoint: {saved or 'none (stopped at once)'}"
            )
            log.warning("%s at %s; resume with: sweeplab resume=%s", stop, where, run_log.run_id)
            raise
        with watch("evaluation"):
            test = evaluate(model, data.test, trainer.eval_batch_size)
        final = {"test/loss": test.loss, "test/acc": test.acc}
        if history.best_val_acc is not None:
            final["best/val_acc"] = history.best_val_acc
        with watch("tracking"):
            run_log.log_metrics(final, step=history.epoch_end_steps[-1])
        log.info("test/loss %.4f | test/acc %.4f", test.loss, test.acc)
        if tracking.figures:  # drawn in a child process while this one logs the model
            with watch("figures"):
                jobs = _figure_jobs(model, data, history, test.predictions, tracking.pca_samples, cfg.seed)
                drawing = open_run.enter_context(rendering(jobs))
        if tracking.log_model:
            with watch("model_logging"):
                run_log.log_model(model, data.test.x[:5])
        if tracking.figures:
            with watch("figures"):
                run_log.log_folder(drawing.wait(), "figures")
        run_log.log_metrics(watch.metrics(), step=history.epoch_end_steps[-1])
    last_val = {"val/loss": history.val_loss[-1], "val/acc": history.val_acc[-1]} if history.val_acc else {}
    return final | last_val


def _reuse_finished(tracker: Tracker, digest: str, job: Job) -> dict[str, float] | None:
    """Metrics of a FINISHED run with this job's config hash, recorded on the sweep's parent
    unless the run is already one of its children (a resumed sweep)."""
    done = tracker.newest_run("FINISHED", {TAG_HASH: digest})
    if done is None:
        return None
    if done.data.tags.get(TAG_PARENT) != job.parent_run_id:
        tracker.client.set_tag(job.parent_run_id, f"{TAG_REUSED}{digest}", done.info.run_id)
    log.info("skipped: run %s (%s) already FINISHED with this config", done.info.run_id, done.info.run_name)
    return dict(done.data.metrics)


def _interrupted(tracker: Tracker, digest: str, job: Job) -> ResumePoint | None:
    """A KILLED run with this job's config hash and a checkpoint: the sweep continues it, under
    its own parent."""
    killed = tracker.newest_run("KILLED", {TAG_HASH: digest})
    found = latest_checkpoint(killed) if killed else None
    if found is None:
        return None
    if killed.data.tags.get(TAG_PARENT) != job.parent_run_id:
        tracker.client.set_tag(killed.info.run_id, TAG_PARENT, job.parent_run_id)
    return ResumePoint(killed.info.run_id, *found)


def _restore(
    point: ResumePoint,
    cfg: DictConfig,
    dataset: Dataset,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    progress: Progress,
) -> None:
    """Training state from the checkpoint, after checking it was made from the same data."""
    if point.state["data_digest"] != dataset.digest and not cfg.resume_force:
        raise ConfigError(
            f"resume={point.run_id}: the data read now (data={cfg.data.name}, MD5 {dataset.digest}) differs "
            f"from what the run was trained on (MD5 {point.state['data_digest']}): check data.root, or add "
            "resume_force=true to continue on this data."
        )
    try:
        restore(point.state, model, optimizer, scheduler, generator, progress, bool(point.changed))
    except RuntimeError as exc:  # weights of another shape: resume_force cannot bridge that
        raise ConfigError(
            f"resume={point.run_id}: the checkpoint {point.path} does not fit the model now "
            f"configured ({point.describe_changes()}): {str(exc).splitlines()[0]}"
        ) from exc
    log.info(
        "resuming run %s from %s (epoch %d, step %d)", point.run_id, point.path, progress.epoch, progress.step
    )


def _log_inputs(run_log: RunLog, cfg: DictConfig, job: Job, dataset: Dataset, diff: str | None) -> None:
    """What a new run was made from: data digest, resolved config, uncommitted code, .hydra/."""
    run_log.log_dataset(dataset)
    run_log.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
    if diff:
        run_log.log_text(diff, "code/diff.patch")
    hydra_dir = job.output_dir / ".hydra"
    if hydra_dir.is_dir():
        run_log.log_folder(hydra_dir, ".hydra")


def _reopen(run_log: RunLog, point: ResumePoint) -> None:
    """Log the closing epoch's rows if the process died before MLflow got them; note the resume."""
    rows = point.state["rows"]
    logged = run_log.client.get_metric_history(run_log.run_id, "time/epoch_s")
    if rows and rows[-1][0] > max((m.step for m in logged), default=-1):
        run_log.log_rows(rows)
    run_log.set_tag(TAG_RESUMED, str(point.path))
    if point.changed:  # resume_force=true: say what no longer matches the params
        run_log.set_tag(TAG_RESUME_CHANGED, point.describe_changes()[:5000])


def _figure_jobs(
    model: torch.nn.Module,
    data: Data,
    history: History,
    test_predictions: torch.Tensor,
    pca_samples: int,
    seed: int,
) -> FigureJobs:
    """The notebook's figures: samples, curves, PCA of the input and each hidden layer, and the
    confusion matrix, as jobs over arrays copied off the device now."""
    rng = torch.Generator().manual_seed(seed)
    n, device = len(data.train), data.train.x.device
    shown = torch.randperm(n, generator=rng)[:16].to(device)
    sample_x, sample_y = data.train.x[shown].cpu().numpy(), data.train.y[shown].cpu().numpy()
    picked = torch.randperm(n, generator=rng)[: pca_samples or n].to(device)
    labels = data.train.y[picked].cpu().numpy()
    y_true, y_pred = data.test.y.cpu().numpy(), test_predictions.cpu().numpy()
    return {
        "samples": lambda: figures.samples(sample_x, sample_y, data.classes, data.sample_shape),
        "curves": lambda: figures.curves(history),
        **figures.pca_jobs(model, data.train.x[picked], labels, data.classes),
        "confusion_matrix": lambda: figures.confusion_matrix(y_true, y_pred, data.classes),
    }
