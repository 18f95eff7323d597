"""A run's figures, as matplotlib ``Figure`` objects (no pyplot state, no display): training
samples, loss and accuracy curves, PCA scatters of the input and of every hidden layer, and the
confusion matrix (the set of plots of the original setup described at the top of README.md).

Plotting helpers take plain arrays so they work for any model and dataset. Figures with many
points use fixed margins: a constrained layout draws them twice, doubling the save time.
SciPy's filter and scikit-learn's PCA and metrics are imported where a figure is drawn, so a run
that draws none does not pay for them; one that does imports them in the children that draw
(``sweeplab.tracking.artifacts``). Jobs are partials of the functions here, so they can be sent there.
"""

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from sweeplab.data import Data
from sweeplab.tracking.artifacts import FileJobs
from sweeplab.tracking.representations import representations
from sweeplab.training.state import History

FigureJobs = dict[str, Callable[[], Figure]]  # picklable: module-level functions, partials


def png_files(jobs: FigureJobs) -> FileJobs:
    """``jobs`` as jobs writing ``<name>.png``, for ``sweeplab.tracking.artifacts``."""
    return {f"{name}.png": functools.partial(_save_png, make) for name, make in jobs.items()}


def _save_png(make: Callable[[], Figure], path: Path) -> None:
    make().savefig(path)


def samples(x: np.ndarray, y: np.ndarray, classes: list[str], shape: tuple[int, ...]) -> Figure:
    """Training samples in a grid, each titled with its label."""
    ncol = min(len(x), 8)
    nrow = -(-len(x) // ncol)
    fig = Figure(figsize=(1.5 * ncol, 1.7 * nrow))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, hspace=0.35, wspace=0.05)
    images = x.reshape(len(x), *shape[-2:])
    for ax, image, label in zip(
        fig.subplots(nrow, ncol, squeeze=False).flat, images, y.tolist(), strict=False
    ):
        ax.imshow(image, cmap="gray_r", interpolation="nearest", aspect="auto")
        ax.set_title(classes[label], fontsize=9)
        ax.set_axis_off()
    return fig


def _smooth(values: np.ndarray) -> np.ndarray | None:
    """Savitzky-Golay smoothing (window 21, order 3); None for curves too short for it."""
    from scipy.signal import savgol_filter

    return savgol_filter(values, 21, 3) if len(values) >= 21 else None


def curves(history: History) -> Figure:
    """Per-step train loss and accuracy, raw and smoothed, with per-epoch validation points."""
    fig = Figure(figsize=(12, 4.5))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.11, top=0.96, wspace=0.18)
    steps = np.arange(1, len(history.step_loss) + 1)
    panels = [
        ("cross-entropy loss", history.step_loss, history.val_loss),
        ("accuracy", history.step_acc, history.val_acc),
    ]
    for ax, (label, train, val) in zip(fig.subplots(1, 2), panels, strict=True):
        ax.plot(steps, train, color="tab:blue", alpha=0.25, linewidth=0.6, label="train (per step)")
        smoothed = _smooth(train)
        if smoothed is not None:
            ax.plot(steps, smoothed, color="tab:blue", linewidth=1.2, label="train (Savitzky-Golay 21/3)")
        if val:
            ax.plot(history.epoch_end_steps, val, "o-", color="tab:orange", label="validation (per epoch)")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right" if label.endswith("loss") else "lower right")
    return fig


def pca_scatter(x: np.ndarray, y: np.ndarray, classes: list[str], title: str) -> Figure:
    """2-D PCA of ``x`` coloured by class, with a legend."""
    from sklearn.decomposition import PCA

    points = PCA(n_components=2, svd_solver="randomized", random_state=0).fit_transform(x)
    fig = Figure(figsize=(7.5, 6))
    fig.subplots_adjust(left=0.1, right=0.8, bottom=0.09, top=0.93)
    ax = fig.add_subplot()
    scatter = ax.scatter(points[:, 0], points[:, 1], c=y, cmap="tab10", s=4, alpha=0.7, linewidths=0)
    handles, _ = scatter.legend_elements(num=None)  # one entry per class, even past 9
    present = np.unique(y)
    ax.legend(
        handles,
        [classes[i] for i in present],
        title="class",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        markerscale=1.5,
    )
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    return fig


def pca_jobs(model: nn.Module, x: torch.Tensor, y: np.ndarray, classes: list[str]) -> FigureJobs:
    """``pca_input`` and ``pca_<layer>`` for every hidden representation of ``model`` on ``x``.

    The representations are computed now; the returned jobs only fit PCA and draw.
    """
    what = f"{len(x)} samples"
    jobs: FigureJobs = {
        "pca_input": functools.partial(pca_scatter, x.cpu().numpy(), y, classes, f"input space ({what})")
    }
    for layer, reps in representations(model, x).items():
        title = f"after {layer} ({what})"
        jobs[f"pca_{layer}"] = functools.partial(pca_scatter, reps.numpy(), y, classes, title)
    return jobs


def confusion_matrix(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], split: str = "test"
) -> Figure:
    """Confusion matrix of one split, with counts.

    Counted by scikit-learn but drawn here: ``ConfusionMatrixDisplay`` imports pyplot, which picks
    a GUI backend and holds global figure state - neither belongs in a headless training run.
    """
    from sklearn import metrics

    counts = metrics.confusion_matrix(y_true, y_pred, labels=range(len(classes)))
    fig = Figure(figsize=(7, 6.5))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.1, top=0.94)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    threshold = (counts.max() + counts.min()) / 2  # dark cells get white text
    for (row, col), count in np.ndenumerate(counts):
        color = "white" if count > threshold else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=color, fontsize=8)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"{split} confusion matrix")
    return fig


# figures drawn from the data and the seed alone: runs on the same data with the same seed
# (members of one stack) share them
MODEL_FREE = ("samples", "pca_input")


def run_jobs(
    model: nn.Module,
    data: Data,
    history: History,
    test_predictions: torch.Tensor,
    pca_samples: int,
    seed: int,
) -> FigureJobs:
    """A training run's figures: samples, curves, PCA of the input and each hidden layer, and the
    confusion matrix, as jobs over arrays copied off the device now."""
    rng = torch.Generator().manual_seed(seed)
    n, device = len(data.train), data.train.x.device
    shown = torch.randperm(n, generator=rng)[:16].to(device)
    sample_x, sample_y = data.train.x[shown].cpu().numpy(), data.train.y[shown].cpu().numpy()
    picked = torch.randperm(n, generator=rng)[: pca_samples or n].to(device)
    labels = data.train.y[picked].cpu().numpy()
    y_true, y_pred = data.test.y.cpu().numpy(), test_predictions.cpu().numpy()
    return {
        "samples": functools.partial(samples, sample_x, sample_y, data.classes, data.sample_shape),
        "curves": functools.partial(curves, history),
        **pca_jobs(model, data.train.x[picked], labels, data.classes),
        "confusion_matrix": functools.partial(confusion_matrix, y_true, y_pred, data.classes),
    }
