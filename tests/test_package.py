"""sweeplab installed from a wheel, as ``pip install <checkout>`` does, used outside the checkout."""

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import mlflow

from conftest import REPO

SHIPPED = ["pyproject.toml", "README.md", "src", "conf"]


def _wheel(tmp_path: Path) -> Path:
    """Build from a copy of the project's files, so the build leaves nothing in the checkout."""
    project = tmp_path / "project"
    project.mkdir()
    for name in SHIPPED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(
                source, project / name, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
            )
        else:
            shutil.copy(source, project / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            dist,
            project,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("sweeplab-*.whl")
    return wheel


def _venv_with(wheel: Path, root: Path) -> Path:
    """A fresh venv holding the wheel; its dependencies are this environment's, seen through a
    .pth path line (which, unlike a site dir, does not load this environment's editable sweeplab)."""
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
    )
    return root / "bin"


def test_wheel_installs_and_runs_from_an_empty_directory(tmp_path: Path) -> None:
    bin_dir = _venv_with(_wheel(tmp_path), tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(bin_dir / args[0]), *args[1:]],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    where = run(
        "python",
        "-c",
        "import sweeplab.conf as c, hydra_plugins.sweeplab_launcher as p; print(c.__file__, p.__file__)",
    )
    assert all(Path(path).is_relative_to(tmp_path / "venv") for path in where.stdout.split())

    run("sweeplab", "-m", "model=logreg,mlp", "data=digits", "trainer.epochs=1", "tracking.figures=false")
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweeplab").experiment_id])
    children = {r.data.params["choice.model"]: r for r in runs if "choice.model" in r.data.params}
    assert set(children) == {"logreg", "mlp"} and {r.info.status for r in runs} == {"FINISHED"}

    listed = run("sweeplab-runs", "ls", "model=mlp")
    assert (
        children["mlp"].info.run_id in listed.stdout and children["logreg"].info.run_id not in listed.stdout
    )

    evaluated = run("sweeplab-eval", f"run_id={children['mlp'].info.run_id}", "figures=false")
    assert f"test/acc  {children['mlp'].data.metrics['test/acc']:.4f}" in evaluated.stdout
