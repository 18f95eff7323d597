"""What Hydra knows about the job being run, as a plain value the task can be given."""

import dataclasses
from pathlib import Path


@dataclasses.dataclass
class Job:
    """Launch dir, output dir, overrides and group choices of one job; tests build one by hand."""

    launch_dir: Path
    output_dir: Path
    overrides: list[str]
    choices: dict[str, str]
    name: str = "default"
