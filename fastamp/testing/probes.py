"""Probes that count what a step does: host reads (each one a sync on a GPU), fastamp op calls (each
multi-tensor op one pass over the gradients) and collectives."""

from __future__ import annotations

from typing import Any, List

from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Collectives", "FastampOpCalls", "HostReads"]


class HostReads(TorchFunctionMode):
    """Counts tensor reads to the host (what syncs on a GPU), except inside optimizers given to
    :meth:`exclude` (their own host reads are not the scaler's)."""

    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.paused and getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def exclude(self, optimizer: Any) -> None:
        """Stop counting inside ``optimizer.step``."""
        original = optimizer.step

        def step(*args, **kwargs):
            self.paused = True
            try:
                return original(*args, **kwargs)
            finally:
                self.paused = False

        optimizer.step = step


class FastampOpCalls(TorchDispatchMode):
    """Records the name of every fastamp op that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastamp":
            self.calls.append(func._opname)
        return func(*args, **(kwargs or {}))


class Collectives(TorchDispatchMode):
    """Counts torch.distributed collectives as they reach the dispatcher: ``dist.all_reduce`` and
    friends (``c10d::*``) and DTensor's functional ones (``_c10d_functional::*``, e.g. ``full_tensor``)."""

    NOT_COLLECTIVES = {"wait_tensor", "_wrap_tensor_autograd"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and func._opname not in self.NOT_COLLECTIVES:
            self.calls.append(f"{func.namespace}.{func._opname}")
        return func(*args, **(kwargs or {}))
