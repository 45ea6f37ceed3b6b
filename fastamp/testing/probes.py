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


class Collectives:
    """Counts the collectives the process-group backend runs (its ``gloo:*`` / ``nccl:*`` profiler
    events): ``dist.all_reduce`` and friends, and DTensor's own (redistributions, ``full_tensor``), which
    a dispatch mode does not see. ``calls`` lists them, in order, once the block has ended."""

    BACKENDS = ("gloo", "nccl")

    def __init__(self) -> None:
        self.calls: List[str] = []
        self._profile: Any = None

    @property
    def count(self) -> int:
        return len(self.calls)

    def __enter__(self) -> "Collectives":
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._profile.__exit__(*exc)
        events = sorted(self._profile.events(), key=lambda e: e.time_range.start)
        self.calls = [e.name for e in events if e.name.split(":")[0] in self.BACKENDS]
