"""How the jobs of a sweep treat their failures, and the runs a dead job leaves behind.

``job_outcome`` applies ``sweep.on_error`` where a job runs; ``end_dead_job`` is called by a
launcher that outlives a job whose process died; ``kill_running_children`` ends what a stopped
sweep left RUNNING, so that re-running the same command resumes it.
"""

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sweeplab.config.job import ENV_PARENT_RUN, ENV_URI, Job
from sweeplab.config.schema import SweepConfig
from sweeplab.tracking.tags import TAG_OVERRIDES, TAG_PARENT
from sweeplab.training.interrupt import Interrupted

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)


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
    kill_running_children(client, parent, reason, f" and tags.`{TAG_OVERRIDES}` = '{joined}'")


def _end_parent(job: Job, status: str, reason: str) -> None:
    """The callback's ``on_multirun_end`` does not run when a job stops the sweep."""
    from mlflow import MlflowClient

    from sweeplab.tracking.store import RunLog

    if job.parent_run_id:
        RunLog(MlflowClient(os.environ[ENV_URI]), job.parent_run_id).end(status, reason)


def kill_running_children(client: "MlflowClient", parent: "Run", reason: str, where: str = "") -> list["Run"]:
    """End KILLED, with ``reason``, the children of ``parent`` still RUNNING (``where``: a
    further filter); return them."""
    from sweeplab.tracking.store import RunLog

    left_running = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{TAG_PARENT}` = '{parent.info.run_id}' and attributes.status = 'RUNNING'{where}",
    )
    for run in left_running:
        RunLog(client, run.info.run_id).end("KILLED", reason)
    return left_running
