"""Artifact files written by children forked before they are needed, and what happens when that
fails."""

import functools
import os
import sys
import time
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from sweeplab.tracking import artifacts
from sweeplab.tracking.artifacts import writing
from sweeplab.tracking.figures import png_files

LINUX = sys.platform == "linux"


def _figure(title: str, pids: Path) -> Figure:
    with pids.open("a") as handle:
        handle.write(f"{os.getpid()}\n")
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().set_title(title)
    return fig


def _broken() -> Figure:
    raise ValueError("no data to plot")


def test_figures_are_drawn_by_a_preforked_child_and_its_helper_and_the_folder_is_removed(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    artifacts.prefork(figures=True, models=False)  # as a run does: the child imports while it trains
    jobs = {name: functools.partial(_figure, name, pids) for name in ["a", "b", "c"]}
    with writing(png_files(jobs), processes=2) as written:
        folder = written.wait()
        assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.png", "c.png"]
        assert all(p.read_bytes().startswith(b"\x89PNG") for p in folder.iterdir())
    assert not folder.exists()
    drawn_by = {int(pid) for pid in pids.read_text().split()}
    if LINUX:
        assert len(drawn_by) == 2 and os.getpid() not in drawn_by  # two shared the jobs, none here


def test_a_failing_figure_raises_its_own_error_here() -> None:
    with (
        writing(png_files({"broken": _broken})) as written,
        pytest.raises(ValueError, match="no data to plot"),
    ):
        written.wait()  # the child failed; drawing again here shows the real error


def test_a_job_that_cannot_be_sent_is_drawn_here(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pids = tmp_path / "pids"
    with writing(png_files({"local": lambda: _figure("local", pids)})) as written:
        assert (written.wait() / "local.png").is_file()
    assert pids.read_text().split() == [str(os.getpid())]
    if LINUX:
        assert len([r for r in caplog.records if "writing them here" in r.message]) == 1


def _folder_failing_in_a_child(parent: int, path: Path) -> None:
    path.mkdir()  # fails if a half-written one were left behind
    (path / "part").write_text("here" if os.getpid() == parent else "child")
    if os.getpid() != parent:
        raise OSError("No space left on device")


@pytest.mark.skipif(not LINUX, reason="children are forked on Linux only")
def test_what_a_failed_child_left_half_written_is_written_again_here(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with writing({"model": functools.partial(_folder_failing_in_a_child, os.getpid())}) as written:
        assert (written.wait() / "model" / "part").read_text() == "here"
    assert len([r for r in caplog.records if "writing the rest here" in r.message]) == 1


def _write_now(path: Path) -> None:
    path.write_text("early")


def _write_after(marker: Path, path: Path) -> None:
    deadline = time.monotonic() + 60
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{marker} never appeared")
        time.sleep(0.01)
    path.write_text("late")


@pytest.mark.skipif(not LINUX, reason="children are forked on Linux only")
def test_each_file_is_ready_as_soon_as_it_is_written(tmp_path: Path) -> None:
    """A stack logs a member's files while the next member's are still being written."""
    marker = tmp_path / "go"
    jobs = {"early": _write_now, "late": functools.partial(_write_after, marker)}
    with writing(jobs) as written:
        folder = written.ready(["early"])
        assert (folder / "early").read_text() == "early" and not (folder / "late").exists()
        marker.touch()  # only now can the child write the other file
        assert (written.wait() / "late").read_text() == "late"


@pytest.mark.skipif(not LINUX, reason="children are forked on Linux only")
def test_an_idle_child_ends_with_its_pipe() -> None:
    """A run that ends before its figures (a diverged one) leaves no child behind."""
    artifacts.prefork(figures=True, models=True)
    child = artifacts._ready.process
    artifacts._release()
    child.join(timeout=30)
    assert child.exitcode == 0
