"""One experiment, config in, metrics out: the story of a run as a list of phases.

A plain function of a composed config and a ``Job``, callable from tests without Hydra's global
state. Each phase lives in ``sweeplab.run.phases`` with plain inputs and outputs. Everything that
can reject the config (values, device, data, tracking store) runs before the MLflow run opens,
so a bad config leaves no run behind.
"""

from omegaconf import DictConfig

from sweeplab.config.job import Job
from sweeplab.run.phases import (
    build,
    decide_start,
    evaluate_test,
    log_outputs,
    open_run,
    rehearse,
    report,
    results,
    train_with_checkpoints,
)
from sweeplab.run.timing import Stopwatch
from sweeplab.training.interrupt import SignalGuard


def run(cfg: DictConfig, job: Job, guard: SignalGuard | None = None) -> dict[str, float]:
    """Train and evaluate the configured model, logging everything to one MLflow run.

    ``guard``, installed by the caller, turns SIGINT/SIGTERM into a checkpoint at the next step
    boundary and a KILLED run. With ``resume=<run id|checkpoint>``, or inside a sweep that finds
    a KILLED run with this config, the run is reopened and continues from its latest checkpoint;
    inside a sweep that finds a FINISHED one, its metrics are returned without training.
    """
    watch = Stopwatch()
    start = decide_start(cfg, job, watch)  # new, resumed, or reused
    if start.finished_metrics is not None:
        return start.finished_metrics
    session = build(start, watch)  # data, model, optimizer, schedule, training state
    rehearse(session)  # on a GPU: first uses of the run's kernels, while the MLflow run opens
    with open_run(session, start, job) as mlflow_run:  # the run ends FINISHED, KILLED or FAILED here
        history = train_with_checkpoints(session, mlflow_run, guard or SignalGuard())
        test = evaluate_test(session, mlflow_run, history)
        log_outputs(session, mlflow_run, history, test)  # figures, model, phase timings
    metrics = results(history, test)
    report(session, mlflow_run, metrics)  # the last line: status, objective, run id, where to look
    return metrics
