"""What ``resume=`` points at, and the config a resumed run continues with.

``resume=<run id>`` needs no other override: the run's own overrides (saved in its checkpoint)
are composed again, and any override given beside ``resume`` is applied on top. If the result
differs from what the run was trained with in a key that changes results, the resume is refused
with those keys listed, unless ``resume_force=true``.
"""

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from sweeplab.config.errors import ConfigError
from sweeplab.config.job import Job
from sweeplab.run.checkpoint import load, load_latest
from sweeplab.tracking.tags import (
    NOT_COMPARED_ON_RESUME,
    RESUME_KEYS,
    TAG_CHECKPOINTS,
    TAG_HASH,
    TAG_PARENT,
    TAG_REUSED,
    flatten,
    result_config,
)

if TYPE_CHECKING:
    from sweeplab.tracking.store import Tracker

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ResumePoint:
    """A run to continue and the checkpoint (loaded) it continues from."""

    run_id: str
    path: Path
    state: dict[str, Any]
    # keys resume_force=true let change: (trained with, continued with)
    changed: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def describe_changes(self) -> str:
        return "; ".join(f"{key}: {before!r} -> {after!r}" for key, (before, after) in self.changed.items())


def locate(spec: str, client: MlflowClient) -> ResumePoint:
    """``spec`` is a checkpoint file or the id of a run that saved checkpoints."""
    if spec.endswith(".pt") or Path(spec).exists():
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"resume={spec}: no such checkpoint file.")
        state = load(path)
        _resumable(_run(client, state["run_id"], f"resume={spec} (a checkpoint of run {state['run_id']})"))
        return ResumePoint(state["run_id"], path, state)
    run = _run(client, spec, f"resume={spec}")
    _resumable(run)
    found = latest_checkpoint(run)
    if found is None:
        folder = run.data.tags.get(TAG_CHECKPOINTS, "(none recorded)")
        raise ConfigError(
            f"resume={spec}: run {run.info.run_name!r} has no checkpoint to resume from in {folder}; "
            "it stopped before its first checkpoint (checkpoint.every_n_epochs): run it again instead."
        )
    return ResumePoint(run.info.run_id, *found)


def latest_checkpoint(run: Run) -> tuple[Path, dict[str, Any]] | None:
    folder = run.data.tags.get(TAG_CHECKPOINTS)
    return load_latest(Path(folder)) if folder else None


def _run(client: MlflowClient, run_id: str, what: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(
            f"{what}: no such MLflow run in {client.tracking_uri}. Expected a run id (sweeplab-runs ls "
            "lists them) or the path of a .pt file in a job's checkpoints/ folder."
        ) from exc


def _resumable(run: Run) -> None:
    if run.info.status == "FINISHED":
        raise ConfigError(
            f"resume={run.info.run_id}: run {run.info.run_name!r} is already FINISHED; "
            "there is nothing to resume (start a new run to train longer)."
        )
    if run.info.status == "RUNNING":  # killed without a word (kill -9, a lost node), or still going
        log.warning(
            "run %s is still marked RUNNING: resuming it assumes no other process is training it",
            run.info.run_id,
        )


def resumed_config(cfg: DictConfig, point: ResumePoint, overrides: list[str]) -> DictConfig:
    """The run's own overrides composed again with ``overrides`` (minus the resume keys) on top;
    refused if that changes results, unless ``cfg.resume_force``."""
    parser = OverridesParser.create()
    given = parser.parse_overrides(own_overrides(overrides))
    replaced = {o.key_or_group for o in given}
    saved = [o for o in parser.parse_overrides(point.state["overrides"]) if o.key_or_group not in replaced]
    composed = compose("config", overrides=[o.input_line for o in [*saved, *given]])
    point.changed = differences(point.state["config"], result_config(composed))
    if point.changed and not cfg.resume_force:
        raise ConfigError(
            f"resume={cfg.resume}: the config differs from the one run {point.run_id} was trained with "
            f"in {', '.join(point.changed)} ({point.describe_changes()}). Drop those overrides to "
            "resume it as it was, or add resume_force=true to continue with the new values."
        )
    composed.resume, composed.resume_force = cfg.resume, cfg.resume_force
    return composed


def own_overrides(overrides: list[str]) -> list[str]:
    """A job's overrides minus ``resume``/``resume_force``: what a resume composes again."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.input_line for o in parsed if o.key_or_group not in RESUME_KEYS]


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two result configs: (saved, current)."""
    before, after = flatten(saved), flatten(current)
    keys = sorted((before.keys() | after.keys()) - set(NOT_COMPARED_ON_RESUME))
    return {key: (before.get(key), after.get(key)) for key in keys if before.get(key) != after.get(key)}


def previous_run(tracker: "Tracker", digest: str, job: Job) -> "dict[str, float] | ResumePoint | None":
    """What an earlier sweep left for this job's config hash: the metrics of a FINISHED run (the
    job is skipped), a KILLED run with a checkpoint (the job resumes it), or nothing."""
    done = tracker.newest_run("FINISHED", {TAG_HASH: digest})
    if done is not None:
        if done.data.tags.get(TAG_PARENT) != job.parent_run_id:  # recorded on this sweep's parent
            tracker.client.set_tag(job.parent_run_id, f"{TAG_REUSED}{digest}", done.info.run_id)
        log.info(
            "skipped: run %s (%s) already FINISHED with this config", done.info.run_id, done.info.run_name
        )
        return dict(done.data.metrics)
    killed = tracker.newest_run("KILLED", {TAG_HASH: digest})
    found = latest_checkpoint(killed) if killed else None
    if found is None:
        return None
    if killed.data.tags.get(TAG_PARENT) != job.parent_run_id:  # continued under this sweep
        tracker.client.set_tag(killed.info.run_id, TAG_PARENT, job.parent_run_id)
    return ResumePoint(killed.info.run_id, *found)
