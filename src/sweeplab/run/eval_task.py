"""Evaluate a trained model on one split of a dataset: what ``sweeplab-eval`` does.

The model is the run's logged model (``run_id=``) or a checkpoint's weights (``checkpoint=``);
the data config and evaluation batch size default to the ones it was trained with, so the
test split gives back the run's own ``test/acc`` exactly. Results go to a new MLflow run in the
same experiment, tagged with the evaluated run's id.
"""

import functools
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sweeplab.config.device import resolve_device
from sweeplab.config.errors import ConfigError
from sweeplab.config.schema import EvalConfig
from sweeplab.data import Data, Split, load_data
from sweeplab.models import MODELS
from sweeplab.run import checkpoint
from sweeplab.tracking import figures
from sweeplab.tracking.artifacts import writing
from sweeplab.tracking.store import RunLog, Tracker
from sweeplab.tracking.tags import TAG_EVALUATED, TAG_EVALUATED_FROM, flatten
from sweeplab.training.loop import evaluate

log = logging.getLogger(__name__)


def run_eval(cfg: DictConfig, launch_dir: Path) -> dict[str, float]:
    """Evaluate, print and log; return the logged metrics."""
    settings: EvalConfig = OmegaConf.to_object(cfg)
    tracker = Tracker(settings.tracking, launch_dir, os.environ)
    source_run, trained, state = _source(settings, tracker)
    device = resolve_device(settings.device)
    data_cfg = cfg.data if cfg.data is not None else trained.data
    data = load_data(data_cfg, device)
    split = getattr(data, settings.split)
    if not len(split):
        raise ConfigError(
            f"split={settings.split} is empty (data.val_size=0): use split=train or split=test."
        )
    model = _model(settings, tracker, trained, state, data, device)
    try:
        result = evaluate(model, split, settings.eval_batch_size or trained.trainer.eval_batch_size)
    except RuntimeError as exc:  # a dataset of another input size than the model was trained on
        raise ConfigError(
            f"data={data_cfg.name} ({data.in_features} input features, {len(data.classes)} classes) "
            f"does not fit the evaluated model: {str(exc).splitlines()[0]}. Pick a dataset shaped like "
            f"the one it was trained on ({trained.data.name})."
        ) from exc
    name = settings.split
    correct = torch.bincount(split.y[result.predictions == split.y], minlength=len(data.classes))
    counts = torch.bincount(split.y, minlength=len(data.classes))
    per_class = {
        label: (c / n).item() for label, c, n in zip(data.classes, correct, counts, strict=True) if n
    }
    metrics = {f"{name}/loss": result.loss, f"{name}/acc": result.acc}
    metrics |= {f"{name}/class_acc/{_metric_safe(label)}": acc for label, acc in per_class.items()}
    print(_table(name, result.loss, result.acc, per_class))

    evaluated = source_run.info.run_id if source_run else state["run_id"]
    params = flatten(OmegaConf.to_container(cfg, resolve=True) | {"data": OmegaConf.to_container(data_cfg)})
    with tracker.run(
        f"eval {name}: {source_run.info.run_name if source_run else evaluated}",
        {TAG_EVALUATED: evaluated, TAG_EVALUATED_FROM: settings.checkpoint or "logged model"},
        params,
        experiment_id=source_run.info.experiment_id if source_run else None,
    ) as run_log:
        run_log.log_metrics(metrics, step=0)
        if settings.figures:
            _log_figures(run_log, model, data, split, result.predictions, name, settings)
    log.info("logged to run %s (evaluating %s)", run_log.run_id, evaluated)
    return metrics


def _source(settings: EvalConfig, tracker: Tracker) -> tuple[Any, DictConfig, dict[str, Any] | None]:
    """The evaluated run (None if a checkpoint's run is not in this store), the config it was
    trained with, and the checkpoint's state when evaluating a checkpoint."""
    if settings.checkpoint:
        state = checkpoint.load(Path(settings.checkpoint).expanduser())
        try:
            run = tracker.client.get_run(state["run_id"])
        except MlflowException:
            run = None
        return run, OmegaConf.create(state["config"]), state
    try:
        run = tracker.client.get_run(settings.run_id)
    except MlflowException as exc:
        raise ConfigError(
            f"run_id={settings.run_id}: no such MLflow run in {tracker.uri}; sweeplab-runs ls lists the runs."
        ) from exc
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.client.download_artifacts(settings.run_id, "config/resolved.yaml", tmp)
        except (MlflowException, OSError) as exc:
            raise ConfigError(
                f"run_id={settings.run_id}: the run has no config/resolved.yaml artifact; "
                "was it logged by sweeplab?"
            ) from exc
        return run, OmegaConf.load(path), None


def _model(
    settings: EvalConfig,
    tracker: Tracker,
    trained: DictConfig,
    state: dict[str, Any] | None,
    data: Data,
    device: torch.device,
) -> nn.Module:
    if state is not None:
        model = MODELS.build(trained.model, data.in_features, len(data.classes))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ConfigError(
                f"checkpoint={settings.checkpoint}: its weights do not fit {trained.model.name} on "
                f"{data.in_features} inputs and {len(data.classes)} classes: {str(exc).splitlines()[0]}"
            ) from exc
        return model.to(device)
    try:
        return tracker.load_model(settings.run_id, map_location=device)
    except (MlflowException, OSError) as exc:
        raise ConfigError(
            f"run_id={settings.run_id}: the run has no logged model (was tracking.log_model=false?); "
            "evaluate one of its checkpoints with checkpoint=<path> instead."
        ) from exc


def _log_figures(
    run_log: RunLog,
    model: nn.Module,
    data: Data,
    split: Split,
    predictions: torch.Tensor,
    name: str,
    settings: EvalConfig,
) -> None:
    """The split's confusion matrix, and PCA of its inputs and of every hidden layer."""
    y, y_pred = split.y.cpu().numpy(), predictions.cpu().numpy()
    n = len(split)
    picked = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
    picked = picked[: settings.tracking.pca_samples or n]
    jobs = {
        "confusion_matrix": functools.partial(figures.confusion_matrix, y, y_pred, data.classes, split=name),
        **figures.pca_jobs(model, split.x[picked.to(split.x.device)], y[picked.numpy()], data.classes),
    }
    with writing(figures.png_files(jobs)) as files:
        run_log.log_folder(files.wait(), "figures")


def _metric_safe(label: str) -> str:
    """Class names as MLflow metric-name characters (letters, digits, _ - . space : /)."""
    return re.sub(r"[^\w\-. :/]", "_", label)


def _table(split: str, loss: float, acc: float, per_class: dict[str, float]) -> str:
    width = max(len(label) for label in per_class)
    lines = [f"{split}/loss {loss:.4f}", f"{split}/acc  {acc:.4f}", "per-class accuracy:"]
    lines += [f"  {label:<{width}}  {value:.4f}" for label, value in per_class.items()]
    return "\n".join(lines)
