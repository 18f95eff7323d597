"""Environment defaults the command-line apps set before MLflow is imported.

Users who want otherwise set these variables themselves.
"""

import os

DEFAULTS = {
    # an unreachable tracking server fails a job in seconds, not after minutes of retries
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # MLflow's records go through the app's logging (Hydra's console and job log file, levels from
    # hydra.job_logging), instead of a handler of MLflow's own that no config reaches
    "MLFLOW_CONFIGURE_LOGGING": "false",
    # one line of output per artifact download is noise in a command whose output is a table
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def apply_defaults() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
