"""One experiment, config in, metrics out: the story of a run as a list of phases.

A plain function of a composed config and a ``Job``, callable from tests without Hydra's global
state. Each phase lives in ``sweeplab.phases`` with plain inputs and outputs. Everything that
can reject the config (values, device, data, tracking store) runs before the MLflow run opens,
so a bad config leaves no run behind.
"""

from omegaconf import DictConfig

from sweeplab.interrupt import SignalGuard
from sweeplab.job import Job
from sweeplab.phases import (
    build,
    decide_start,
    evaluate_test,
    open_run,
    record_outputs,
    rehearse,
    report,
    results,
    train,
)
from sweeplab.timing import Stopwatch


def run(cfg: DictConfig, job: Job, guard: SignalGuard | None = None) -> dict[str, float]:
    """Train and evaluate the configured model, logging everything to one MLflow run.

    ``guard``, installed by the caller, turns SIGINT/SIGTERM into a checkpoint at the next step
    boundary and a KILLED run. With ``resume=<run id|checkpoint>``, or inside a sweep that finds
    a KILLED run with this config, the run is reopened and continues from its latest checkpoint;
    inside a sweep that finds a FINISHED one, its metrics are returned without training.
    """
    watch = Stopwatch()
    start = decide_start(cfg, job, watch)  # new, resumed, or reused
    if start.reused is not None:
        return start.reused
    session = build(start, watch)  # data, model, optimizer, schedule, training state
    rehearse(session)  # on a GPU: first uses of the run's kernels, while the MLflow run opens
    with open_run(session, start, job) as record:  # the run ends FINISHED, KILLED or FAILED here
        history = train(session, record, guard or SignalGuard())
        test = evaluate_test(session, record, history)
        record_outputs(session, record, history, test)  # figures, model, phase timings
    metrics = results(history, test)
    report(session, record, metrics)  # the last line: status, objective, run id, where to look
    return metrics
