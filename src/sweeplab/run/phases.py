"""The phases of one training run, each a function with plain inputs and outputs.

``task.run`` calls them in order for one config; a driver that trains several configs in one
process calls the same phases per member. Data flows one way: ``Start`` (how the run begins)
-> ``Session`` (the built training objects) -> ``OpenRun`` (the open MLflow run and its
checkpoints) -> history, test evaluation, figures and model.
"""

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from mlflow.data.dataset import Dataset
from omegaconf import DictConfig, OmegaConf

from sweeplab.config.device import resolve_device
from sweeplab.config.errors import ConfigError
from sweeplab.config.job import Job
from sweeplab.config.schema import CheckpointConfig, SweepConfig, TrackingConfig, TrainerConfig
from sweeplab.config.validation import validate
from sweeplab.data import Data, load_data
from sweeplab.models import MODELS
from sweeplab.optimizers import OPTIMIZERS
from sweeplab.run import checkpoint
from sweeplab.run.checkpoint import Checkpointer
from sweeplab.run.resume import ResumePoint, locate, own_overrides, previous_run, resumed_config
from sweeplab.run.seeding import seed_everything
from sweeplab.run.timing import Stopwatch, timed
from sweeplab.schedulers import SCHEDULERS
from sweeplab.tracking import artifacts, figures
from sweeplab.tracking.provenance import code_state, dataset_input, environment_tags
from sweeplab.tracking.store import ModelFiles, RunLog, Tracker, tracking_uri
from sweeplab.tracking.tags import (
    TAG_CHECKPOINTS,
    TAG_RESUME_CHANGED,
    TAG_RESUMED,
    TAG_STOPPED,
    config_hash,
    result_config,
    run_name,
    run_params,
    run_tags,
)
from sweeplab.training import first_uses, rehearsal
from sweeplab.training.interrupt import Interrupted, SignalGuard
from sweeplab.training.loop import Evaluation, evaluate, fit, steps_per_epoch
from sweeplab.training.state import History, MetricRows, Progress, TrainingState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Start:
    """How a run begins: the config it trains, the store if already opened, what came before."""

    cfg: DictConfig
    tracker: Tracker | None = None
    resume: ResumePoint | None = None  # continue this run from its checkpoint
    finished_metrics: dict[str, float] | None = None  # a FINISHED run's metrics: nothing to train


@dataclasses.dataclass
class Session:
    """One run's validated settings and built training objects."""

    cfg: DictConfig
    trainer: TrainerConfig
    tracking: TrackingConfig
    checkpointing: CheckpointConfig
    device: torch.device
    data: Data
    dataset: Dataset  # what was read, with its digest, as an MLflow dataset input
    training: TrainingState
    watch: Stopwatch


@dataclasses.dataclass
class OpenRun:
    """One open MLflow run and the folder its checkpoints go to."""

    log: RunLog
    checkpoints: Checkpointer
    meta: dict[str, Any]  # what every checkpoint says about the run it belongs to
    link: str  # how a user opens the run: a command or a URL

    def contents(self, session: Session, rows: MetricRows) -> dict[str, Any]:
        return checkpoint.contents(session.training, rows, self.meta)

    def epoch_end(self, session: Session, rows: MetricRows) -> None:
        """Checkpoint first, then log: a resume re-logs rows that never reached MLflow."""
        progress = session.training.progress
        with session.watch("checkpoint"):
            self.checkpoints.epoch_end(
                lambda: self.contents(session, rows), progress.epoch, progress.step, progress.history.improved
            )
        with session.watch("tracking"):
            self.log.log_rows(rows)

    def stopped(self, session: Session, stop: Interrupted) -> None:
        """A checkpoint of exactly this step (if it is a step boundary), and where it stopped."""
        progress = session.training.progress
        where = f"epoch {progress.epoch + 1} of {session.trainer.epochs}, step {progress.step}"
        saved = (
            self.checkpoints.save(self.contents(session, []), progress.epoch, progress.step)
            if stop.clean
            else None
        )
        self.log.set_tag(TAG_STOPPED, f"{stop} at {where}; checkpoint: {saved or 'none (stopped at once)'}")
        log.warning("%s at %s; resume with: sweeplab resume=%s", stop, where, self.log.run_id)


def decide_start(cfg: DictConfig, job: Job, watch: Stopwatch, store: Tracker | None = None) -> Start:
    """Check the config, then decide: new, resumed (``resume=``, or a sweep's KILLED run of this
    config) or reused (a sweep's FINISHED run of this config). Inside a sweep the store exists
    already, so it is asked before any data is loaded (through ``store`` if given: the sweep's,
    shared by the members of a stack); a single run opens its store only once the rest is
    valid."""
    with watch("setup"):
        validate(cfg)
        tracking: TrackingConfig = OmegaConf.to_object(cfg.tracking)
        sweep: SweepConfig = OmegaConf.to_object(cfg.sweep)
        if cfg.resume:
            tracker = Tracker(tracking, job.launch_dir, os.environ)
            point = locate(cfg.resume, tracker.client)
            return Start(resumed_config(cfg, point, job.overrides), tracker, resume=point)
        if not job.parent_run_id:
            return Start(cfg)
        same = store is not None and store.uri == tracking_uri(tracking, job.launch_dir, os.environ)
        tracker = store if same else Tracker(tracking, job.launch_dir, os.environ, job.parent_run_id)
        previous = previous_run(tracker, config_hash(cfg), job) if sweep.skip_completed else None
        if isinstance(previous, ResumePoint):
            return Start(cfg, tracker, resume=previous)
        return Start(cfg, tracker, finished_metrics=previous)


def build(start: Start, watch: Stopwatch, loaded: "tuple[Data, Dataset] | None" = None) -> Session:
    """Validate the settings, load the data (or take ``loaded``, read once for a stack of runs
    on the same data), build model, optimizer and schedule, and restore them from the
    checkpoint when resuming."""
    cfg = start.cfg
    with watch("setup"):
        trainer: TrainerConfig = OmegaConf.to_object(cfg.trainer)
        tracking: TrackingConfig = OmegaConf.to_object(cfg.tracking)  # a resumed run's own
        checkpointing: CheckpointConfig = OmegaConf.to_object(cfg.checkpoint)
        device = resolve_device(cfg.device)
        generator = seed_everything(cfg.seed)
        if (tracking.figures or tracking.log_model) and loaded is None:
            # it prepares on another core while this one loads and trains
            artifacts.prefork(figures=tracking.figures, models=tracking.log_model)
        if device.type == "cuda":
            first_uses.start(device)  # while the data loads
    if loaded is None:
        with watch("data"):
            data = load_data(cfg.data, device)
            dataset = dataset_input(cfg.data.name, data)  # hashing what was read is part of reading it
    else:
        data, dataset = loaded
    with watch("setup"):
        model = MODELS.build(cfg.model, data.in_features, len(data.classes)).to(device)
        optimizer = OPTIMIZERS.build(cfg.optimizer, model.parameters())
        per_epoch = steps_per_epoch(len(data.train), trainer)
        scheduler = SCHEDULERS.build(cfg.scheduler, optimizer, per_epoch * trainer.epochs, per_epoch)
        progress = Progress.start(per_epoch * trainer.epochs, device)
        training = TrainingState(model, optimizer, scheduler, generator, progress)
        if start.resume:
            _restore(start.resume, cfg, dataset, training)
    return Session(cfg, trainer, tracking, checkpointing, device, data, dataset, training, watch)


def build_many(starts: list[tuple[Start, Stopwatch]]) -> list[Session]:
    """``build`` for runs on the same data (a stack's members): the first reads it, the others
    take what it read."""
    first = build(*starts[0])
    loaded = (first.data, first.dataset)
    return [first] + [build(start, watch, loaded) for start, watch in starts[1:]]


def rehearse(session: Session) -> None:
    """On a GPU: the run's first uses of its own kernels, made on copies in the background while
    its MLflow run opens (``sweeplab.training.rehearsal``); ``train`` waits for them."""
    if session.device.type == "cuda":
        with session.watch("setup"):
            first_uses.rehearse(rehearsal.solo(session.training, session.data, session.trainer))


@contextlib.contextmanager
def open_run(
    session: Session, start: Start, job: Job, tags: dict[str, str] | None = None
) -> Iterator[OpenRun]:
    """The MLflow run, new or reopened, for the length of the block: it ends FINISHED, KILLED
    on a signal, or FAILED with the reason. ``tags`` are added to a new run's own."""
    cfg, point = session.cfg, start.resume
    with session.watch("setup"):
        tracker = start.tracker or Tracker(session.tracking, job.launch_dir, os.environ)
        code_tags, diff = _running_code()
    log.info(
        "%s on %s (%d threads): %d train / %d val / %d test samples, %s",
        cfg.model.name,
        session.device,
        torch.get_num_threads(),
        len(session.data.train),
        len(session.data.val),
        len(session.data.test),
        tracker,
    )
    with contextlib.ExitStack() as stack:
        with session.watch("tracking"):  # creating the run and logging its params count as tracking
            run_log = stack.enter_context(
                tracker.run(
                    run_name(job.overrides, tracker.sweep_overrides),
                    run_tags(cfg, job) | code_tags | environment_tags(session.device) | (tags or {}),
                    run_params(cfg, job),
                    resume_run_id=point.run_id if point else None,
                )
            )
            if point:
                checkpoints = Checkpointer(point.folder, session.checkpointing)
                _reopen(run_log, point)
            else:
                # one folder per run: a fixed hydra.run.dir must not mix two runs' checkpoints
                checkpoints = Checkpointer(
                    job.output_dir / "checkpoints" / run_log.run_id, session.checkpointing
                )
                run_log.set_tag(TAG_CHECKPOINTS, str(checkpoints.folder.resolve()))
                _log_inputs(run_log, cfg, job, session.dataset, diff)
        meta = {
            "run_id": run_log.run_id,
            "config": result_config(cfg),
            "overrides": own_overrides(job.overrides),
            "data_digest": session.dataset.digest,
        }
        yield OpenRun(run_log, checkpoints, meta, tracker.ui_link(run_log.run_id))


@timed("training")
def train_with_checkpoints(session: Session, mlflow_run: OpenRun, guard: SignalGuard) -> History:
    """Train to the configured epoch; each epoch ends with a checkpoint and its metrics logged.
    A signal stops at the next step boundary with a checkpoint of that step."""
    with session.watch("setup"):
        first_uses.wait()  # the rehearsal is done with the GPU before training uses it
    try:
        with guard.deferred():
            return fit(
                session.training,
                session.data,
                session.trainer,
                functools.partial(mlflow_run.epoch_end, session),
                guard,
            )
    except Interrupted as stop:
        mlflow_run.stopped(session, stop)
        raise


@timed("evaluation")
def evaluate_test(session: Session, mlflow_run: OpenRun, history: History) -> Evaluation:
    """Loss and accuracy on every test sample, logged with the best validation accuracy."""
    test = evaluate(session.training.model, session.data.test, session.trainer.eval_batch_size)
    with session.watch("tracking"):
        mlflow_run.log.log_metrics(_final(history, test), step=history.epoch_end_steps[-1])
    log.info("test/loss %.4f | test/acc %.4f", test.loss, test.acc)
    return test


def log_outputs(session: Session, mlflow_run: OpenRun, history: History, test: Evaluation) -> None:
    """Figures and the model (their files written by a child process), and the seconds every
    phase took."""
    log_all_outputs([(session, mlflow_run, history, test)])


Outcome = tuple[Session, OpenRun, History, Evaluation]


def log_all_outputs(outcomes: list[Outcome]) -> None:
    """``log_outputs`` for several runs at once (a stack's members): their files are written
    by child processes, one per core, each figure that depends only on the data and the seed
    once per seed; this process logs each run's files as soon as they are all written."""
    wanted = [_figure_jobs(*outcome) for outcome in outcomes]
    files: artifacts.FileJobs = {}
    pending: dict[str, tuple[RunLog, ModelFiles]] = {}
    try:
        for (session, mlflow_run, _, _), jobs in zip(outcomes, wanted, strict=True):  # run by run
            if session.tracking.log_model:  # first: its files take a fraction of a figure's time
                with session.watch("model_logging"):
                    model = mlflow_run.log.new_model(session.training.model, session.data.test.x[:5])
                pending[_model_folder(mlflow_run)] = (mlflow_run.log, model)
                files[_model_folder(mlflow_run)] = model
            files |= figures.png_files({file: make for file, (_, make) in jobs.items()})
        first_uses.wait()  # no thread running should a child be forked now
        with artifacts.writing(files, processes=os.cpu_count() or 1) as written:
            for (session, mlflow_run, history, _), jobs in zip(outcomes, wanted, strict=True):
                step = history.epoch_end_steps[-1]
                name = _model_folder(mlflow_run)
                if session.tracking.log_model:
                    with session.watch("model_logging"):  # waiting for its files included
                        folder = written.ready([name])
                        mlflow_run.log.log_model(pending.pop(name)[1], folder / name, step)
                if jobs:
                    with session.watch("figures"), tempfile.TemporaryDirectory() as own:
                        folder = written.ready(f"{file}.png" for file in jobs)
                        for file, (figure, _) in jobs.items():
                            shutil.copyfile(folder / f"{file}.png", Path(own) / f"{figure}.png")
                        mlflow_run.log.log_folder(Path(own), "figures")
                mlflow_run.log.log_metrics(session.watch.metrics(), step=step)
            written.wait()
    finally:
        for run_log, model in pending.values():  # its files were never logged
            run_log.drop_model(model)


def _model_folder(mlflow_run: OpenRun) -> str:
    """Where a run's logged model is written among the files of several runs."""
    return f"model-{mlflow_run.log.run_id}"


def _figure_jobs(
    session: Session, mlflow_run: OpenRun, history: History, test: Evaluation
) -> dict[str, tuple[str, Callable[[], Any]]]:
    """A run's figures by file name (a seed's for those the model does not change, the run's
    own for the others), each with the name it is logged under and its job."""
    if not session.tracking.figures:
        return {}
    with session.watch("figures"):
        jobs = figures.run_jobs(
            session.training.model,
            session.data,
            history,
            test.predictions,
            session.tracking.pca_samples,
            session.cfg.seed,
        )
    seed = f"seed{session.cfg.seed}-{session.tracking.pca_samples}"
    return {
        (f"{name}-{seed}" if name in figures.MODEL_FREE else f"{name}-{mlflow_run.log.run_id}"): (name, make)
        for name, make in jobs.items()
    }


def results(history: History, test: Evaluation) -> dict[str, float]:
    """What the run returns to a sweeper: test metrics and the last validation point."""
    last_val = {"val/loss": history.val_loss[-1], "val/acc": history.val_acc[-1]} if history.val_acc else {}
    return _final(history, test) | last_val


def _final(history: History, test: Evaluation) -> dict[str, float]:
    final = {"test/loss": test.loss, "test/acc": test.acc}
    if history.best_val_acc is not None:
        final["best/val_acc"] = history.best_val_acc
    return final


def report(session: Session, mlflow_run: OpenRun, metrics: dict[str, float]) -> None:
    """The run's last line: how it ended, its objective, its id, and where to look at it."""
    objective = session.cfg.sweep.objective
    shown = {key: metrics[key] for key in dict.fromkeys([objective, "test/acc"]) if key in metrics}
    values = ", ".join(f"{key} {value:.4f}" for key, value in shown.items())
    log.info("run %s FINISHED: %s | %s", mlflow_run.log.run_id, values, mlflow_run.link)


def _restore(point: ResumePoint, cfg: DictConfig, dataset: Dataset, training: TrainingState) -> None:
    """Training state from the checkpoint, after checking it was made from the same data."""
    if point.state["data_digest"] != dataset.digest and not cfg.resume_force:
        raise ConfigError(
            f"resume={point.run_id}: the data read now (data={cfg.data.name}, MD5 {dataset.digest}) differs "
            f"from what the run was trained on (MD5 {point.state['data_digest']}): check data.root, or add "
            "resume_force=true to continue on this data."
        )
    try:
        training.load_state_dict(point.state, reconfigured=bool(point.changed))
    except RuntimeError as exc:  # weights of another shape: resume_force cannot bridge that
        raise ConfigError(
            f"resume={point.run_id}: the checkpoint {point.path} does not fit the model now "
            f"configured ({point.describe_changes()}): {str(exc).splitlines()[0]}"
        ) from exc
    progress = training.progress
    log.info(
        "resuming run %s from %s (epoch %d, step %d)", point.run_id, point.path, progress.epoch, progress.step
    )


@functools.cache
def _running_code() -> tuple[dict[str, str], str | None]:
    """The git state of sweeplab's checkout, read once per process however many runs it makes:
    the code a process runs is what it imported."""
    return code_state(Path(__file__).parent)


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
