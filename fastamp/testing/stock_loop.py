"""The hand-written PyTorch AMP loop: the oracle the trainer is judged against, and the demo's stock run.

Written with torch alone (its own precision table, its own records): nothing here comes from the code
it judges (the trainer's history, statistics or precision helpers), so a comparison of the two cannot
agree merely because both call the same function.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["StockAMPLoop", "stock_amp_run"]

# Precision names (fastamp's and Lightning's) -> autocast dtype; None: no autocast.
_AUTOCAST = {"fp32": None, "32-true": None, "32": None, "fp16": torch.float16, "16-mixed": torch.float16,
             "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}


class StockAMPLoop:
    """One optimizer step per :meth:`step`: autocast forward, ``torch.amp.GradScaler`` scaled backward
    (enabled for fp16 only), ``unscale_``, ``torch.nn.utils.clip_grad_norm_``, ``step``, ``update``.

    ``loss_fn(model, batch) -> loss``; default: ``model(**batch)["loss"]``. Records stay on the device
    until :meth:`read`.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str,
                 max_grad_norm: float = 1.0, loss_fn: Optional[Callable[[torch.nn.Module, Any], Tensor]] = None) -> None:
        if precision not in _AUTOCAST:
            raise ValueError(f"StockAMPLoop: unknown precision {precision!r}; use one of {sorted(_AUTOCAST)}")
        self.model, self.optimizer = model, optimizer
        self.device = next(model.parameters()).device
        self.dtype = _AUTOCAST[precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        self.max_grad_norm = max_grad_norm
        self.loss_fn = loss_fn or (lambda m, batch: m(**batch)["loss"])
        self.records: List[Dict[str, Tensor]] = []

    def step(self, batch: Any, optimizer_phase: Optional[Callable[[], ContextManager[Any]]] = None) -> Dict[str, Tensor]:
        """One step; ``optimizer_phase()`` (a context manager, e.g. a timer) wraps unscale to update."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()
        with autocast:
            loss = self.loss_fn(self.model, batch)
        self.scaler.scale(loss).backward()
        with optimizer_phase() if optimizer_phase is not None else contextlib.nullcontext():
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.scaler.step(self.optimizer)
            # The scale this step ran at (torch's scaler reads it to the host in get_scale(); its tensor is here).
            scale = self.scaler._scale.clone() if self.scaler.is_enabled() else torch.ones((), device=self.device)
            self.scaler.update()
        # With a scaler, the step was skipped exactly when a gradient was non-finite, i.e. when the norm of
        # the unscaled grads is; without one (bf16, fp32) stock skips nothing.
        skipped = (~torch.isfinite(norm.detach())) if self.scaler.is_enabled() else torch.zeros((), dtype=torch.bool,
                                                                                               device=self.device)
        record = {"loss": loss.detach().float(), "grad_norm": norm.detach().float(), "scale": scale.float(),
                  "skipped": skipped}
        self.records.append(record)
        return record

    def read(self) -> Dict[str, Any]:
        """Per-step lists on the host: ``loss_values``, ``gradient_norms`` (None on skipped steps),
        ``scale_values``, ``overflow_step_indices``."""
        if not self.records:
            return {"loss_values": [], "gradient_norms": [], "scale_values": [], "overflow_step_indices": []}
        table = torch.stack([torch.stack([r["loss"], r["grad_norm"], r["scale"], r["skipped"].float()])
                             for r in self.records]).tolist()
        return {
            "loss_values": [row[0] for row in table],
            "gradient_norms": [None if row[3] else row[1] for row in table],
            "scale_values": [row[2] for row in table],
            "overflow_step_indices": [i for i, row in enumerate(table) if row[3]],
        }


def stock_amp_run(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: List[Any], precision: str,
                  max_grad_norm: float = 1.0, loss_fn: Optional[Callable[[torch.nn.Module, Any], Tensor]] = None
                  ) -> Dict[str, Any]:
    """:class:`StockAMPLoop` over ``batches``; returns :meth:`StockAMPLoop.read`."""
    loop = StockAMPLoop(model, optimizer, precision, max_grad_norm, loss_fn)
    for batch in batches:
        loop.step(batch)
    return loop.read()
