"""The sweep protocol: one MLflow parent run per multirun, and how its jobs treat each other.

The Hydra callback runs in the launching process: before any job starts it creates the store,
the experiment and the parent run once (jobs that race to migrate a fresh sqlite file or to
create the experiment lose runs), and when the sweep ends it writes the summary onto the parent.
Each job, wherever it runs, asks ``previous_run`` whether its config already FINISHED (reuse it)
or was interrupted (resume it), and ``job_outcome`` applies ``sweep.on_error`` to its failures.
"""

import atexit
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sweeplab.commands import imports_done
from sweeplab.interrupt import Interrupted
from sweeplab.job import ENV_PARENT_RUN, ENV_URI, Job
from sweeplab.record import (
    TAG_HASH,
    TAG_OVERRIDES,
    TAG_PARENT,
    TAG_REUSED,
    TAG_SWEEP,
    TAG_SWEEP_KEY,
    TAG_SWEEP_OVERRIDES,
)
from sweeplab.schema import SweepConfig, TrackingConfig

# Hydra instantiates the callback for every run, multirun or not: MLflow, pandas and matplotlib
# are imported where a sweep needs them, so that a single run's config error returns at once.
if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from sweeplab.resume import ResumePoint
    from sweeplab.tracking import Tracker

log = logging.getLogger(__name__)


def swept_keys(config: DictConfig) -> list[str]:
    """Config keys the sweep varies: sweep overrides (``a=1,2``) and a sweeper's ``params``."""
    parser = OverridesParser.create()
    keys = [
        o.key_or_group
        for o in parser.parse_overrides(list(config.hydra.overrides.task))
        if o.is_sweep_override()
    ]
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return list(dict.fromkeys([*keys, *params]))


def sweep_key(config: DictConfig) -> str:
    """Equal for the same sweep command: its overrides and the sweeper's settings."""
    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
    payload = {"overrides": list(config.hydra.overrides.task), "sweeper": sweeper}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MlflowSweepCallback(Callback):
    """Parent run at multirun start, summary and FINISHED at multirun end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from sweeplab.tracking import Tracker

        imports_done()  # what the launching process needs is imported: collect as usual

        tracking: TrackingConfig = OmegaConf.to_object(config.tracking)
        tracker = Tracker(tracking, Path(config.hydra.runtime.cwd), os.environ)
        key = sweep_key(config)
        interrupted = tracker.newest_run("KILLED", {TAG_SWEEP: "parent", TAG_SWEEP_KEY: key})
        if interrupted:  # the same sweep was interrupted: carry on under its parent
            parent = tracker.reopen(interrupted.info.run_id)
            log.info("resuming the interrupted sweep of parent run %s", parent.run_id)
        else:
            overrides = " ".join(config.hydra.overrides.task)
            parent = tracker.start_run(
                f"sweep: {overrides}" if overrides else "sweep",
                {
                    TAG_SWEEP: "parent",
                    TAG_SWEEP_KEY: key,
                    TAG_OVERRIDES: overrides,
                    TAG_SWEEP_OVERRIDES: json.dumps(list(config.hydra.overrides.task)),
                },
            )
        # every job logs to exactly this store and nests its run under this parent
        os.environ[ENV_URI] = tracker.uri
        os.environ[ENV_PARENT_RUN] = parent.run_id
        atexit.register(_end_abandoned_sweep, parent.run_id)
        log.info(
            "MLflow parent run %s in experiment %r (%s)", parent.run_id, tracking.experiment_name, tracker.uri
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from sweeplab.summary import summarize, unfinished_killed
        from sweeplab.tracking import RunLog, Tracker

        parent_id = os.environ.pop(ENV_PARENT_RUN, None)
        if parent_id is None:
            return
        tracking: TrackingConfig = OmegaConf.to_object(config.tracking)
        sweep: SweepConfig = OmegaConf.to_object(config.sweep)
        tracker = Tracker(tracking, Path(config.hydra.runtime.cwd), os.environ, parent_run_id=parent_id)
        table = summarize(tracker.client, parent_id, tracker.experiment_id, swept_keys(config), sweep)
        killed = unfinished_killed(table)
        status = "KILLED" if killed else "FINISHED"  # KILLED: the same command resumes the sweep
        reason = f"{killed} job(s) stopped before finishing: re-run the same command to resume them"
        RunLog(tracker.client, parent_id).end(status, reason if killed else None)
        finished = table[(table.status == "FINISHED") & table[sweep.objective].notna()]
        best = (
            f"best {finished.iloc[0].run_name} ({finished.iloc[0].run_id}) "
            f"{sweep.objective} {finished.iloc[0][sweep.objective]:.4f}"
            if len(finished)
            else "no finished child"
        )
        log.info(
            "sweep %s: parent run %s, %d of %d children finished, %s; summary in the parent's "
            "summary/sweep.md | %s",
            status,
            parent_id,
            len(finished),
            len(table),
            best,
            tracker.where(parent_id),
        )


def previous_run(tracker: "Tracker", digest: str, job: Job) -> "dict[str, float] | ResumePoint | None":
    """What an earlier sweep left for this job's config hash: the metrics of a FINISHED run (the
    job is skipped), a KILLED run with a checkpoint (the job resumes it), or nothing."""
    from sweeplab.resume import ResumePoint, latest_checkpoint

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


@contextlib.contextmanager
def job_outcome(job: Job, sweep: SweepConfig) -> Iterator[None]:
    """A sweep job's failures, by ``sweep.on_error``: ``continue`` logs the error and lets the
    sweep go on (the block's exception is swallowed); ``raise`` ends the parent FAILED and
    re-raises. An interrupted job ends the parent KILLED, so a re-run resumes the sweep."""
    if not job.multirun:
        yield
        return
    try:
        yield
    except Interrupted as stop:
        _end_parent(job, "KILLED", f"a job was {stop}")
        raise
    except Exception as exc:
        if sweep.on_error == "continue":
            log.error("job failed, the sweep goes on: %s: %s", type(exc).__name__, exc)
            return
        _end_parent(job, "FAILED", f"{type(exc).__name__}: {exc}")
        raise


def end_dead_job(overrides: list[str], reason: str) -> None:
    """End KILLED, with ``reason``, the run a job left RUNNING when its process died: a re-run of
    the sweep then resumes it from its last checkpoint. Called by the launcher, which outlives
    the job; a job that died before opening its run has nothing to end."""
    from mlflow import MlflowClient

    parent_id = os.environ.get(ENV_PARENT_RUN)
    if not parent_id:
        return
    client = MlflowClient(os.environ[ENV_URI])
    joined = " ".join(overrides).replace("'", "\\'")
    parent = client.get_run(parent_id)
    _kill_running_children(client, parent, reason, f" and tags.`{TAG_OVERRIDES}` = '{joined}'")


def _end_parent(job: Job, status: str, reason: str) -> None:
    """The callback's ``on_multirun_end`` does not run when a job stops the sweep."""
    from mlflow import MlflowClient

    from sweeplab.tracking import RunLog

    if job.parent_run_id:
        RunLog(MlflowClient(os.environ[ENV_URI]), job.parent_run_id).end(status, reason)


def _end_abandoned_sweep(parent_id: str) -> None:
    """At exit of the launching process: a sweep that never reached ``on_multirun_end`` (a
    launcher that raised, e.g. joblib when a worker process was killed) leaves no run RUNNING.
    Its parent and the children it left running end KILLED, so the same command resumes them."""
    if os.environ.get(ENV_PARENT_RUN) != parent_id:  # on_multirun_end ran
        return
    from mlflow import MlflowClient

    from sweeplab.tracking import RunLog

    client = MlflowClient(os.environ[ENV_URI])
    parent = client.get_run(parent_id)
    if parent.info.status != "RUNNING":  # a job already ended it (sweep.on_error=raise, Ctrl-C)
        return
    reason = "the sweep stopped before this job ended: re-run the same command to resume it"
    left_running = _kill_running_children(client, parent, reason)
    RunLog(client, parent_id).end(
        "KILLED", f"the sweep stopped early; {len(left_running)} job(s) left unfinished"
    )
    log.error(
        "sweep KILLED: it stopped before its end; parent run %s and %d running job(s) ended KILLED "
        "(%s): re-run the same command to resume them",
        parent_id,
        len(left_running),
        ", ".join(run.info.run_name for run in left_running) or "none",
    )


def _kill_running_children(
    client: "MlflowClient", parent: "Run", reason: str, where: str = ""
) -> list["Run"]:
    """End KILLED, with ``reason``, the children of ``parent`` still RUNNING (``where``: a
    further filter); return them."""
    from sweeplab.tracking import RunLog

    left_running = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{TAG_PARENT}` = '{parent.info.run_id}' and attributes.status = 'RUNNING'{where}",
    )
    for run in left_running:
        RunLog(client, run.info.run_id).end("KILLED", reason)
    return left_running
