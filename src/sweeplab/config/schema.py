"""Structured-config schemas for the top level and the groups that are not registry-backed.

Stored in Hydra's ConfigStore so composition rejects unknown keys and wrong types with the full
key in the message. Value ranges are checked in ``__post_init__``, which runs when the task turns
the node into an object with ``OmegaConf.to_object`` before anything is trained or tracked.
"""

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sweeplab.config.errors import require

# trainer.cuda_graph: auto = on for CUDA devices (see sweeplab.training.steps)
CUDA_GRAPH = ("auto", "true", "false")


@dataclasses.dataclass
class TrainerConfig:
    """How long and in what batches to train, and how often to log per-step metrics."""

    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 8192
    log_every_n_steps: int = 50
    drop_last: bool = False
    cuda_graph: str = "auto"

    def __post_init__(self) -> None:
        # YAML and the command line give true/false as booleans, which the str field reads "True"
        self.cuda_graph = self.cuda_graph.lower()
        require(
            self.cuda_graph in CUDA_GRAPH,
            "trainer.cuda_graph",
            self.cuda_graph,
            f"one of {', '.join(CUDA_GRAPH)}",
        )
        require(self.epochs >= 1, "trainer.epochs", self.epochs, "an integer >= 1")
        require(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "an integer >= 1")
        require(self.eval_batch_size >= 1, "trainer.eval_batch_size", self.eval_batch_size, "an integer >= 1")
        require(
            self.log_every_n_steps >= 1,
            "trainer.log_every_n_steps",
            self.log_every_n_steps,
            "an integer >= 1",
        )


@dataclasses.dataclass
class TrackingConfig:
    """Where runs go in MLflow and what is logged besides metrics."""

    experiment_name: str = "sweeplab"
    # None: $MLFLOW_TRACKING_URI if set, else sqlite:///<launch dir>/mlflow.db
    uri: str | None = None
    # None: <launch dir>/mlartifacts for experiments this project creates on a local sqlite store
    artifact_location: str | None = None
    log_model: bool = True
    figures: bool = True
    # points drawn in each PCA scatter (PCA is fitted on the same sample); 0 = all
    pca_samples: int = 5000

    def __post_init__(self) -> None:
        require(
            bool(self.experiment_name), "tracking.experiment_name", self.experiment_name, "a non-empty name"
        )
        require(self.pca_samples >= 0, "tracking.pca_samples", self.pca_samples, "an integer >= 0")


@dataclasses.dataclass
class SweepConfig:
    """How a job behaves inside a multirun (``sweeplab -m``); single runs ignore it."""

    # the metric a job returns to the sweeper and the sweep summary ranks children by
    objective: str = "val/acc"
    direction: str = "maximize"
    # continue: a failing job is marked FAILED and the sweep goes on; raise: stop the sweep
    on_error: str = "continue"
    # skip a job whose config hash already has a FINISHED run in the experiment; false reruns it
    skip_completed: bool = True

    def __post_init__(self) -> None:
        require(
            self.direction in ("maximize", "minimize"),
            "sweep.direction",
            self.direction,
            "maximize or minimize",
        )
        require(self.on_error in ("continue", "raise"), "sweep.on_error", self.on_error, "continue or raise")


@dataclasses.dataclass
class CheckpointConfig:
    """What survives an interruption: training state saved to the job's ``checkpoints/`` folder."""

    # save at the end of every N-th epoch; 0 = only when interrupted (SIGINT/SIGTERM)
    every_n_epochs: int = 1
    # periodic checkpoints kept on disk, newest first (the best one is kept besides)
    keep_last: int = 1
    # also keep checkpoints/best.pt, the state with the highest val/acc so far
    save_best: bool = True

    def __post_init__(self) -> None:
        require(self.every_n_epochs >= 0, "checkpoint.every_n_epochs", self.every_n_epochs, "an integer >= 0")
        require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "an integer >= 1")


@dataclasses.dataclass
class Config:
    """The composed config; registry-backed groups are typed by their option's ``schema/<group>/<name>``."""

    seed: int = 0
    device: str = "auto"
    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    # an MLflow run id or a checkpoint file: continue that run from its latest checkpoint
    resume: str | None = None
    # resume even if the config now differs in keys that change results
    resume_force: bool = False


ConfigStore.instance().store(name="config_schema", node=Config)


@dataclasses.dataclass
class EvalConfig:
    """``sweeplab-eval``: which trained model to evaluate, on which data and split."""

    # the MLflow run whose logged model is evaluated, or a checkpoint file (one of the two)
    run_id: str | None = None
    checkpoint: str | None = None
    split: str = "test"
    # None: the data config the run was trained with; data=<name> evaluates on another dataset
    data: Any = None
    device: str = "auto"
    # None: the run's trainer.eval_batch_size, so the numbers match the run's own
    eval_batch_size: int | None = None
    # confusion matrix and PCA figures of the split and of every hidden layer
    figures: bool = True
    # seeds the choice of samples shown in the PCA figures
    seed: int = 0
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        require(
            (self.run_id is None) != (self.checkpoint is None),
            "run_id/checkpoint",
            (self.run_id, self.checkpoint),
            "exactly one of run_id=<MLflow run id> or checkpoint=<path to a .pt file>",
        )
        require(self.split in ("train", "val", "test"), "split", self.split, "train, val or test")
        require(
            self.eval_batch_size is None or self.eval_batch_size >= 1,
            "eval_batch_size",
            self.eval_batch_size,
            "an integer >= 1, or null",
        )


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
