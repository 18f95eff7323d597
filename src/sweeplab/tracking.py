"""MLflow tracking for one job: where the store is, the experiment, and what a run records.

The store and the experiment are created here, before a run starts, so a job that cannot reach
its tracking server fails without leaving a run behind. The experiment id is passed explicitly:
nothing depends on process-global ``set_experiment`` state.
"""

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch
from matplotlib.figure import Figure
from mlflow.data.dataset import Dataset
from mlflow.entities import Metric, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from sweeplab.errors import ConfigError
from sweeplab.interrupt import Interrupted
from sweeplab.job import ENV_URI, Job
from sweeplab.schema import TrackingConfig

log = logging.getLogger(__name__)

TAG_HASH = "sweeplab.config_hash"
TAG_FAILURE = "sweeplab.failure"
# + config hash, on a sweep's parent: the FINISHED run a job reused instead of training again
TAG_REUSED = "sweeplab.reused."
# where a run keeps its checkpoints (absolute), and why and where an interrupted run stopped
TAG_CHECKPOINTS = "sweeplab.checkpoint_dir"
TAG_STOPPED = "sweeplab.stopped"


def tracking_uri(cfg: TrackingConfig, launch_dir: Path, environ: Mapping[str, str]) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else an sqlite file in the launch dir.

    The sqlite path is absolute so every job of a sweep, whatever its working directory, writes
    to the database that ``mlflow ui`` run in the launch directory shows.
    """
    if cfg.uri:
        return cfg.uri
    if environ.get(ENV_URI):
        return environ[ENV_URI]
    return f"sqlite:///{(launch_dir / 'mlflow.db').resolve()}"


def artifact_location(cfg: TrackingConfig, uri: str) -> str | None:
    """Artifacts of a new experiment on an sqlite store go in one folder beside the database."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides where artifacts go


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested dicts (``optimizer.lr``); lists stay whole (``model.hidden_dims``)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


# top-level keys that change where, whether or from where a run is logged, not what it computes
NOT_RESULTS = ("tracking", "sweep", "checkpoint", "resume", "resume_force")


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


class Tracker:
    """An MLflow store with the experiment this job logs to, both known to exist.

    Inside a sweep the experiment is the parent run's, read from the store, so no job depends
    on winning a race to create or set it.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        launch_dir: Path,
        environ: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.uri = tracking_uri(cfg, launch_dir, environ)
        self.client = MlflowClient(self.uri)
        self.parent_run_id = parent_run_id
        try:
            if parent_run_id:
                self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id
            else:
                experiment = self.client.get_experiment_by_name(cfg.experiment_name)
                self.experiment_id = (
                    experiment.experiment_id
                    if experiment
                    else self.client.create_experiment(
                        cfg.experiment_name, artifact_location=artifact_location(cfg, self.uri)
                    )
                )
        except MlflowException as exc:
            source = "tracking.uri" if cfg.uri else ENV_URI if environ.get(ENV_URI) else "the default store"
            raise ConfigError(
                f"Cannot use the MLflow tracking store {self.uri} (from {source}): "
                f"{str(exc).splitlines()[0]}. Start that server, fix {source}, or unset "
                f"{ENV_URI} to log to an sqlite file in the launch directory."
            ) from exc

    def newest_run(self, status: str, tags: dict[str, str]) -> Run | None:
        """The newest run of this experiment with ``status`` and these tag values, if any."""
        conditions = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=" and ".join([*conditions, f"attributes.status = '{status}'"]),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    @contextlib.contextmanager
    def start_run(
        self, cfg: DictConfig, job: Job, tags: dict[str, str], resume_run_id: str | None = None
    ) -> Iterator["RunLog"]:
        """A new run, or ``resume_run_id`` reopened, that ends FINISHED; KILLED if the block is
        interrupted by a signal; FAILED, tagged with the reason, if it raises."""
        mlflow.set_tracking_uri(self.uri)
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id)  # params stay as first logged
            if TAG_STOPPED in run.data.tags:
                self.client.delete_tag(resume_run_id, TAG_STOPPED)
        else:
            tags = {"sweeplab.overrides": " ".join(job.overrides), TAG_HASH: config_hash(cfg), **tags}
            run = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=job.name,
                tags=tags,
                parent_run_id=self.parent_run_id,
            )
            mlflow.log_params(run_params(cfg, job))
        status = RunStatus.FINISHED
        try:
            yield RunLog(self.client, run.info.run_id)
        except Interrupted:
            status = RunStatus.KILLED
            raise
        except BaseException as exc:
            status = RunStatus.FAILED
            self.client.set_tag(run.info.run_id, TAG_FAILURE, f"{type(exc).__name__}: {exc}"[:5000])
            raise
        finally:
            mlflow.end_run(RunStatus.to_string(status))

    def __repr__(self) -> str:
        return f"Tracker({self.uri!r}, experiment {self.cfg.experiment_name!r})"


@dataclasses.dataclass
class RunLog:
    """Writes metrics, figures, files and the model of one open run."""

    client: MlflowClient
    run_id: str

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Metrics of many steps in one request."""
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for step, values in rows for key, value in values.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_rows([(step, metrics)])

    def log_figure(self, figure: Figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, f"figures/{name}.png")

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def log_folder(self, folder: Path, path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), path)

    def log_dataset(self, dataset: Dataset) -> None:
        """The data the run trained on, as an MLflow dataset input with its digest.

        MLflow looks for the dataset's row in the experiment and inserts it when missing, so
        two parallel jobs logging the same data can both insert and one fails on the unique
        constraint; by then the row exists, and a second try links to it.
        """
        try:
            mlflow.log_input(dataset, context="training")
        except MlflowException as exc:
            log.debug("retrying the dataset input after: %s", exc)
            mlflow.log_input(dataset, context="training")

    def log_model(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        """The model, on CPU, with a signature; ``mlflow.pytorch.load_model`` brings it back.

        Pickled rather than exported with ``torch.export`` ("pt2"): exporting took ~3.7 s per
        MLP here against 0.06 s, and the pickle loads back as the sweeplab class itself (hidden
        layers by name included). Loading it needs sweeplab importable.
        """
        model = copy.deepcopy(model).cpu().eval()
        with torch.inference_mode():
            output = model(example.cpu())
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example.cpu().numpy(), output.numpy()),
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
