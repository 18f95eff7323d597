"""A stack of runs: the jobs of one shape trained as one program, each recorded as its own run.

The phases are those of ``sweeplab.task``, called per member: every member decides its own start
(a FINISHED config is reused, a KILLED one resumes alone from its checkpoint), builds its own
model, optimizer and schedule on data read once, and opens its own MLflow run. Only training is
shared (``sweeplab.stacked_train``). Each member's run ends by itself: FAILED when its loss
diverges while the others train on, KILLED with a checkpoint on SIGINT/SIGTERM, FINISHED with
the record a solo run makes, plus tags naming its stack and the stack's size.
"""

import contextlib
import functools
import logging
import math

from omegaconf import DictConfig, OmegaConf

from sweeplab import rehearsal, warmup
from sweeplab.interrupt import Interrupted, SignalGuard
from sweeplab.job import Job
from sweeplab.phases import (
    Record,
    Start,
    build_many,
    decide_start,
    evaluate_test,
    open_run,
    record_many,
    report,
    results,
)
from sweeplab.record import TAG_STACK, TAG_STACK_SIZE
from sweeplab.stack import NotStackable
from sweeplab.stacked_train import Member, fit_stack, stack
from sweeplab.sweep import job_outcome
from sweeplab.task import run
from sweeplab.timing import Stopwatch
from sweeplab.tracking import Tracker
from sweeplab.train import DivergedError

log = logging.getLogger(__name__)


def run_stack(members: list[tuple[DictConfig, Job]], name: str, guard: SignalGuard) -> list[float]:
    """Every member's ``sweep.objective`` (NaN for a failed one, as for a solo sweep job). A
    member's failure follows its ``sweep.on_error``; an interrupt ends every member and raises."""
    objectives = [math.nan] * len(members)
    fresh: list[tuple[int, Start, Stopwatch]] = []
    alone: list[int] = []
    store: Tracker | None = None  # the sweep's store and parent, opened once for the members
    for i, (cfg, job) in enumerate(members):
        with _outcome(job, cfg):
            watch = Stopwatch()
            start = decide_start(cfg, job, watch, store)
            store = store or start.tracker
            if start.reused is not None:
                objectives[i] = _objective(cfg, start.reused)
            elif start.resume is not None:
                alone.append(i)  # continues from its own checkpoint, as a solo run would
            else:
                fresh.append((i, start, watch))
    if len(fresh) > 1:
        try:
            for i, value in _train_together(members, fresh, name, guard).items():
                objectives[i] = value
        except NotStackable as reason:
            log.info("stack %s: %s; its %d members train one after another", name, reason, len(fresh))
            alone += [i for i, _, _ in fresh]
    else:
        alone += [i for i, _, _ in fresh]
    for i in sorted(alone):
        cfg, job = members[i]
        with _outcome(job, cfg):
            objectives[i] = _objective(cfg, run(cfg, job, guard))
    return objectives


def _train_together(
    members: list[tuple[DictConfig, Job]],
    fresh: list[tuple[int, Start, Stopwatch]],
    name: str,
    guard: SignalGuard,
) -> dict[int, float]:
    sessions = build_many([(start, watch) for _, start, watch in fresh])
    first = sessions[0]
    together = stack([session.training for session in sessions], first.data.in_features)
    if first.device.type == "cuda":  # first uses of the stack's kernels, while the runs open
        warmup.rehearse(rehearsal.stacked(together, first.data, first.trainer))
    runs = [contextlib.ExitStack() for _ in fresh]
    records: list[Record] = []
    try:
        for (i, start, _), session, held in zip(fresh, sessions, runs, strict=True):
            tags = {TAG_STACK: name, TAG_STACK_SIZE: str(len(fresh))}
            records.append(held.enter_context(open_run(session, start, members[i][1], tags)))
        stacked = [
            Member(
                session.training,
                functools.partial(record.epoch_end, session),
                functools.partial(_fail, runs[j], members[fresh[j][0]]),
            )
            for j, (session, record) in enumerate(zip(sessions, records, strict=True))
        ]
        warmup.wait()
        watch = Stopwatch()
        try:
            with guard.deferred(), watch("training"):
                fit_stack(stacked, together, first.data, first.trainer, guard)
        except Interrupted as stop:
            for member, session, record, held in zip(stacked, sessions, records, runs, strict=True):
                if member.alive:
                    record.stopped(session, stop)
                    held.__exit__(type(stop), stop, stop.__traceback__)
            with _outcome(members[fresh[0][0]][1], members[fresh[0][0]][0]):
                raise
        done = [j for j, member in enumerate(stacked) if member.alive]
        outcomes = []
        for j in done:
            session, record = sessions[j], records[j]
            session.watch.seconds["training"] += watch.seconds["training"]  # the stack's, shared
            history = session.training.progress.history
            outcomes.append((session, record, history, evaluate_test(session, record, history)))
        record_many(outcomes)
        finished = {}
        for j, (session, record, history, test) in zip(done, outcomes, strict=True):
            runs[j].close()  # FINISHED
            metrics = results(history, test)
            report(session, record, metrics)
            finished[fresh[j][0]] = _objective(session.cfg, metrics)
        return finished
    except BaseException as exc:
        for held in runs:  # every run still open ends FAILED (or KILLED) with the reason
            held.__exit__(type(exc), exc, exc.__traceback__)
        raise


def _fail(held: contextlib.ExitStack, member: tuple[DictConfig, Job], error: DivergedError) -> None:
    """A member's run ends FAILED with the reason; the sweep's ``on_error`` decides what follows:
    ``continue`` trains the others on, ``raise`` stops the stack, its other runs FAILED saying why."""
    held.__exit__(type(error), error, None)
    cfg, job = member
    try:
        with _outcome(job, cfg):
            raise error
    except DivergedError as exc:
        overrides = " ".join(job.overrides)
        raise StackStopped(f"{overrides} failed ({exc}) and sweep.on_error=raise stops its stack") from exc


class StackStopped(DivergedError):
    """A member diverged under ``sweep.on_error=raise``: the whole stack stops."""


def _outcome(job: Job, cfg: DictConfig) -> contextlib.AbstractContextManager[None]:
    return job_outcome(job, OmegaConf.to_object(cfg.sweep))


def _objective(cfg: DictConfig, metrics: dict[str, float]) -> float:
    return metrics.get(cfg.sweep.objective, math.nan)
