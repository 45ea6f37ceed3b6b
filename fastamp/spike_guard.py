"""Skip loss and gradient-norm spikes on the device, as overflows are skipped.

A finite but huge gradient (a bad batch, a loss spike) is applied in full by the optimizer; a
:class:`SpikeGuard` given to a scaler (``fastamp.GradScaler(..., spike_guard=SpikeGuard())``, the
sharded scaler, the trainer, the Lightning plugin, ``apply_fastamp``) skips a step whose unscaled,
pre-clip global gradient norm (or loss) is more than ``threshold`` standard deviations above the mean of
the last ``window`` taken steps. The decision is a device tensor that joins ``found_inf``: fused
optimizers skip on the device with no host sync, the others skip as on an overflow, and parameters and
optimizer state stay bit-identical. A spike does not back off the loss scale. The norm is the one the
clip (or the unscale) computes anyway: the guard adds no pass over the gradients.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["SpikeGuard"]

_ON = ("grad_norm", "loss", "both")


class _History:
    """The last ``window`` values of taken steps, a ring buffer on the device."""

    def __init__(self, window: int, device: torch.device) -> None:
        self.values = torch.zeros(window, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # taken steps recorded, ever

    def is_spike(self, value: Tensor, threshold: float, warmup: int) -> Tensor:
        window = self.values.numel()
        n = self.count.clamp(max=window)
        valid = torch.arange(window, device=self.values.device) < n
        n_f = n.double().clamp(min=1.0)
        mean = (self.values * valid).sum() / n_f
        var = (((self.values - mean) * valid) ** 2).sum() / (n_f - 1).clamp(min=1.0)
        limit = mean + threshold * var.sqrt()
        ready = self.count >= max(int(warmup), 2)
        return (ready & (value.double().reshape(()) > limit)).float()

    def record(self, value: Tensor, taken: Tensor) -> None:
        window = self.values.numel()
        slot = (self.count % window).reshape(1)
        old = self.values.index_select(0, slot)
        self.values.index_copy_(0, slot, torch.where(taken.reshape(1), value.double().reshape(1), old))
        self.count += taken.to(torch.int64).reshape(())


class SpikeGuard:
    """Skip steps whose gradient norm or loss spikes, decided on the device.

    Args:
        threshold: a value more than this many standard deviations (unbiased) above the mean of the
            history is a spike.
        window: how many of the latest taken steps the mean and deviation cover.
        warmup: no decision before this many taken steps (at least 2).
        on: ``"grad_norm"`` (the unscaled global norm before clipping), ``"loss"`` (the sum of the losses
            given to ``scaler.scale`` in the iteration: their mean under gradient accumulation with
            ``loss / N``), or ``"both"`` (a spike in either).

    Only taken steps enter the history (a skipped step, overflow or spike, does not). The history and
    the count of spikes travel in the scaler's ``state_dict()``.
    """

    def __init__(self, threshold: float = 6.0, window: int = 128, warmup: int = 32, on: str = "grad_norm") -> None:
        if on not in _ON:
            raise ValueError(f"fastamp.SpikeGuard: on must be one of {_ON}, got {on!r}")
        if not threshold > 0 or int(window) < 2 or int(warmup) < 0:
            raise ValueError(f"fastamp.SpikeGuard: need threshold > 0, window >= 2, warmup >= 0; got {threshold!r}, "
                             f"{window!r}, {warmup!r}")
        self.threshold, self.window, self.warmup, self.on = float(threshold), int(window), int(warmup), on
        self._histories: Dict[str, _History] = {}
        self._pending_state: Optional[Dict[str, Any]] = None

    @property
    def watches_grad_norm(self) -> bool:
        return self.on in ("grad_norm", "both")

    @property
    def watches_loss(self) -> bool:
        return self.on in ("loss", "both")

    def _history(self, key: str, device: torch.device) -> _History:
        history = self._histories.get(key)
        if history is None:
            history = self._histories[key] = _History(self.window, device)
            if self._pending_state is not None and key in self._pending_state:
                saved = self._pending_state[key]
                history.values.copy_(torch.tensor(saved["values"], dtype=torch.float64))
                history.count.fill_(int(saved["count"]))
        return history

    def is_spike(self, grad_norm: Optional[Tensor], loss: Optional[Tensor]) -> Optional[Tensor]:
        """A 0/1 fp32 device tensor: whether this step's values spike; ``None`` when nothing watched was
        observed (no norm was computed, no loss was scaled)."""
        flags = []
        if self.watches_grad_norm and grad_norm is not None:
            flags.append(self._history("grad_norm", grad_norm.device).is_spike(grad_norm, self.threshold, self.warmup))
        if self.watches_loss and loss is not None:
            flags.append(self._history("loss", loss.device).is_spike(loss, self.threshold, self.warmup))
        if not flags:
            return None
        return flags[0] if len(flags) == 1 else torch.maximum(flags[0], flags[1].to(flags[0].device))

    def record(self, grad_norm: Optional[Tensor], loss: Optional[Tensor], taken: Tensor) -> None:
        """Add this step's values to the history if the step was taken (``taken``: a device bool)."""
        if self.watches_grad_norm and grad_norm is not None:
            history = self._history("grad_norm", grad_norm.device)
            history.record(grad_norm, taken.to(history.values.device))
        if self.watches_loss and loss is not None:
            history = self._history("loss", loss.device)
            history.record(loss, taken.to(history.values.device))

    def device_state(self) -> List[Tensor]:
        """The device tensors of the history (updated in place, at fixed addresses)."""
        return [t for history in self._histories.values() for t in (history.values, history.count)]

    def state_dict(self) -> Dict[str, Any]:
        """Settings and history (host values: a read of the device state)."""
        state: Dict[str, Any] = {"threshold": self.threshold, "window": self.window, "warmup": self.warmup,
                                 "on": self.on}
        for key, history in self._histories.items():
            state[key] = {"values": history.values.tolist(), "count": int(history.count)}
        if self._pending_state is not None:
            for key in ("grad_norm", "loss"):
                if key in self._pending_state and key not in state:
                    state[key] = self._pending_state[key]
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore settings and history (the history goes to the device on first use)."""
        self.threshold, self.window = float(state["threshold"]), int(state["window"])
        self.warmup, self.on = int(state["warmup"]), str(state["on"])
        self._histories = {}
        self._pending_state = {k: v for k, v in state.items() if k in ("grad_norm", "loss")}

    def __repr__(self) -> str:
        return f"SpikeGuard(threshold={self.threshold}, window={self.window}, warmup={self.warmup}, on={self.on!r})"
