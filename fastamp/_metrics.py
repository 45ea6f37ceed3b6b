"""Step metrics: timing, memory and the per-step history, shared by the trainer, the demo's stock loop
and the Lightning monitor. Everything stays on the device until read; reading is one host transfer per
kind of statistic."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["StepHistory", "StepTimer", "memory_mb", "read_scalars", "training_statistics"]


def _rss_mb() -> float:
    """Resident memory of this process in MB (host-side, no device work), on Linux, macOS and Windows."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, AttributeError, ValueError):
        pass
    try:
        import resource  # Unix only
    except ImportError:
        return 0.0
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: bytes on macOS, KB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def memory_mb(device: torch.device) -> float:
    """Memory in use, read on the host: CUDA's allocated bytes on a GPU, the process's RSS on CPU."""
    return torch.cuda.memory_allocated(device) / 1e6 if device.type == "cuda" else _rss_mb()


def read_scalars(tensors: List[Tensor]) -> List[float]:
    """0-dim device tensors as floats, in one read."""
    return torch.stack([t.float().reshape(()) for t in tensors]).tolist() if tensors else []


class StepTimer:
    """Elapsed time of a region: CUDA events on a GPU (read later, no sync), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start: Any) -> Any:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return (start, end)
        return time.perf_counter() - start

    def seconds(self, records: List[Any]) -> List[float]:
        if not self.cuda:
            return list(records)
        if records:
            records[-1][1].synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in records]


class StepHistory:
    """One record per optimizer step (loss, grad norm, scale, found_inf as device tensors; the timer's
    records; memory and tokens as numbers), read to the host by :meth:`read`. What a checkpoint
    restored (already on the host) comes first."""

    KEYS = ("loss_values", "gradient_norms", "scale_values", "skipped", "step_times", "optimizer_times",
            "memory_usage", "tokens")

    def __init__(self, timer: StepTimer, restored: Optional[Dict[str, List[Any]]] = None) -> None:
        self.timer = timer
        self.restored = {k: list(v) for k, v in (restored or {}).items()}
        self._losses: List[Tensor] = []
        self._grad_norms: List[Tensor] = []
        self._scales: List[Tensor] = []
        self._found_infs: List[Tensor] = []
        self._step_times: List[Any] = []
        self._optimizer_times: List[Any] = []
        self._memory: List[float] = []
        self._tokens: List[int] = []

    def record(self, *, loss: Tensor, grad_norm: Tensor, scale: Tensor, found_inf: Tensor, step_time: Any,
               optimizer_time: Any, memory: float, tokens: int) -> None:
        """One optimizer step; no host sync."""
        self._losses.append(loss)
        self._grad_norms.append(grad_norm)
        self._scales.append(scale)
        self._found_infs.append(found_inf.reshape(()))
        self._step_times.append(step_time)
        self._optimizer_times.append(optimizer_time)
        self._memory.append(memory)
        self._tokens.append(tokens)

    @property
    def last_loss(self) -> Optional[Tensor]:
        return self._losses[-1] if self._losses else None

    def read(self) -> Dict[str, List[Any]]:
        """Per-step lists on the host (one read per kind of statistic)."""
        fresh = {
            "loss_values": read_scalars(self._losses),
            "gradient_norms": read_scalars(self._grad_norms),
            "scale_values": read_scalars(self._scales),
            "skipped": [v != 0 for v in read_scalars(self._found_infs)],
            "step_times": self.timer.seconds(self._step_times),
            "optimizer_times": self.timer.seconds(self._optimizer_times),
            "memory_usage": list(self._memory),
            "tokens": list(self._tokens),
        }
        return {k: self.restored.get(k, []) + v for k, v in fresh.items()}


def training_statistics(h: Dict[str, List[Any]]) -> Dict[str, Any]:
    """Totals and averages of a per-step history (:meth:`StepHistory.read`); gradient norms of skipped
    steps become None."""
    total = len(h["loss_values"])
    overflow = [i for i, s in enumerate(h["skipped"]) if s]
    norms = [None if s else n for n, s in zip(h["gradient_norms"], h["skipped"])]
    finite_norms = [n for n in norms if n is not None and math.isfinite(n)]
    scale_updates: List[float] = []
    for s in h["scale_values"]:
        if not scale_updates or scale_updates[-1] != s:
            scale_updates.append(s)
    stats: Dict[str, Any] = {
        "total_steps": total,
        "successful_steps": total - len(overflow),
        "overflow_steps": len(overflow),
        "overflow_step_indices": overflow,
        "scale_updates": scale_updates,
        "scale_values": h["scale_values"],
        "gradient_norms": norms,
        "loss_values": h["loss_values"],
        "step_times": h["step_times"],
        "optimizer_times": h["optimizer_times"],
        "memory_usage": h["memory_usage"],
        "tokens": h["tokens"],
        "skipped": h["skipped"],
    }
    if total:
        stats.update(
            success_rate=(total - len(overflow)) / total,
            overflow_rate=len(overflow) / total,
            avg_step_time=sum(h["step_times"]) / total,
            avg_optimizer_time=sum(h["optimizer_times"]) / total,
            avg_loss=sum(h["loss_values"]) / total,
            avg_gradient_norm=sum(finite_norms) / len(finite_norms) if finite_norms else 0.0,
            max_memory_mb=max(h["memory_usage"]) if h["memory_usage"] else 0.0,
            tokens_per_second=sum(h["tokens"]) / sum(h["step_times"]) if sum(h["step_times"]) > 0 else 0.0,
        )
    return stats
