"""Work a run will need at its end, done in a background thread while its data loads.

Reading and converting the data is mostly file reads and tensor work that leave the interpreter
free, so a second thread can meanwhile:

- let MLflow map every installed distribution: logging a model checks its requirements against
  them, a walk made once per process (~0.35 s here, seconds with a CUDA build of torch);
- create the CUDA context (for a CUDA device), which the data needs only once it is read.

(The figure libraries are imported by the children that draw, ``sweeplab.render``.) ``wait``
joins the thread; it must have ended before the process forks.
"""

import threading

_thread: threading.Thread | None = None


def start(log_model: bool, cuda: bool = False) -> None:
    """Start the thread, once per process, for the parts the run will use (``cuda``: never in
    a process that forks workers afterwards, which could not use a context made before)."""
    global _thread
    if _thread is None:
        args = (log_model, cuda)
        _thread = threading.Thread(target=_prepare, args=args, name="warmup", daemon=True)
        _thread.start()


def wait() -> None:
    if _thread is not None:
        _thread.join()


def _prepare(log_model: bool, cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.init()
    if log_model:
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()  # cached by MLflow for the process
