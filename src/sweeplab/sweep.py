"""The Hydra callback that turns a multirun into one MLflow parent run with nested children.

It runs in the launching process: before any job starts it creates the store, the experiment
and the parent run once (jobs that race to migrate a fresh sqlite file or to create the
experiment lose runs), and when the sweep ends it writes the summary onto the parent.
"""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from sweeplab.job import ENV_PARENT_RUN, ENV_URI
from sweeplab.schema import SweepConfig, TrackingConfig
from sweeplab.summary import summarize
from sweeplab.tracking import TAG_FAILURE, TAG_STOPPED, Tracker

log = logging.getLogger(__name__)

TAG_SWEEP = "sweeplab.sweep"
# on a parent: a digest of the sweep command, so that re-running an interrupted sweep finds it
TAG_SWEEP_KEY = "sweeplab.sweep_key"


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
        tracking: TrackingConfig = OmegaConf.to_object(config.tracking)
        tracker = Tracker(tracking, Path(config.hydra.runtime.cwd), os.environ)
        key = sweep_key(config)
        interrupted = tracker.newest_run("KILLED", {TAG_SWEEP: "parent", TAG_SWEEP_KEY: key})
        if interrupted:  # the same sweep was interrupted: carry on under its parent
            parent_id = interrupted.info.run_id
            tracker.client.update_run(parent_id, status="RUNNING")
            if TAG_STOPPED in interrupted.data.tags:
                tracker.client.delete_tag(parent_id, TAG_STOPPED)
            log.info("resuming the interrupted sweep of parent run %s", parent_id)
        else:
            overrides = " ".join(config.hydra.overrides.task)
            parent_id = tracker.client.create_run(
                tracker.experiment_id,
                run_name=f"sweep: {overrides}" if overrides else "sweep",
                tags={TAG_SWEEP: "parent", TAG_SWEEP_KEY: key, "sweeplab.overrides": overrides},
            ).info.run_id
        # every job logs to exactly this store and nests its run under this parent
        os.environ[ENV_URI] = tracker.uri
        os.environ[ENV_PARENT_RUN] = parent_id
        log.info(
            "MLflow parent run %s in experiment %r (%s)", parent_id, tracking.experiment_name, tracker.uri
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent_id = os.environ.pop(ENV_PARENT_RUN, None)
        if parent_id is None:
            return
        tracking: TrackingConfig = OmegaConf.to_object(config.tracking)
        sweep: SweepConfig = OmegaConf.to_object(config.sweep)
        tracker = Tracker(tracking, Path(config.hydra.runtime.cwd), os.environ, parent_run_id=parent_id)
        summarize(tracker.client, parent_id, tracker.experiment_id, swept_keys(config), sweep)
        tracker.client.set_terminated(parent_id, "FINISHED")


def end_parent(tracking_uri: str, parent_run_id: str, status: str, reason: str) -> None:
    """End the parent FAILED when a job stops the sweep (``sweep.on_error=raise``), or KILLED
    when a job was interrupted: the callback's ``on_multirun_end`` does not run then."""
    client = MlflowClient(tracking_uri)
    client.set_tag(parent_run_id, TAG_FAILURE if status == "FAILED" else TAG_STOPPED, reason[:5000])
    client.set_terminated(parent_run_id, status)
