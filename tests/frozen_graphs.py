"""CUDA graph semantics on CPU, for tests of what is captured and replayed.

A CUDA graph records the kernels a step launches, with the tensors they read and write, once;
a replay reruns those kernels and nothing else. Python does not run again: a float computed in
Python, a counter kept in Python, a tensor replaced by a new one, all stay as they were at
capture. ``FrozenGraphs`` gives the same contract on CPU: ``capture`` records every aten op the
step dispatches (with its argument and result tensors) and leaves the state as it was, a replay
reruns the recorded ops on the recorded tensors. A host sync inside a capture (``.item()``,
``bool(tensor)``) fails as it does on CUDA, and the current stream is a capturing CUDA stream,
which optimizers check (Adam refuses to step inside a capture unless made ``capturable``).
Steps that depend on Python state between replays then train differently from eager steps,
which is what the tests compare.
"""

from collections.abc import Callable
from contextlib import ExitStack
from types import SimpleNamespace
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

Op = tuple[object, tuple, dict, object]


class _Recording(TorchDispatchMode):
    """Each op's function, arguments and result; what a captured op mutates is restored after."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.made: set[int] = set()  # tensors the step itself made (the graph's own memory)
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("a host sync (.item(), float(), bool() of a tensor) inside a captured step")
        for tensor in _tensors((args, kwargs)):
            if id(tensor) not in self.made and not any(t is tensor for t, _ in self.before):
                self.before.append((tensor, tensor.detach().clone()))
        out = func(*args, **kwargs)
        self.made.update(id(t) for t in _tensors(out))
        if func.namespace != "profiler":
            self.ops.append((func, args, kwargs, out))
        return out


def _cuda_stream_capturing() -> ExitStack:
    """What code asking ``torch.accelerator`` sees inside a CUDA capture."""
    stream = SimpleNamespace(is_capturing=lambda: True)
    patches = ExitStack()
    patches.enter_context(
        mock.patch.object(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    )
    patches.enter_context(mock.patch.object(torch.accelerator, "current_stream", lambda *a, **k: stream))
    return patches


def _tensors(tree: object) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


class FrozenGraphs:
    """The ``sweeplab.training.steps.Recorder`` contract with CUDA graph semantics, on CPU."""

    def __init__(self) -> None:
        self.warmups = self.captures = self.replays = 0

    def warm_up(self, step: Callable[[], None]) -> None:
        self.warmups += 1
        step()

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        self.captures += 1
        recording = _Recording()
        rng = torch.get_rng_state()
        with _cuda_stream_capturing(), recording:
            step()
        with torch.no_grad():  # a capture launches nothing: what the step changed is put back
            for tensor, value in recording.before:
                tensor.copy_(value)
        torch.set_rng_state(rng)
        ops = recording.ops

        def replay() -> None:
            self.replays += 1
            with torch.no_grad():
                for func, args, kwargs, out in ops:
                    fresh = func(*args, **kwargs)
                    for old, new in zip(_tensors(out), _tensors(fresh), strict=True):
                        if old.data_ptr() != new.data_ptr():
                            old.copy_(new)

        return replay


class CannotCapture(FrozenGraphs):
    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        raise RuntimeError("operation not permitted when stream is capturing")
