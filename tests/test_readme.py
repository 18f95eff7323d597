"""Every ``sweeplab`` command the README shows works as written, so the README cannot drift.

A single run is run for real, on ``digits`` for one epoch; a sweep is composed (``--cfg job``,
its first value of each swept key); ``sweeplab-runs`` and ``sweeplab-eval`` run against the
store those runs made, ``<run id>`` and ``<path>`` filled in with a real run's. Commands that
need a GPU or a cluster are left out.
"""

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import mlflow

from conftest import REPO, run_cli, start_cli

BIN = Path(sys.executable).parent
NEEDS_MORE_THAN_THIS_MACHINE = re.compile(r"device=cuda|hydra/launcher=(slurm|ray)|MLFLOW_TRACKING_URI")
TRAINS_BRIEFLY = ["data=digits", "trainer.epochs=1", "tracking.figures=false", "device=cpu"]


def _commands() -> list[list[str]]:
    """The README's fenced bash lines that start with a sweeplab command, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [
        shlex.split(line.replace("<run id>", "RUN_ID").replace("<path>", "CHECKPOINTS"), comments=True)
        for line in lines
        if re.match(r"sweeplab(-runs|-eval)?( |$)", line) and not NEEDS_MORE_THAN_THIS_MACHINE.search(line)
    ]


COMMANDS = _commands()
RUNS = [c for c in COMMANDS if c[0] == "sweeplab" and "-m" not in c]
SWEEPS = [c for c in COMMANDS if c[0] == "sweeplab" and "-m" in c]
READERS = [c for c in COMMANDS if c[0] != "sweeplab"]


def _briefly(args: list[str]) -> list[str]:
    """``args`` on digits for one epoch, on the CPU, without figures."""
    kept = [a for a in args if a.split("=")[0] not in {o.split("=")[0] for o in TRAINS_BRIEFLY}]
    return (
        kept
        if "--cfg" in args or "--help" in args or any(a.startswith("resume=") for a in args)
        else [*kept, *TRAINS_BRIEFLY]
    )


def _first_of_each_sweep(args: list[str]) -> list[str]:
    """A sweep's first job, to compose: ``a=1,2`` -> ``a=1``, ``glob(*)`` -> the first preset."""
    first = []
    for arg in args:
        if arg == "-m":
            continue
        key, _, value = arg.partition("=")
        if value.startswith("glob("):
            value = sorted(p.stem for p in (REPO / "conf" / key.lstrip("+")).glob("*.yaml"))[0]
        elif "," in value and not value.startswith("["):
            value = value.split(",")[0]
        first.append(f"{key}={value}" if value else arg)
    return first


def test_the_readme_shows_runs_sweeps_and_the_other_commands() -> None:
    assert len(RUNS) >= 5 and len(SWEEPS) >= 5 and len(READERS) >= 5
    assert ["sweeplab", "resume=RUN_ID"] in RUNS


def test_every_readme_command_runs_as_written(tmp_path: Path, store: str) -> None:
    for args in [a for a in RUNS if not any(x.startswith("resume=") for x in a)]:
        result = run_cli(_briefly(args[1:]), cwd=tmp_path)
        assert result.returncode == 0, (args, result.stdout[-2000:] + result.stderr[-2000:])
    for args in SWEEPS:
        result = run_cli([*_first_of_each_sweep(args[1:]), "--cfg", "job"], cwd=tmp_path)
        assert result.returncode == 0, (args, result.stdout[-2000:] + result.stderr[-2000:])
    # a run to resume: stopped by Ctrl-C after its first epoch
    stopped = ["data=digits", "trainer.epochs=200", "tracking.figures=false", "device=cpu"]
    process, _ = start_cli(stopped, tmp_path, until="epoch 1/200")
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    client = mlflow.MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert run.info.status == "KILLED"
    checkpoints = run.data.tags["sweeplab.checkpoint_dir"]
    fill = {"RUN_ID": run.info.run_id, "CHECKPOINTS": checkpoints}
    for args in [a for a in RUNS if any(x.startswith("resume=") for x in a)] + READERS:
        filled = [re.sub("RUN_ID|CHECKPOINTS", lambda m: fill[m.group()], a) for a in args]
        result = subprocess.run(
            [str(BIN / filled[0]), *filled[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (filled, result.stdout[-2000:] + result.stderr[-2000:])
