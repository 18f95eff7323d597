"""A stack of runs: the jobs of one shape trained as one program, each recorded as its own run.

The phases are those of ``sweeplab.run.task``, called per member: every member decides its own
start (a FINISHED config is reused, a KILLED one resumes alone from its checkpoint), builds its
own model, optimizer and schedule on data read once, and opens its own MLflow run. Only training
is shared (``sweeplab.stacking.loop``). Each member's run ends by itself: FAILED when its loss
diverges while the others train on, KILLED with a checkpoint on SIGINT/SIGTERM, FINISHED with
the record a solo run makes, plus tags naming its stack and the stack's size.
"""

import contextlib
import dataclasses
import functools
import logging
import math

from omegaconf import DictConfig, OmegaConf

from sweeplab.config.job import Job
from sweeplab.run.phases import (
    OpenRun,
    Session,
    Start,
    build_many,
    decide_start,
    evaluate_test,
    log_all_outputs,
    open_run,
    report,
    results,
)
from sweeplab.run.task import run
from sweeplab.run.timing import Stopwatch
from sweeplab.stacking.loop import Member, fit_stack, stack
from sweeplab.stacking.model import NotStackable
from sweeplab.stacking.rehearsal import stacked as stacked_rehearsal
from sweeplab.sweep.jobs import job_outcome
from sweeplab.tracking.store import Tracker
from sweeplab.tracking.tags import TAG_STACK, TAG_STACK_SIZE
from sweeplab.training import first_uses
from sweeplab.training.interrupt import Interrupted, SignalGuard
from sweeplab.training.loop import DivergedError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Fresh:
    """A member that trains in the stack: its place in the batch, what it runs, how far it got."""

    index: int
    cfg: DictConfig
    job: Job
    start: Start
    watch: Stopwatch
    session: Session | None = None  # once built
    opened: OpenRun | None = None  # once its MLflow run is open
    held: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)

    def end(self, error: BaseException | None = None) -> None:
        """End the member's MLflow run: FINISHED, or FAILED/KILLED with ``error`` as the reason.
        A run already ended is left as it is."""
        if error is None:
            self.held.close()
        else:
            self.held.__exit__(type(error), error, error.__traceback__)

    def outcome(self) -> contextlib.AbstractContextManager[None]:
        """``sweep.on_error`` for this member's failures, and the parent KILLED on a signal."""
        return _outcome(self.job, self.cfg)


def run_stack(members: list[tuple[DictConfig, Job]], name: str, guard: SignalGuard) -> list[float]:
    """Every member's ``sweep.objective`` (NaN for a failed one, as for a solo sweep job). A
    member's failure follows its ``sweep.on_error``; an interrupt ends every member and raises."""
    objectives = [math.nan] * len(members)
    fresh: list[_Fresh] = []
    alone: list[int] = []
    store: Tracker | None = None  # the sweep's store and parent, opened once for the members
    for i, (cfg, job) in enumerate(members):
        with _outcome(job, cfg):
            watch = Stopwatch()
            start = decide_start(cfg, job, watch, store)
            store = store or start.tracker
            if start.finished_metrics is not None:
                objectives[i] = _objective(cfg, start.finished_metrics)
            elif start.resume is not None:
                alone.append(i)  # continues from its own checkpoint, as a solo run would
            else:
                fresh.append(_Fresh(i, cfg, job, start, watch))
    if len(fresh) > 1:
        try:
            for i, value in _train_together(fresh, name, guard).items():
                objectives[i] = value
        except NotStackable as reason:
            log.info("stack %s: %s; its %d members train one after another", name, reason, len(fresh))
            alone += [member.index for member in fresh]
    else:
        alone += [member.index for member in fresh]
    for i in sorted(alone):
        cfg, job = members[i]
        with _outcome(job, cfg):
            objectives[i] = _objective(cfg, run(cfg, job, guard))
    return objectives


def _train_together(fresh: list[_Fresh], name: str, guard: SignalGuard) -> dict[int, float]:
    """Build, open and train ``fresh`` as one stack; return the objective of every member that
    finished, by its index in the batch. ``NotStackable`` comes before any run is opened; any
    other error that stops the stack ends every run still open with it as the reason."""
    sessions = build_many([(member.start, member.watch) for member in fresh])
    first = sessions[0]
    together = stack([session.training for session in sessions], first.data.in_features)
    if first.device.type == "cuda":  # first uses of the stack's kernels, while the runs open
        first_uses.rehearse(stacked_rehearsal(together, first.data, first.trainer))
    tags = {TAG_STACK: name, TAG_STACK_SIZE: str(len(fresh))}
    try:
        for member, session in zip(fresh, sessions, strict=True):
            member.session = session
            member.opened = member.held.enter_context(open_run(session, member.start, member.job, tags))
        training = [
            Member(
                member.session.training,
                functools.partial(member.opened.epoch_end, member.session),
                functools.partial(_fail, member),
            )
            for member in fresh
        ]
        first_uses.wait()
        watch = Stopwatch()
        try:
            with guard.deferred(), watch("training"):
                fit_stack(training, together, first.data, first.trainer, guard)
        except Interrupted as stop:
            for member, trained in zip(fresh, training, strict=True):
                if trained.alive:
                    member.opened.stopped(member.session, stop)
                    member.end(stop)
            with fresh[0].outcome():
                raise
        alive = [member for member, trained in zip(fresh, training, strict=True) if trained.alive]
        return _finish(alive, watch.seconds["training"])
    except BaseException as exc:
        for member in fresh:
            member.end(exc)
        raise


def _finish(alive: list[_Fresh], training_s: float) -> dict[int, float]:
    """The phases after training, for the members that trained to the end: test evaluation,
    outputs (written together), FINISHED runs and their last lines."""
    outcomes = []
    for member in alive:
        session, opened = member.session, member.opened
        session.watch.seconds["training"] += training_s  # the stack's, shared
        history = session.training.progress.history
        outcomes.append((session, opened, history, evaluate_test(session, opened, history)))
    log_all_outputs(outcomes)
    finished = {}
    for member, (session, opened, history, test) in zip(alive, outcomes, strict=True):
        member.end()
        metrics = results(history, test)
        report(session, opened, metrics)
        finished[member.index] = _objective(session.cfg, metrics)
    return finished


def _fail(member: _Fresh, error: DivergedError) -> None:
    """A member's run ends FAILED with the reason; the sweep's ``on_error`` decides what follows:
    ``continue`` trains the others on, ``raise`` stops the stack, its other runs FAILED saying why."""
    member.end(error)
    try:
        with member.outcome():
            raise error
    except DivergedError as exc:
        overrides = " ".join(member.job.overrides)
        raise StackStopped(f"{overrides} failed ({exc}) and sweep.on_error=raise stops its stack") from exc


class StackStopped(DivergedError):
    """A member diverged under ``sweep.on_error=raise``: the whole stack stops."""


def _outcome(job: Job, cfg: DictConfig) -> contextlib.AbstractContextManager[None]:
    return job_outcome(job, OmegaConf.to_object(cfg.sweep))


def _objective(cfg: DictConfig, metrics: dict[str, float]) -> float:
    return metrics.get(cfg.sweep.objective, math.nan)
