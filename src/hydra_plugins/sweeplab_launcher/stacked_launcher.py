"""``hydra/launcher=stacked``: the jobs of a sweep batch that differ only in stackable keys
train together as one program (``sweeplab.stacking.task``), each still an ordinary job and run.

Every job is set up by Hydra's own ``run_job`` (its output folder, ``.hydra/`` and callbacks),
with a task that only captures the composed config; the batch is then split into stacks
(``sweeplab.stacking.grouping``), which train one after another in this process. A stack of one trains
as a plain job. Log lines of the training go to the console and to ``<sweep dir>/stacked.log``.
"""

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)


class StackedLauncher(Launcher):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self._composed = _KeepCompositions(hydra_context.config_loader)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sweeplab.config.errors import ConfigError
        from sweeplab.stacking.grouping import group, shape_id
        from sweeplab.stacking.task import run_stack
        from sweeplab.training.interrupt import Interrupted, SignalGuard
        from sweeplab.training.loop import DivergedError

        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = [self._prepare(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        self._log_to(sweep_dir)
        stacks = group([ret.return_value[0] for ret in jobs])
        log.info("Launching %d jobs as %d stack(s):", len(jobs), len(stacks))
        for members in stacks:
            log.info("\tstack %s, %d member(s):", shape_id(jobs[members[0]].return_value[0]), len(members))
            for i in members:
                log.info("\t\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(jobs[i].overrides)))
        with SignalGuard().installed() as guard:
            for members in stacks:
                prepared = [jobs[i].return_value for i in members]
                try:
                    objectives = run_stack(prepared, shape_id(prepared[0][0]), guard)
                except Interrupted as stop:  # every member checkpointed and ended KILLED
                    log.error("%s", stop)
                    raise SystemExit(stop.exit_code) from None
                except (ConfigError, DivergedError) as exc:  # sweep.on_error=raise: the parent FAILED
                    log.error("%s", exc)
                    raise SystemExit(2 if isinstance(exc, ConfigError) else 1) from None
                for i, objective in zip(members, objectives, strict=True):
                    jobs[i].return_value = objective
        return jobs

    def _prepare(self, idx: int, overrides: list[str]) -> JobReturn:
        """Hydra's job set-up for one member: its output folder, ``.hydra/``, its callbacks."""
        from sweeplab.config.job import current_job

        assert self.config is not None and self.hydra_context is not None
        sweep_config = self._composed.take(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)
        return run_job(
            hydra_context=self.hydra_context,
            task_function=lambda cfg: (cfg, current_job()),
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
            configure_logging=False,
        )

    def _log_to(self, folder: Path) -> None:
        """The job logging of the sweep's config, its file in the sweep folder."""
        assert self.config is not None
        config = copy.deepcopy(self.config)
        with read_write(config.hydra.runtime), open_dict(config.hydra):
            config.hydra.runtime.output_dir = os.path.abspath(folder)
            config.hydra.job.name = "stacked"
        configure_log(config.hydra.job_logging, config.hydra.verbose)


class _KeepCompositions:
    """Hydra's sweepers compose every job of a batch to validate it right before launching it
    (``Sweeper.validate_batch_is_legal``); a stack's jobs are set up in this process, so each of
    those compositions is kept for the launcher instead of composing the job a second time
    (a fraction of a second a job). Each one is handed out once, and only for a job's exact overrides."""

    def __init__(self, loader: Any) -> None:
        self._compose = loader.load_sweep_config
        self._kept: dict[tuple[str, ...], DictConfig] = {}
        loader.load_sweep_config = self._keep

    def _keep(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        composed = self._compose(master_config, sweep_overrides)
        self._kept[tuple(sweep_overrides)] = composed  # the sweeper only checks that it composes
        return composed

    def take(self, master_config: DictConfig, overrides: list[str]) -> DictConfig:
        kept = self._kept.pop(tuple(overrides), None)
        return kept if kept is not None else self._compose(master_config, overrides)
