"""LR schedules that know a step was skipped: a torch LR scheduler advanced by taken optimizer steps only.

Where the step's skip decision is already on the host (a non-fused optimizer's step reads found_inf),
the scheduler simply steps after each taken step. Where it stays on the device (fused Adam/AdamW/SGD),
the schedule runs on the device: the learning rates of the next steps are tabulated once by stepping a
copy of the scheduler on the host (any scheduler whose rate depends on its step count: LambdaLR
warmup + cosine or linear decay, the ``transformers`` schedules, StepLR, MultiStepLR, ExponentialLR,
OneCycleLR, ...), the optimizer's ``lr`` becomes a device tensor, and after each step it is set to the
table's entry at the scaler's device count of taken steps: no host sync. The scheduler object itself is
brought up to date (stepped once per taken step) at the reads the trainer makes anyway
(:meth:`SkipAwareSchedule.sync`). ``ReduceLROnPlateau`` (driven by a metric) is refused.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, List, Optional

import torch
from torch import Tensor

from .grad_scaler import GradScaler

__all__ = ["SkipAwareSchedule"]

_ROWS = 1024  # steps tabulated at a time


class SkipAwareSchedule:
    """Advance ``scheduler`` once per taken optimizer step of ``scaler``."""

    def __init__(self, scheduler: Any, scaler: GradScaler) -> None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError("fastamp: ReduceLROnPlateau is driven by a metric, not by steps; step it yourself")
        if not hasattr(scheduler, "step") or not hasattr(scheduler, "optimizer"):
            raise TypeError(f"fastamp: lr_scheduler must be a torch LR scheduler, got {type(scheduler).__name__}")
        self.scheduler, self.scaler = scheduler, scaler
        self.optimizer = scheduler.optimizer
        self.reset()

    def reset(self) -> None:
        """Start from the scheduler's and the scaler's current states (after loading a checkpoint)."""
        self.synced = int(self.scaler.taken_steps())  # taken steps the scheduler object has been stepped for
        self._taken_at_start = self.synced
        self._simulation: Any = None
        self._table: Optional[Tensor] = None
        self._rows: List[List[float]] = []

    def after_step(self, skipped: Optional[bool]) -> None:
        """Call after each optimizer step (and ``scaler.update()``): ``skipped`` as known on the host, or
        ``None`` when the decision is on the device only."""
        if skipped is not None and self._simulation is None:
            if not skipped:
                self.scheduler.step()
                self.synced += 1
            return
        self._on_device()

    def _on_device(self) -> None:
        if self._simulation is None:  # first device-decided step: tabulate, and make lr a device tensor
            self._taken_at_start = self.synced
            self._rows = []
            self._simulation = self._copy_without_tensors()
            device = next(p.device for g in self.optimizer.param_groups for p in g["params"])
            for group in self.optimizer.param_groups:
                if not isinstance(group["lr"], Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        while len(self._rows) <= self.scaler.num_steps - self._taken_at_start + 1:  # taken <= steps
            self._extend()
        taken = self.scaler.taken_steps() - self._taken_at_start
        rates = self._table.index_select(0, taken.clamp(min=0, max=self._table.shape[0] - 1).reshape(1))[0]
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"].copy_(rates[i])

    def _copy_without_tensors(self) -> Any:
        """A copy of the scheduler and its optimizer that shares no big tensor (parameters and optimizer
        state are stood in for by empty ones): stepping it only computes learning rates."""
        memo = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                memo[id(p)] = torch.empty(0)
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, Tensor):
                    memo[id(value)] = torch.empty(0)
        return copy.deepcopy(self.scheduler, memo)

    def _extend(self) -> None:
        sim = self._simulation
        with warnings.catch_warnings():  # the copy's optimizer never steps: torch's order warning is moot
            warnings.simplefilter("ignore")
            for _ in range(_ROWS):
                self._rows.append([float(g["lr"]) for g in sim.optimizer.param_groups])
                sim.step()
        device = next(p.device for g in self.optimizer.param_groups for p in g["params"])
        self._table = torch.tensor(self._rows, dtype=torch.float32).to(device)

    def sync(self) -> None:
        """Step the scheduler object up to the taken steps (one host read, where a read happens anyway)."""
        if self._simulation is None:
            return
        target = int(self.scaler.taken_steps())
        while self.synced < target:
            # Chainable schedulers (StepLR, ...) compute from the current lr: give them the rate of the
            # step they are at, which the device has moved past.
            for group, rate in zip(self.optimizer.param_groups, self._rows[self.synced - self._taken_at_start]):
                group["lr"].fill_(rate)
            self.scheduler.step()
            self.synced += 1
