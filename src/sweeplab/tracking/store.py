"""MLflow tracking: where the store is, the experiment, and one way to open, fill and end a run.

The store and the experiment are created here, before a run starts, so a job that cannot reach
its tracking server fails without leaving a run behind. Everything goes through an
``MlflowClient`` of that store with explicit experiment and run ids: nothing depends on MLflow's
process-global tracking URI, active run or experiment, so one process can fill several runs,
in several stores, without them mixing.
"""

import contextlib
import copy
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from filelock import FileLock
from mlflow.data.dataset import Dataset
from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.tracking.context import registry as context_registry
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from sweeplab.config.errors import ConfigError
from sweeplab.config.job import ENV_URI
from sweeplab.config.schema import TrackingConfig
from sweeplab.tracking.tags import (
    TAG_EXPERIMENT_KIND,
    TAG_FAILURE,
    TAG_PARENT,
    TAG_STOPPED,
    TAG_SWEEP_OVERRIDES,
    TRAINING_EXPERIMENT,
)
from sweeplab.training.interrupt import Interrupted

log = logging.getLogger(__name__)

# the name of the logged model: runs:/<run id>/model
MODEL_NAME = "model"


class _PickleNotice(logging.Filter):
    """Drops MLflow's advice against pickled models on every model logged: sweeplab pickles on
    purpose (``RunLog.log_model`` says why). ``hydra.verbose=[mlflow]`` lets it through."""

    def filter(self, record: logging.LogRecord) -> bool:
        notice = record.getMessage().startswith("Saving pytorch model by Pickle")
        return not notice or logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


logging.getLogger("mlflow.pytorch").addFilter(_PickleNotice())


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


def store_lock(uri: str) -> contextlib.AbstractContextManager[object]:
    """An sqlite store is created, migrated and given its experiment by one process at a time:
    processes that start together on a fresh file otherwise fail inside MLflow's migration, or
    lose the race to create the experiment. A lock file beside the database serialises them; a
    tracking server does that itself."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return FileLock(f"{uri.removeprefix('sqlite:///')}.lock")


def artifact_location(cfg: TrackingConfig, uri: str) -> str | None:
    """Artifacts of a new experiment on an sqlite store go in one folder beside the database."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides where artifacts go


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
        self.parent_run_id = parent_run_id
        try:
            with store_lock(self.uri):  # a client of a new sqlite file migrates it at once
                self.client = MlflowClient(self.uri)
                self.parent = self.client.get_run(parent_run_id) if parent_run_id else None
                self.experiment_id = self.parent.info.experiment_id if self.parent else self._experiment()
        except MlflowException as exc:
            source = "tracking.uri" if cfg.uri else ENV_URI if environ.get(ENV_URI) else "the default store"
            raise ConfigError(
                f"Cannot use the MLflow tracking store {self.uri} (from {source}): "
                f"{str(exc).splitlines()[0]}. Start that server, fix {source}, or unset "
                f"{ENV_URI} to log to an sqlite file in the launch directory."
            ) from exc

    @property
    def sweep_overrides(self) -> list[str]:
        """The command of the sweep this job belongs to; none outside a sweep."""
        return json.loads(self.parent.data.tags.get(TAG_SWEEP_OVERRIDES, "[]")) if self.parent else []

    def _experiment(self) -> str:
        """The configured experiment, created if new."""
        experiment = self.client.get_experiment_by_name(self.cfg.experiment_name)
        if experiment:
            return experiment.experiment_id
        return self.client.create_experiment(
            self.cfg.experiment_name,
            artifact_location=artifact_location(self.cfg, self.uri),
            tags={TAG_EXPERIMENT_KIND: TRAINING_EXPERIMENT},
        )

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

    def start_run(
        self,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any] | None = None,
        experiment_id: str | None = None,
    ) -> "RunLog":
        """A new RUNNING run in this experiment (or ``experiment_id``), nested under
        ``parent_run_id`` if set; ``RunLog.end`` ends it."""
        parent = {TAG_PARENT: self.parent_run_id} if self.parent_run_id else {}
        run = self.client.create_run(
            experiment_id or self.experiment_id,
            run_name=name,
            tags=context_registry.resolve_tags(tags | parent),
        )
        run_log = RunLog(self.client, run.info.run_id)
        run_log.log_params(params or {})
        return run_log

    def reopen(self, run_id: str) -> "RunLog":
        """An ended run RUNNING again (a resume), its params as first logged."""
        self.client.update_run(run_id, status="RUNNING")
        if TAG_STOPPED in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, TAG_STOPPED)
        return RunLog(self.client, run_id)

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any] | None = None,
        *,
        experiment_id: str | None = None,
        resume_run_id: str | None = None,
    ) -> Iterator["RunLog"]:
        """A run (new, or ``resume_run_id`` reopened) for the length of a block, which ends it
        FINISHED; KILLED if a signal interrupts the block; FAILED, tagged with the reason, if it
        raises. Training runs and evaluation runs open here; a sweep's parent, which outlives
        any one block, uses ``start_run``/``reopen`` and ``RunLog.end`` directly."""
        if resume_run_id:
            run_log = self.reopen(resume_run_id)
        else:
            run_log = self.start_run(name, tags, params, experiment_id)
        try:
            yield run_log
        except Interrupted:
            run_log.end("KILLED")
            raise
        except BaseException as exc:
            run_log.end("FAILED", f"{type(exc).__name__}: {exc}")
            raise
        run_log.end("FINISHED")

    def load_model(self, run_id: str, map_location: torch.device) -> torch.nn.Module:
        """The model ``run_id`` logged, read from this store. (``runs:/`` URIs resolve logged
        models through the process-global tracking URI, so they are not used here.)"""
        run = self.client.get_run(run_id)
        found = self.client.search_logged_models(
            [run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
            max_results=1,
        )
        if not found:
            raise MlflowException(f"run {run_id} has no logged model {MODEL_NAME!r}")
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=found[0].artifact_location, dst_path=tmp, tracking_uri=self.uri
            )
            return mlflow.pytorch.load_model(local, map_location=map_location)

    def ui_link(self, run_id: str) -> str:
        """How to look at a run: ``mlflow ui`` on a local store, the run's page on a server."""
        page = f"#/experiments/{self.experiment_id}/runs/{run_id}"
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/{page}"
        return f"mlflow ui --backend-store-uri {self.uri}  (then http://127.0.0.1:5000/{page})"

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

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100], synchronous=True)

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
        inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "training")])]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException as exc:
            log.debug("retrying the dataset input after: %s", exc)
            self.client.log_inputs(self.run_id, datasets=inputs)

    def new_model(self, model: torch.nn.Module, example: torch.Tensor) -> "ModelFiles":
        """This run's logged model ``model``, created PENDING, and the job that writes its files
        (``log_model`` logs them). The steps are those of ``mlflow.pytorch.log_model``, through
        this run's client instead of the global one."""
        model = copy.deepcopy(model).cpu().eval()
        with torch.inference_mode():
            output = model(example.cpu())
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        logged = self.client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=self.run_id)
        mlflow_model = Model(
            artifact_path=logged.artifact_location, run_id=self.run_id, model_id=logged.model_id
        )
        return ModelFiles(model, example.cpu().numpy(), output.numpy(), mlflow_model)

    def log_model(self, files: "ModelFiles", folder: Path, step: int) -> None:
        """The ``folder`` that ``files`` wrote, as its logged model: READY, an output of this run
        at ``step``."""
        model_id = files.mlflow_model.model_id
        try:
            self.client.log_model_artifacts(model_id, str(folder))
        except BaseException:
            self.drop_model(files)
            raise
        self.client.finalize_logged_model(model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step)])

    def drop_model(self, files: "ModelFiles") -> None:
        """A logged model whose files were never logged ends FAILED."""
        self.client.finalize_logged_model(files.mlflow_model.model_id, "FAILED")

    def end(self, status: str, reason: str | None = None) -> None:
        """End the run with ``status``; a FAILED or KILLED run is tagged with ``reason``."""
        if reason:
            self.set_tag(TAG_FAILURE if status == "FAILED" else TAG_STOPPED, reason[:5000])
        self.client.set_terminated(self.run_id, status)


@dataclasses.dataclass
class ModelFiles:
    """Writes a logged model's folder as ``mlflow.pytorch.save_model`` does: a picklable job for
    the child process that writes a run's artifacts (``sweeplab.tracking.artifacts``), where MLflow's
    check of the requirements against the installed distributions costs this process nothing.

    Pickled rather than exported with ``torch.export`` ("pt2"): exporting an MLP takes seconds
    where pickling takes a fraction of one, and the pickle loads back as the sweeplab class
    itself (hidden layers by name included). Loading it needs sweeplab importable.
    """

    model: torch.nn.Module  # on CPU, in eval mode
    example: np.ndarray  # an input and the model's output on it: the signature
    output: np.ndarray
    mlflow_model: Model  # the logged model's ids, written into its MLmodel file

    def __call__(self, path: Path) -> None:
        mlflow.pytorch.save_model(
            self.model,
            path,
            mlflow_model=self.mlflow_model,
            signature=infer_signature(self.example, self.output),
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
