"""What Hydra knows about the job being run, as a plain value the task can be given."""

import dataclasses
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

ENV_URI = "MLFLOW_TRACKING_URI"
# The sweep callback puts the parent run's id here, and the store's URI in ENV_URI, before any
# job starts; local, joblib, submitit and Slurm jobs inherit the launching process's environment.
ENV_PARENT_RUN = "SWEEPLAB_PARENT_RUN_ID"


@dataclasses.dataclass
class Job:
    """Launch dir, output dir, overrides and group choices of one job; tests build one by hand."""

    launch_dir: Path
    output_dir: Path
    overrides: list[str]
    choices: dict[str, str]
    # set for the jobs of a multirun: failures then follow sweep.on_error
    multirun: bool = False
    parent_run_id: str | None = None


def current_job() -> Job:
    """The Hydra runtime facts a run records (launch dir, output dir, overrides, choices)."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return Job(
        launch_dir=Path(hc.runtime.cwd),
        output_dir=Path(hc.runtime.output_dir),
        overrides=list(hc.overrides.task),
        choices={k: str(v) for k, v in hc.runtime.choices.items()},
        multirun=multirun,
        parent_run_id=os.environ.get(ENV_PARENT_RUN) if multirun else None,
    )
