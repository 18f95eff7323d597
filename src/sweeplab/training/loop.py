"""The training loop: device-resident batches, metrics accumulated on the device.

Nothing here knows about MLflow: metrics leave through the ``log_rows`` callback, once per epoch, as
rows of ``(step, {name: value})``.
"""

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sweeplab.config.schema import TrainerConfig
from sweeplab.data import Data, Split
from sweeplab.training.interrupt import SignalGuard
from sweeplab.training.state import History, MetricRows, Progress, TrainingState
from sweeplab.training.steps import make_steps

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite; going on would only burn time."""


@dataclasses.dataclass
class Evaluation:
    loss: float
    acc: float
    predictions: torch.Tensor


def steps_per_epoch(n_samples: int, cfg: TrainerConfig) -> int:
    steps = n_samples // cfg.batch_size if cfg.drop_last else math.ceil(n_samples / cfg.batch_size)
    if steps == 0:
        raise ValueError(
            f"trainer.batch_size={cfg.batch_size} with drop_last leaves no batch of {n_samples} samples"
        )
    return steps


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int) -> Evaluation:
    """Summed cross-entropy and accuracy over every sample of ``split`` (no batch dropped)."""
    model.eval()
    loss = torch.zeros((), device=split.x.device)
    predictions = []
    for start in range(0, len(split), batch_size):
        logits = model(split.x[start : start + batch_size])
        loss += F.cross_entropy(logits, split.y[start : start + batch_size], reduction="sum")
        predictions.append(logits.argmax(1))
    pred = torch.cat(predictions)
    acc = (pred == split.y).float().mean()
    return Evaluation(loss.item() / len(split), acc.item(), pred)


def fit(
    state: TrainingState,
    data: Data,
    cfg: TrainerConfig,
    log_rows: Callable[[MetricRows], None],
    stop: SignalGuard,
) -> History:
    """Train from ``state.progress`` to ``cfg.epochs`` epochs; log step and epoch metrics through
    ``log_rows`` once per epoch, after ``state`` has been brought to the epoch's end. Each step
    is eager or a CUDA graph's replay, as ``cfg.cuda_graph`` says (``sweeplab.training.steps``).

    Between steps ``stop.raise_if_requested()`` ends training with ``state`` current. A
    progress bar is drawn only on a terminal; every epoch also ends with one log line.
    """
    model, scheduler, progress = state.model, state.scheduler, state.progress
    train = data.train
    step_loss, step_acc = progress.step_loss, progress.step_acc
    train_steps = make_steps(
        cfg.cuda_graph, model, state.optimizer, scheduler, train, cfg.batch_size, step_loss, step_acc
    )
    n = len(train)
    per_epoch = steps_per_epoch(n, cfg)
    device = train.x.device
    weights = step_weights(n, cfg)
    window = cfg.log_every_n_steps
    step = progress.step
    bar = tqdm(total=len(step_loss), initial=step, unit="step", disable=not sys.stderr.isatty(), leave=False)
    with bar, logging_redirect_tqdm():
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            started = time.perf_counter()
            model.train()
            if progress.order is None:
                progress.order = torch.randperm(n, generator=state.generator).to(device)
            lrs = progress.lrs
            first = step - (epoch - 1) * per_epoch  # > 0 when resuming part-way through an epoch
            train_steps.begin(progress.order, first, step)
            for i in range(first, per_epoch):
                train_steps(i, step)  # its loss and accuracy into step_loss[step], step_acc[step]
                step += 1
                if step % window == 0:
                    lrs[step] = float(scheduler.get_last_lr()[0])
                    if not torch.isfinite(step_loss[step - 1]):  # one sync per window: stop early
                        raise DivergedError(
                            f"train/loss became non-finite at step {step} (epoch {epoch}): lower optimizer.lr"
                        )
                scheduler.step()
                progress.step = step
                bar.update()
                stop.raise_if_requested()
            if device.type == "cuda":  # the epoch's time is the device's work, not its queueing
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - started
            rows, epoch_metrics = close_epoch(
                model, progress, data, cfg, epoch, weights, train_seconds, first
            )
            epoch_metrics["time/epoch_s"] = time.perf_counter() - started
            log_rows([*rows, (step, epoch_metrics)])
            summary = " | ".join(f"{k} {v:.4g}" for k, v in epoch_metrics.items())
            log.info("epoch %d/%d | %s", epoch, cfg.epochs, summary)
    return final_history(progress)


def step_weights(n_samples: int, cfg: TrainerConfig) -> torch.Tensor:
    """Per-step weights that turn batch means into exact epoch means when the last batch is
    smaller."""
    per_epoch = steps_per_epoch(n_samples, cfg)
    weights = torch.full((per_epoch,), float(cfg.batch_size))
    if not cfg.drop_last:
        weights[-1] = n_samples - cfg.batch_size * (per_epoch - 1)
    return weights


def close_epoch(
    model: nn.Module,
    progress: Progress,
    data: Data,
    cfg: TrainerConfig,
    epoch: int,
    weights: torch.Tensor,
    train_seconds: float,
    first: int = 0,
) -> tuple[MetricRows, dict[str, float]]:
    """Bring ``progress`` to the end of ``epoch`` (at ``progress.step``): the windowed per-step
    rows and the epoch's metrics, validation by ``model`` included. ``first``: the step of the
    epoch training resumed at. Raises ``DivergedError`` if a step's loss was not finite."""
    step, window, history = progress.step, cfg.log_every_n_steps, progress.history
    losses, accs = progress.step_loss[:step].cpu(), progress.step_acc[:step].cpu()  # the epoch's one sync
    epoch_losses, epoch_accs = losses[-len(weights) :], accs[-len(weights) :]
    if not torch.isfinite(epoch_losses).all():
        raise DivergedError(f"train/loss became non-finite in epoch {epoch}: lower optimizer.lr")
    history.train_seconds += train_seconds
    rows: MetricRows = [
        (
            s,
            {
                "train/loss": float(losses[s - window : s].mean()),
                "train/acc": float(accs[s - window : s].mean()),
                "train/lr": lr,
            },
        )
        for s, lr in progress.lrs.items()
    ]
    metrics = {
        "train/epoch_loss": float((epoch_losses * weights).sum() / weights.sum()),
        "train/epoch_acc": float((epoch_accs * weights).sum() / weights.sum()),
        "throughput/samples_per_s": len(data.train) * (len(weights) - first) / len(weights) / train_seconds,
    }
    if len(data.val):
        val = evaluate(model, data.val, cfg.eval_batch_size)
        history.val_loss.append(val.loss)
        history.val_acc.append(val.acc)
        metrics |= {"val/loss": val.loss, "val/acc": val.acc}
    history.epoch_end_steps.append(step)
    progress.epoch, progress.order, progress.lrs = epoch, None, {}
    return rows, metrics


def final_history(progress: Progress) -> History:
    """The run's history with its per-step curves, for figures and summaries."""
    history = progress.history
    history.step_loss, history.step_acc = progress.step_loss.cpu().numpy(), progress.step_acc.cpu().numpy()
    return history
