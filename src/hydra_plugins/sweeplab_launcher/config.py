"""The settings of sweeplab's launchers, stored in Hydra's ConfigStore as ``hydra/launcher=fork``
and ``hydra/launcher=stacked``."""

import dataclasses

from hydra.core.config_store import ConfigStore


@dataclasses.dataclass
class ForkLauncherConf:
    _target_: str = "hydra_plugins.sweeplab_launcher.fork_launcher.ForkLauncher"
    # parallel workers; -1 = one per CPU core
    n_jobs: int = -1
    # imported before forking, so that no worker imports them again (torch._dynamo: the first
    # torch.optim object of a process imports it)
    preload: list[str] = dataclasses.field(
        default_factory=lambda: ["sweeplab.run.task", "torch._dynamo", "sklearn.datasets"]
    )


@dataclasses.dataclass
class StackedLauncherConf:
    _target_: str = "hydra_plugins.sweeplab_launcher.stacked_launcher.StackedLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="fork", node=ForkLauncherConf, provider="sweeplab")
ConfigStore.instance().store(
    group="hydra/launcher", name="stacked", node=StackedLauncherConf, provider="sweeplab"
)
