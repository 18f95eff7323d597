"""``hydra/launcher=fork``: parallel local jobs in worker processes forked from the launcher.

Hydra's joblib launcher starts fresh worker processes, each of which imports torch, MLflow,
scikit-learn and matplotlib before its first job; for sweeps of short jobs that start-up cost
eats the parallelism. This launcher imports those modules once, in the launching process, then
forks one process per job, which starts in milliseconds. Linux and other fork platforms only.
The work is in ``_fork_core``.
"""

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ForkLauncher(Launcher):
    def __init__(self, n_jobs: int = -1, preload: Sequence[str] = ()) -> None:
        self.n_jobs = n_jobs
        self.preload = list(preload)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.sweeplab_launcher import _fork_core

        return _fork_core.launch(self, job_overrides, initial_job_idx)
