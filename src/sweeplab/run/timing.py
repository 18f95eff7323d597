"""Seconds spent per named phase of a run, logged as ``time/<phase>_s``."""

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar


class Stopwatch:
    """Phases may nest (metric logging inside training); each second counts for the innermost
    phase only, so the phases add up to the run's wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._nested: list[float] = []

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[phase] += elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed

    def metrics(self) -> dict[str, float]:
        return {f"time/{phase}_s": seconds for phase, seconds in self.seconds.items()}


P = ParamSpec("P")
R = TypeVar("R")


def timed(phase: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator for a phase of a run: the call counts as ``phase`` on ``args[0].watch`` (the
    run's ``Session``), so timing sits on the phase itself rather than around its call."""

    def decorator(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with args[0].watch(phase):  # type: ignore[attr-defined]
                return function(*args, **kwargs)

        return wrapper

    return decorator
