"""One MLflow parent run per multirun: the Hydra callback that opens it and writes its summary.

The callback runs in the launching process: before any job starts it creates the store, the
experiment and the parent run once (jobs that race to migrate a fresh sqlite file or to create
the experiment lose runs), and when the sweep ends it writes the summary onto the parent. Each
job, wherever it runs, asks ``sweeplab.run.resume.previous_run`` whether its config already
FINISHED (reuse it) or was interrupted (resume it); ``sweeplab.sweep.jobs`` applies
``sweep.on_error`` to its failures.
"""

import atexit
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sweeplab.config.job import ENV_PARENT_RUN, ENV_URI
from sweeplab.config.schema import SweepConfig, TrackingConfig
from sweeplab.run.process import imports_done
from sweeplab.sweep.jobs import kill_running_children
from sweeplab.tracking.tags import TAG_OVERRIDES, TAG_SWEEP, TAG_SWEEP_KEY, TAG_SWEEP_OVERRIDES

# Hydra instantiates the callback for every run, multirun or not: MLflow, pandas and matplotlib
# are imported where a sweep needs them, so that a single run's config error returns at once.

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
        from sweeplab.tracking.store import Tracker

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
        from sweeplab.sweep.summary import summarize, unfinished_killed
        from sweeplab.tracking.store import RunLog, Tracker

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
            tracker.ui_link(parent_id),
        )


def _end_abandoned_sweep(parent_id: str) -> None:
    """At exit of the launching process: a sweep that never reached ``on_multirun_end`` (a
    launcher that raised, e.g. joblib when a worker process was killed) leaves no run RUNNING.
    Its parent and the children it left running end KILLED, so the same command resumes them."""
    if os.environ.get(ENV_PARENT_RUN) != parent_id:  # on_multirun_end ran
        return
    from mlflow import MlflowClient

    from sweeplab.tracking.store import RunLog

    client = MlflowClient(os.environ[ENV_URI])
    parent = client.get_run(parent_id)
    if parent.info.status != "RUNNING":  # a job already ended it (sweep.on_error=raise, Ctrl-C)
        return
    reason = "the sweep stopped before this job ended: re-run the same command to resume it"
    left_running = kill_running_children(client, parent, reason)
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
