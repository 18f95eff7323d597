"""Which configs of a sweep can train as one stack, and how a batch of jobs splits into stacks.

Two configs stack when they differ only in keys that leave the program's shape alone: the seed
(initial weights, batch order, dropout masks), the optimizer's hyperparameters, the scheduler's
hyperparameters and the dropout rate. Anything else (architecture, optimizer or scheduler type,
batch size, epochs, data, device) puts them in different stacks. Keys that do not change results
(tracking, sweep, checkpoint) never split a stack: each member records by its own.
"""

import hashlib
import json
from typing import Any

from omegaconf import DictConfig

from sweeplab.tracking.tags import flatten, result_config

OPTIMIZER_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "betas", "eps")


def stackable(key: str) -> bool:
    """A dotted config key whose value may differ between members of one stack."""
    section, _, rest = key.partition(".")
    return (
        key in ("seed", "model.dropout")
        or (section == "optimizer" and rest in OPTIMIZER_KEYS)
        or (section == "scheduler" and rest not in ("", "name"))
    )


def shape(cfg: DictConfig) -> dict[str, Any]:
    """What every member of ``cfg``'s stack shares: its result config minus stackable keys."""
    return {key: value for key, value in flatten(result_config(cfg)).items() if not stackable(key)}


def shape_id(cfg: DictConfig) -> str:
    """A short name for the stack ``cfg`` belongs to, equal for configs of one shape."""
    return hashlib.sha256(json.dumps(shape(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]


def group(configs: list[DictConfig]) -> list[list[int]]:
    """Indices of ``configs`` by stack, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, cfg in enumerate(configs):
        groups.setdefault(shape_id(cfg), []).append(index)
    return list(groups.values())
