"""What a sweeplab process sets up around its heavy imports: MLflow's environment defaults, and
the garbage collector.

A command imports torch (``torch._dynamo`` with the first optimizer), MLflow and Hydra: some
hundred thousand long-lived objects, none of them garbage. At its default thresholds Python runs
full collections over that growing heap while it imports, for nothing. So a command starts with
the collector off, and ``imports_done`` freezes what was imported (``gc.freeze``: no later
collection looks at it again, forked children included) and collects as usual from then on.
"""

import gc
import os

ENV_DEFAULTS = {
    # an unreachable tracking server fails a job in seconds, not after minutes of retries
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # MLflow's records go through the app's logging (Hydra's console and job log file, levels from
    # hydra.job_logging), instead of a handler of MLflow's own that no config reaches
    "MLFLOW_CONFIGURE_LOGGING": "false",
    # one line of output per artifact download is noise in a command whose output is a table
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def apply_env_defaults() -> None:
    """Set ``ENV_DEFAULTS`` before MLflow is imported; a variable the user set wins."""
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def imports_done() -> None:
    """Freeze what is imported and turn the collector back on; a no-op where no command turned
    it off (sweeplab used as a library, tests)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
