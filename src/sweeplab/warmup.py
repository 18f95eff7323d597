"""The CUDA context, created in a background thread while the run's data is read.

Reading and converting the data is mostly file reads and tensor work that leave the interpreter
free; the data needs the context only once it is read. (What a run needs at its end, the figure
libraries and MLflow's map of installed distributions, is prepared in the child that writes its
artifacts, ``sweeplab.artifacts``.) ``wait`` joins the thread; it must have ended before the
process forks.
"""

import threading

_thread: threading.Thread | None = None


def start() -> None:
    """Start the thread, once per process (never in a process that forks workers afterwards,
    which could not use a context made before)."""
    global _thread
    if _thread is None:
        _thread = threading.Thread(target=_prepare, name="warmup", daemon=True)
        _thread.start()


def wait() -> None:
    if _thread is not None:
        _thread.join()


def _prepare() -> None:
    import torch

    torch.cuda.init()
