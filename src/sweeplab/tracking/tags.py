"""The vocabulary of a run's MLflow record: tag names, params, and what makes two runs equal.

Every ``sweeplab.*`` tag is named here and nowhere else, and so is the list of config keys that
change where or how a run is logged but not what it computes. Hydra's run names leave the same
keys out (``hydra.job.config.override_dirname.exclude_keys`` in ``conf/config.yaml``); a test
keeps that list equal to ``not_result_keys``.
"""

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from sweeplab.config.job import Job
from sweeplab.config.schema import Config

# every run
TAG_OVERRIDES = "sweeplab.overrides"
TAG_HASH = "sweeplab.config_hash"
TAG_FAILURE = "sweeplab.failure"
TAG_CHECKPOINTS = "sweeplab.checkpoint_dir"  # where the run keeps its checkpoints (absolute)
TAG_STOPPED = "sweeplab.stopped"  # why and where an interrupted run stopped
TAG_RESUMED = "sweeplab.resumed_from"  # the checkpoint a resumed run last continued from
TAG_RESUME_CHANGED = "sweeplab.resume_changed"  # what resume_force=true let change
# provenance
TAG_GIT_DIRTY = "sweeplab.git_dirty"
TAG_VERSION = "sweeplab.version"
TAG_PYTHON = "sweeplab.python"
TAG_TORCH = "sweeplab.torch"
TAG_MLFLOW = "sweeplab.mlflow"
TAG_DEVICE = "sweeplab.device"
# sweeps: the parent run, and what it learnt from its children
TAG_SWEEP = "sweeplab.sweep"  # "parent" on a sweep's parent run
TAG_SWEEP_KEY = "sweeplab.sweep_key"  # digest of the sweep command, to find it again
TAG_SWEEP_OVERRIDES = "sweeplab.sweep_overrides"  # the sweep command's overrides, as JSON
TAG_REUSED = "sweeplab.reused."  # + config hash: the FINISHED run a job reused instead of training
TAG_STACK = "sweeplab.stack"  # a stacked sweep's member: the stack it trained in
TAG_STACK_SIZE = "sweeplab.stack_size"  # how many members trained in that stack
TAG_BEST_RUN_ID = "sweeplab.best_run_id"
TAG_BEST_RUN_NAME = "sweeplab.best_run_name"
# sweeplab-eval
TAG_EVALUATED = "sweeplab.evaluated_run"
TAG_EVALUATED_FROM = "sweeplab.evaluated_from"
# MLflow's own
TAG_PARENT = "mlflow.parentRunId"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
# on the experiment: MLflow 3's UI opens it on "Model training" (runs, charts), not GenAI traces
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_EXPERIMENT = "custom_model_development"

# top-level keys that change where, whether or from where a run is logged, not what it computes
NOT_RESULTS = ("tracking", "sweep", "checkpoint", "resume", "resume_force")
# a key that may differ between a run and its resume without changing results (the data digest
# is compared instead)
NOT_COMPARED_ON_RESUME = ("data.root",)
# the overrides that ask for a resume: never part of a run's own overrides
RESUME_KEYS = ("resume", "resume_force")


def not_result_keys() -> list[str]:
    """Every dotted key under ``NOT_RESULTS``, from the config schema."""
    keys: list[str] = []
    for field in dataclasses.fields(Config):
        if field.name not in NOT_RESULTS:
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys += [f"{field.name}.{sub.name}" for sub in dataclasses.fields(default)]
        else:
            keys.append(field.name)
    return keys


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested dicts (``optimizer.lr``); lists stay whole (``model.hidden_dims``)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def result_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus ``NOT_RESULTS``: what two runs must share to compute the same."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return {key: value for key, value in container.items() if key not in NOT_RESULTS}


def config_hash(cfg: DictConfig) -> str:
    """A digest of ``result_config``: equal for runs that compute the same thing."""
    return hashlib.sha256(json.dumps(result_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def run_params(cfg: DictConfig, job: Job) -> dict[str, Any]:
    """Every resolved config value by dotted key, plus the chosen option of every group."""
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    groups = {
        f"choice.{group}": option for group, option in job.choices.items() if not group.startswith("hydra")
    }
    return params | groups


def run_name(overrides: Sequence[str], sweep_overrides: Sequence[str] = ()) -> str:
    """A run's name from its overrides: keys that change results, sorted, floats to 4 significant
    digits (the params keep full precision). The plain (non-sweep) overrides of the sweep command
    are left out: every child of the sweep has them, and they are on the parent."""
    parser = OverridesParser.create()
    shared = {
        (o.key_or_group, str(o.value()))
        for o in parser.parse_overrides(list(sweep_overrides))
        if not o.is_sweep_override()
    }
    logging_only = set(not_result_keys())
    parts = []
    for override in parser.parse_overrides(list(overrides)):
        value = override.value()
        if override.key_or_group in logging_only or (override.key_or_group, str(value)) in shared:
            continue
        text = f"{value:.4g}" if isinstance(value, float) else override.get_value_element_as_str()
        parts.append(f"{override.get_key_element()}={text}")
    return ",".join(sorted(parts)) or "default"


def run_tags(cfg: DictConfig, job: Job) -> dict[str, str]:
    """The tags a new training run starts with: how to re-run it and what it computes."""
    return {TAG_OVERRIDES: " ".join(job.overrides), TAG_HASH: config_hash(cfg)}
