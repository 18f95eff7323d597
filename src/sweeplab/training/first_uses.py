"""The CUDA context and the first uses of the GPU, made in a background thread while the run's
data is read.

Reading and converting the data is mostly file reads and tensor work that leave the interpreter
free; the data needs the context only once it is read. A training step's first matrix product
and first backward pass cost more than the whole step later (``docs/gpu.md`` has the numbers),
and all of that is the process's, not the thread's: cuBLAS handles go back to torch's pool when
the thread ends, loaded kernels and autograd's device thread stay. So a product and a backward
pass on tensors of zeros (no random numbers drawn: the run's seeded streams are untouched) are
done here too. Once the run is built, ``rehearse`` follows with the first uses of the run's own
kernels (``sweeplab.training.rehearsal``) while its MLflow run opens. ``wait`` joins the thread;
it must have ended before training starts and before the process forks. (What a run needs at its
end, the figure libraries and MLflow's map of installed distributions, is prepared in the child
that writes its artifacts, ``sweeplab.tracking.artifacts``.)
"""

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

_thread: threading.Thread | None = None


def start(device: torch.device) -> None:
    """Start the thread for CUDA ``device``, once per process (never in a process that forks
    workers afterwards, which could not use a context made before)."""
    global _thread
    if _thread is None:
        _thread = threading.Thread(target=_prepare, args=(device,), name="first-uses", daemon=True)
        _thread.start()


def rehearse(work: Callable[[], None]) -> None:
    """Run ``work`` in a thread once the context's thread (if any) has ended."""
    global _thread
    before = _thread

    def after() -> None:
        if before is not None:
            before.join()
        work()

    _thread = threading.Thread(target=after, name="rehearsal", daemon=True)
    _thread.start()


def wait() -> None:
    if _thread is not None:
        _thread.join()


def _prepare(device: torch.device) -> None:
    torch.cuda.init()
    x = torch.zeros(64, 32, device=device)
    weight = torch.zeros(10, 32, device=device, requires_grad=True)
    labels = torch.zeros(64, dtype=torch.long, device=device)
    F.cross_entropy(F.linear(x, weight).relu(), labels).backward()
