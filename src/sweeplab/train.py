"""The training loop: device-resident batches, metrics accumulated on the device.

Nothing here knows about MLflow: metrics leave through the ``log`` callback, once per epoch, as
rows of ``(step, {name: value})``.
"""

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sweeplab.data import Data, Split
from sweeplab.schema import TrainerConfig

log = logging.getLogger(__name__)

MetricRows = list[tuple[int, dict[str, float]]]


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite; going on would only burn time."""


@dataclasses.dataclass
class Evaluation:
    loss: float
    acc: float
    predictions: torch.Tensor


@dataclasses.dataclass
class History:
    """Per-step training curves and per-epoch validation points, for figures and summaries."""

    step_loss: np.ndarray
    step_acc: np.ndarray
    epoch_end_steps: list[int] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    val_acc: list[float] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0

    @property
    def best_val_acc(self) -> float | None:
        return max(self.val_acc) if self.val_acc else None


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
    model: nn.Module,
    data: Data,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    cfg: TrainerConfig,
    generator: torch.Generator,
    log_rows: Callable[[MetricRows], None],
) -> History:
    """Train for ``cfg.epochs`` epochs; log step and epoch metrics through ``log_rows``.

    A progress bar is drawn only on a terminal; every epoch also ends with one log line.
    """
    train = data.train
    n, batch = len(train), cfg.batch_size
    per_epoch = steps_per_epoch(n, cfg)
    device = train.x.device
    step_loss = torch.zeros(per_epoch * cfg.epochs, device=device)
    step_acc = torch.zeros(per_epoch * cfg.epochs, device=device)
    # per-step weights turn batch means into exact epoch means when the last batch is smaller
    weights = torch.full((per_epoch,), float(batch))
    if not cfg.drop_last:
        weights[-1] = n - batch * (per_epoch - 1)
    history = History(step_loss=np.empty(0), step_acc=np.empty(0))
    window = cfg.log_every_n_steps
    step = 0
    bar = tqdm(total=len(step_loss), unit="step", disable=not sys.stderr.isatty(), leave=False)
    with bar, logging_redirect_tqdm():
        for epoch in range(1, cfg.epochs + 1):
            started = time.perf_counter()
            model.train()
            order = torch.randperm(n, generator=generator).to(device)
            lrs: dict[int, float] = {}
            for i in range(per_epoch):
                idx = order[i * batch : (i + 1) * batch]
                x, y = train.x.index_select(0, idx), train.y.index_select(0, idx)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step_loss[step] = loss.detach()
                step_acc[step] = (logits.argmax(1) == y).float().mean()
                step += 1
                if step % window == 0:
                    lrs[step] = scheduler.get_last_lr()[0]
                    if not torch.isfinite(loss):  # one sync per window: stop a diverged run early
                        raise DivergedError(
                            f"train/loss became non-finite at step {step} (epoch {epoch}): lower optimizer.lr"
                        )
                scheduler.step()
                bar.update()
            losses, accs = step_loss[:step].cpu(), step_acc[:step].cpu()  # the epoch's one sync
            train_seconds = time.perf_counter() - started
            history.train_seconds += train_seconds
            epoch_losses, epoch_accs = losses[-per_epoch:], accs[-per_epoch:]
            if not torch.isfinite(epoch_losses).all():
                raise DivergedError(f"train/loss became non-finite in epoch {epoch}: lower optimizer.lr")
            rows: MetricRows = [
                (
                    s,
                    {
                        "train/loss": float(losses[s - window : s].mean()),
                        "train/acc": float(accs[s - window : s].mean()),
                        "train/lr": lr,
                    },
                )
                for s, lr in lrs.items()
            ]
            epoch_metrics = {
                "train/epoch_loss": float((epoch_losses * weights).sum() / weights.sum()),
                "train/epoch_acc": float((epoch_accs * weights).sum() / weights.sum()),
                "throughput/samples_per_s": n / train_seconds,
            }
            if len(data.val):
                val = evaluate(model, data.val, cfg.eval_batch_size)
                history.val_loss.append(val.loss)
                history.val_acc.append(val.acc)
                epoch_metrics |= {"val/loss": val.loss, "val/acc": val.acc}
            epoch_metrics["time/epoch_s"] = time.perf_counter() - started
            history.epoch_end_steps.append(step)
            log_rows([*rows, (step, epoch_metrics)])
            summary = " | ".join(f"{k} {v:.4g}" for k, v in epoch_metrics.items())
            log.info("epoch %d/%d | %s", epoch, cfg.epochs, summary)
    history.step_loss = step_loss.cpu().numpy()
    history.step_acc = step_acc.cpu().numpy()
    return history
