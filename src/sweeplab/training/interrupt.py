"""SIGINT and SIGTERM as a clean stop: finish the step, checkpoint, end the run KILLED.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be and lets
SIGTERM kill the process outright; neither leaves a resumable run. While a ``SignalGuard`` is
installed both signals raise ``Interrupted`` instead, and while it defers (the training loop)
the first one only sets a flag that the loop checks between steps.
"""

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop requested by a signal.

    A ``BaseException``, like ``KeyboardInterrupt``, so that handlers written for errors (a
    sweep's ``on_error=continue``) do not swallow it. ``clean`` says the training state is at a
    step boundary, so it can be checkpointed.
    """

    def __init__(self, signum: int, clean: bool) -> None:
        self.signum = signum
        self.clean = clean
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 128 + its number (130 for SIGINT)."""
        return 128 + self.signum


class SignalGuard:
    """Turns the first SIGINT/SIGTERM into a request the training loop honours between steps,
    and any further one (or one outside the loop) into ``Interrupted`` at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def raise_if_requested(self) -> None:
        """Called by the training loop at step boundaries."""
        if self.signum is not None:
            raise Interrupted(self.signum, clean=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator["SignalGuard"]:
        """Handle both signals until the block ends; signals only reach the main thread, so a job
        run elsewhere (a thread-based launcher) keeps the default handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside the block the first signal waits for ``raise_if_requested``; a signal that the
        block never got to honour (it arrived during the last step) is raised when it ends."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        self.raise_if_requested()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._deferring and self.signum is None:
            self.signum = signum
            log.warning(
                "%s: stopping after this step to save a checkpoint (send it again to stop at once)",
                signal.Signals(signum).name,
            )
            return
        self.signum = signum
        raise Interrupted(signum, clean=False)
