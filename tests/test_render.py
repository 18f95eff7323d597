"""Figures drawn in a forked child while the run logs its model, and what happens when that fails."""

import os
import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from sweeplab.render import rendering


def _figure(title: str, pids: Path) -> Figure:
    with pids.open("a") as handle:
        handle.write(f"{os.getpid()}\n")
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().set_title(title)
    return fig


def test_figures_are_drawn_in_a_child_and_the_folder_is_removed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    jobs = {name: (lambda name=name: _figure(name, pids)) for name in ["a", "b"]}
    with rendering(jobs) as drawing:
        folder = drawing.wait()
        assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b.png"]
        assert all(p.read_bytes().startswith(b"\x89PNG") for p in folder.iterdir())
    assert not folder.exists()
    drawn_by = set(pids.read_text().split())
    if sys.platform == "linux":
        assert drawn_by and str(os.getpid()) not in drawn_by


def test_a_failing_figure_raises_its_own_error_here(tmp_path: Path) -> None:
    def broken() -> Figure:
        raise ValueError("no data to plot")

    with rendering({"broken": broken}) as drawing, pytest.raises(ValueError, match="no data to plot"):
        drawing.wait()  # the child failed; drawing again here shows the real error
