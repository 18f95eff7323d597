"""Checkpoints, interruption by signals, and resuming: runs and sweeps that survive a stop."""

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import run_cli, start_cli
from sweeplab.config.schema import CheckpointConfig
from sweeplab.run.checkpoint import BEST, Checkpointer, load, load_latest, write_atomic
from sweeplab.training.interrupt import Interrupted, SignalGuard

QUIET = ["tracking.figures=false", "tracking.log_model=false", "device=cpu"]
# ~1 s epochs on this data: long enough to be interrupted part-way through one
SLOW = ["data=synthetic", "data.n_samples=40000", "trainer.batch_size=16", "trainer.epochs=4", *QUIET]
# the metrics whose history must not change when a run is stopped and resumed (timings do)
COMPARED = [
    "train/loss",
    "train/acc",
    "train/lr",
    "train/epoch_loss",
    "train/epoch_acc",
    "val/loss",
    "val/acc",
]


def _runs(uri: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweeplab")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.MlflowClient(uri)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in [*COMPARED, "test/acc", "test/loss"]
    }


def test_sigint_checkpoints_kills_run_and_resume_matches_uninterrupted(tmp_path: Path, store: str) -> None:
    reference = run_cli(SLOW, cwd=tmp_path)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    (uninterrupted,) = _runs(store)

    process, _ = start_cli(SLOW, tmp_path, until="epoch 2/4")
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 130, rest
    stopped = _runs(store)[-1]
    assert stopped.info.status == "KILLED"
    tag = stopped.data.tags["sweeplab.stopped"]
    assert tag.startswith("stopped by SIGINT at epoch 3 of 4") or tag.startswith(
        "stopped by SIGINT at epoch 4"
    ), tag
    folder = Path(stopped.data.tags["sweeplab.checkpoint_dir"])
    path, state = load_latest(folder)
    assert state["run_id"] == stopped.info.run_id and state["progress"]["step"] > 2 * 1870
    assert str(path) in tag
    assert (folder / BEST).is_file()

    changed = run_cli([f"resume={stopped.info.run_id}", "optimizer.lr=0.5"], cwd=tmp_path)
    assert changed.returncode == 2
    assert "optimizer.lr" in changed.stderr + changed.stdout and "resume_force=true" in changed.stdout
    assert _runs(store)[-1].info.status == "KILLED"  # a refused resume touches nothing

    resumed = run_cli([f"resume={stopped.info.run_id}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = _runs(store)
    assert len(runs) == 2  # the same run continued, no new one
    finished = runs[-1]
    assert finished.info.run_id == stopped.info.run_id and finished.info.status == "FINISHED"
    assert "sweeplab.stopped" not in finished.data.tags
    assert finished.data.params == stopped.data.params
    # bit-identical on CPU: the same batches, dropout masks and optimizer state, step for step
    assert _history(store, finished.info.run_id) == _history(store, uninterrupted.info.run_id)


KILL_DURING_WRITE = textwrap.dedent(
    """
    import os, sys
    import sweeplab.run.checkpoint as checkpoint

    writes = []

    def publish(tmp, path):  # dies like kill -9 between the temp write and the rename
        writes.append(path)
        if path.name.startswith("epoch3"):
            os.kill(os.getpid(), 9)
        os.replace(tmp, path)

    checkpoint._publish = publish
    from sweeplab.cli.train import main

    sys.argv = ["sweeplab", *sys.argv[1:]]
    main()
    """
)

TINY = ["data=synthetic", "trainer.epochs=4", "trainer.log_every_n_steps=3", "checkpoint.keep_last=2", *QUIET]


def test_kill_during_checkpoint_write_keeps_previous_one_and_resume_works(tmp_path: Path, store: str) -> None:
    reference = run_cli(TINY, cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    (uninterrupted,) = _runs(store)

    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_WRITE, *TINY], cwd=tmp_path, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    crashed = _runs(store)[-1]
    assert crashed.info.status == "RUNNING"  # nothing could mark it; resume still may
    folder = Path(crashed.data.tags["sweeplab.checkpoint_dir"])
    assert [p.name for p in folder.glob("*.tmp")] == ["epoch3-step18.pt.tmp"]
    path, state = load_latest(folder)
    assert path.name == "epoch2-step12.pt" and state["progress"]["epoch"] == 2

    resumed = run_cli([f"resume={crashed.info.run_id}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finished = _runs(store)[-1]
    assert finished.info.run_id == crashed.info.run_id and finished.info.status == "FINISHED"
    assert _history(store, finished.info.run_id) == _history(store, uninterrupted.info.run_id)
    assert not list(folder.glob("*.tmp"))  # the next save cleans up what the killed one left
    assert sorted(p.name for p in folder.glob("epoch*")) == ["epoch3-step18.pt", "epoch4-step24.pt"]


def test_resume_by_checkpoint_path_and_refusals(tmp_path: Path, store: str) -> None:
    done = run_cli(TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (finished,) = _runs(store)
    folder = Path(finished.data.tags["sweeplab.checkpoint_dir"])

    again = run_cli([f"resume={finished.info.run_id}"], cwd=tmp_path)
    assert again.returncode == 2 and "already FINISHED" in again.stdout

    by_path = run_cli([f"resume={folder / 'epoch4-step24.pt'}"], cwd=tmp_path)
    assert by_path.returncode == 2 and "already FINISHED" in by_path.stdout

    unknown = run_cli(["resume=0123456789abcdef"], cwd=tmp_path)
    assert unknown.returncode == 2
    assert "resume=0123456789abcdef: no such MLflow run" in unknown.stdout

    (folder / "garbage.pt").write_bytes(b"not a checkpoint")
    whole = (folder / "epoch4-step24.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    for name in ["garbage.pt", "truncated.pt"]:
        damaged = run_cli([f"resume={folder / name}"], cwd=tmp_path)
        assert damaged.returncode == 2 and f"{name} is not a readable sweeplab checkpoint" in damaged.stdout
        assert "Traceback" not in damaged.stdout + damaged.stderr and damaged.stdout.count("\n") == 1
    assert len(_runs(store)) == 1


def test_interrupted_sweep_resumes_its_job_and_parent(tmp_path: Path, store: str) -> None:
    sweep = [
        "-m",
        "optimizer.lr=0.1,0.05,0.02,0.01",
        "data=synthetic",
        "data.n_samples=40000",
        "trainer.batch_size=16",
        "trainer.epochs=2",
        *QUIET,
    ]
    process, _ = start_cli(sweep, tmp_path, until="#2 : ")
    for line in process.stdout:  # job 3 has started training: stop it in its second epoch
        if "epoch 1/2" in line:
            break
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 143, rest

    client = mlflow.MlflowClient(store)
    (parent,) = [r for r in _runs(store) if r.data.tags.get("sweeplab.sweep") == "parent"]
    assert parent.info.status == "KILLED"
    children = [r for r in _runs(store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED", "KILLED"]
    killed_id = children[2].info.run_id

    rerun = run_cli(sweep, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count("already FINISHED with this config") == 2
    assert f"resuming run {killed_id}" in rerun.stdout
    parents = [r for r in _runs(store) if r.data.tags.get("sweeplab.sweep") == "parent"]
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # the same parent, carried on
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    children = [r for r in _runs(store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert killed_id in {c.info.run_id for c in children}
    assert parent.data.metrics["sweep/children"] == 4 and parent.data.metrics["sweep/finished"] == 4


def test_ctrl_c_on_a_fork_sweep_stops_running_jobs_cleanly_and_starts_no_more(
    tmp_path: Path, store: str
) -> None:
    sweep = [
        "-m",
        "hydra/launcher=fork",
        "hydra.launcher.n_jobs=2",
        "optimizer.lr=0.1,0.05,0.02,0.01",
        "data=synthetic",
        "data.n_samples=40000",
        "trainer.batch_size=16",
        "trainer.epochs=2",
        *QUIET,
    ]
    # its own session, so that the Ctrl-C can go to the whole process group as a terminal's does
    process, _ = start_cli(sweep, tmp_path, until="epoch 1/2", start_new_session=True)
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    assert process.returncode != 0, rest
    (parent,) = [r for r in _runs(store) if r.data.tags.get("sweeplab.sweep") == "parent"]
    assert parent.info.status == "KILLED"
    children = [r for r in _runs(store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2  # the two running jobs; the other two never started
    killed = {c.info.run_id for c in children if c.info.status == "KILLED"}
    assert killed and {c.info.status for c in children} <= {"KILLED", "FINISHED"}
    assert all("sweeplab.stopped" in c.data.tags for c in children if c.info.run_id in killed)

    rerun = run_cli(sweep, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count("resuming run") == len(killed)
    children = [r for r in _runs(store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert killed <= {c.info.run_id for c in children}
    assert mlflow.MlflowClient(store).get_run(parent.info.run_id).info.status == "FINISHED"


def test_a_fork_sweep_survives_a_killed_worker_and_a_rerun_resumes_its_job(
    tmp_path: Path, store: str
) -> None:
    """kill -9 of one job's process (what the OOM killer does): the job's run ends KILLED, the
    other jobs run, the parent ends KILLED with the counts, and a re-run resumes that job."""
    sweep = ["-m", "hydra/launcher=fork", "hydra.launcher.n_jobs=1", "seed=0,1,2", *SLOW]
    process, seen = start_cli(sweep, tmp_path, until="epoch 1/4")
    os.kill(int(re.search(r"#0 started in process (\d+)", seen).group(1)), signal.SIGKILL)
    rest, _ = process.communicate(timeout=300)
    assert process.returncode == 0, seen + rest
    assert re.search(r"job #0 \(seed=0 .*\) stopped: its process died \(SIGKILL\)", rest)
    assert "Traceback" not in rest
    (parent,) = [r for r in _runs(store) if r.data.tags.get("sweeplab.sweep") == "parent"]
    children = {r.data.params["seed"]: r for r in _runs(store) if "sweeplab.sweep" not in r.data.tags}
    assert {seed: c.info.status for seed, c in children.items()} == {
        "0": "KILLED",
        "1": "FINISHED",
        "2": "FINISHED",
    }
    assert "its process died (SIGKILL)" in children["0"].data.tags["sweeplab.stopped"]
    assert parent.info.status == "KILLED" and parent.data.metrics["sweep/killed"] == 1
    assert parent.data.metrics["sweep/finished"] == 2

    rerun = run_cli(sweep, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert (
        rerun.stdout.count("skipped: run") == 2
        and f"resuming run {children['0'].info.run_id}" in rerun.stdout
    )
    client = mlflow.MlflowClient(store)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert client.get_run(children["0"].info.run_id).info.status == "FINISHED"


def test_a_joblib_sweep_whose_worker_is_killed_leaves_nothing_running_and_resumes(
    tmp_path: Path, store: str
) -> None:
    """joblib gives up on the whole batch when a worker dies: the launching process still ends
    the parent and the jobs left running KILLED, and the same command resumes the sweep."""
    sweep = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1,2", *SLOW]
    process, seen = start_cli(sweep, tmp_path, until="epoch 1/4")
    workers = subprocess.run(
        ["pgrep", "-P", str(process.pid), "-f", "LokyProcess"], capture_output=True, text=True
    ).stdout.split()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    rest, _ = process.communicate(timeout=300)
    assert process.returncode == 1 and "SIGKILL" in rest, seen + rest
    assert re.search(r"sweep KILLED: .* ended KILLED \(seed=\d", rest)
    runs = _runs(store)
    assert "RUNNING" not in {r.info.status for r in runs}
    (parent,) = [r for r in runs if r.data.tags.get("sweeplab.sweep") == "parent"]
    killed = [r.info.run_id for r in runs if r.info.status == "KILLED" and r is not parent]
    assert parent.info.status == "KILLED" and killed

    rerun = run_cli(sweep, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming run" in rerun.stdout
    client = mlflow.MlflowClient(store)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    children = [r for r in _runs(store) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.params["seed"] for c in children if c.info.status == "FINISHED") == ["0", "1", "2"]


def test_checkpointer_keeps_newest_and_best_and_writes_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper = Checkpointer(tmp_path, CheckpointConfig(every_n_epochs=2, keep_last=2, save_best=True))

    def state(epoch: int) -> dict:
        return {"format": 1, "epoch": epoch, "weights": torch.full((3,), float(epoch))}

    for epoch, improved in [(1, True), (2, False), (3, False), (4, True), (5, False), (6, False)]:
        keeper.epoch_end(lambda e=epoch: state(e), epoch, 10 * epoch, improved)
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST, "epoch4-step40.pt", "epoch6-step60.pt"]
    assert load(tmp_path / BEST)["epoch"] == 4

    def die(tmp: Path, path: Path) -> None:
        raise KeyboardInterrupt  # stopped between the temp write and the rename

    monkeypatch.setattr("sweeplab.run.checkpoint._publish", die)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(state(7), tmp_path / "epoch6-step60.pt")
    assert load(tmp_path / "epoch6-step60.pt")["epoch"] == 6


def test_first_signal_waits_for_the_step_the_second_stops_at_once() -> None:
    guard = SignalGuard()
    with guard.installed(), pytest.raises(Interrupted) as stopped:
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.requested  # handled, but training goes on to the step's end
            os.kill(os.getpid(), signal.SIGTERM)
    assert not stopped.value.clean and stopped.value.exit_code == 143

    guard = SignalGuard()
    with guard.installed(), pytest.raises(Interrupted) as stopped:
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            guard.raise_if_requested()
    assert stopped.value.clean and stopped.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_forced_resume_continues_with_the_new_values(tmp_path: Path, store: str) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_WRITE, *TINY], cwd=tmp_path, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    (crashed,) = _runs(store)

    reshaped = run_cli(
        [f"resume={crashed.info.run_id}", "model.hidden_dims=[8]", "resume_force=true"], tmp_path
    )
    assert reshaped.returncode == 2 and "does not fit the model now configured" in reshaped.stdout

    forced = run_cli([f"resume={crashed.info.run_id}", "optimizer.lr=0.5", "resume_force=true"], tmp_path)
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    (finished,) = _runs(store)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["sweeplab.resume_changed"] == "optimizer.lr: 0.01 -> 0.5"
    assert finished.data.params["optimizer.lr"] == "0.01"  # params record how the run started
    lrs = _history(store, finished.info.run_id)["train/lr"]
    assert lrs == [(3, 0.01), (6, 0.01), (9, 0.01), (12, 0.01), (15, 0.5), (18, 0.5), (21, 0.5), (24, 0.5)]


def test_resume_refuses_changed_data_files(tmp_path: Path, store: str, tiny_mnist: Path) -> None:
    args = ["data=mnist", f"data.root={tiny_mnist}", "data.val_size=20", "trainer.epochs=4", *QUIET]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_WRITE, *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    (crashed,) = _runs(store)
    images = tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    changed = bytearray(images.read_bytes())
    changed[-1] ^= 0xFF  # one pixel of the last training image
    images.write_bytes(bytes(changed))

    refused = run_cli([f"resume={crashed.info.run_id}"], tmp_path)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "the data read now (data=mnist, MD5" in refused.stdout and "check data.root" in refused.stdout
    forced = run_cli([f"resume={crashed.info.run_id}", "resume_force=true"], tmp_path)
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    assert _runs(store)[0].info.status == "FINISHED"
