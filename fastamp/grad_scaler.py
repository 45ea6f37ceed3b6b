"""fastamp.GradScaler: a drop-in for ``torch.amp.GradScaler`` on fastamp's fused, sync-free ops.

Everything ``torch.amp.GradScaler`` defines behaves the same (constructor, methods, errors,
``state_dict`` keys, pickling, the per-optimizer stages); for fp32 gradients the scale sequence, the
skipped steps and the parameters are bit-identical to PyTorch's. On top of that:

* fp16 and bf16 gradients are unscaled (PyTorch refuses fp16 grads);
* :meth:`GradScaler.clip_grad_norm_` replaces ``unscale_`` + ``torch.nn.utils.clip_grad_norm_``: one
  read pass gives found_inf and the norm of the unscaled grads, one write pass unscales and clips;
  with ``fused=True`` optimizers even that write is folded into the optimizer's own ``grad_scale``;
* hysteresis, ``min_scale`` and ``max_scale``, all applied on the device;
* ``found_inf``, :meth:`~GradScaler.last_step_skipped`, step counters and
  :meth:`~GradScaler.overflow_report` to see which steps were skipped and why.

Host syncs: none with fused optimizers (``torch.optim.Adam/AdamW/SGD(fused=True)``); otherwise one
per :meth:`~GradScaler.step` that has to decide whether to call ``optimizer.step()``, and that one
read covers every optimizer already unscaled in the iteration (PyTorch reads once per optimizer and
device). Unscale optimizers together (``clip_grad_norm_([opt_a, opt_b], ...)`` or ``unscale_`` on each)
and the whole iteration costs one sync.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.amp.grad_scaler import OptState

from . import ops
from ._fused_step import fused_step, has_fused_step
from ._gradients import (
    LocalGrads,
    PerDevice,
    clip_gradients,
    local_grads,
    named_norms,
    norm_and_check,
    reduce_across_ranks,
    unscale_check_grads_,
    unscale_check_norm_grads_,
)
from .spike_guard import SpikeGuard

__all__ = ["GradScaler"]

OptimizerOrList = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]]
NamedTensors = Union[torch.nn.Module, Mapping[str, Optional[Tensor]], Iterable[Tuple[str, Optional[Tensor]]]]


def _in_graph() -> bool:
    """Inside a torch.compile trace or a CUDA graph capture: host state set here is set once, not per run."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _fresh_optimizer_state() -> Dict[str, Any]:
    # torch's _refresh_per_optimizer_state, here because Dynamo skips torch/amp: called from a skipped
    # file as a defaultdict's factory, the entry it makes is lost from the traced dict (torch 2.14).
    return {"stage": OptState.READY, "found_inf_per_device": {}}


class GradScaler(torch.amp.GradScaler):
    """Dynamic loss scaling, as ``torch.amp.GradScaler``, on fused kernels with no host syncs.

    Replace ``torch.amp.GradScaler(...)`` with ``fastamp.GradScaler(...)`` and change nothing else.
    It subclasses PyTorch's scaler, so code that checks ``isinstance(scaler, torch.amp.GradScaler)``
    (Lightning, FSDP helpers) accepts it.

    Args:
        device: device type of the scale ("cuda" or "cpu"); with "cuda" and no CUDA the scaler
            disables itself with a warning, as PyTorch's does.
        init_scale, growth_factor, backoff_factor, growth_interval, enabled: as in PyTorch.
        hysteresis: number of consecutive overflowing steps tolerated before the scale backs off
            (Megatron/DeepSpeed's hysteresis). 1, the default, backs off on every overflow like PyTorch.
            A step with an overflow is skipped either way.
        min_scale: the scale never backs off below this (default 0: PyTorch's behaviour).
        max_scale: the scale never grows above this (default inf; growth to inf never happens).
        spike_guard: a :class:`fastamp.SpikeGuard`: also skip, on the device, steps whose unscaled global
            gradient norm (or loss) spikes; the scale does not back off for them. Off by default.
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        hysteresis: int = 1,
        min_scale: float = 0.0,
        max_scale: float = math.inf,
        spike_guard: Optional[SpikeGuard] = None,
    ) -> None:
        super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        self._per_optimizer_states = defaultdict(_fresh_optimizer_state)
        self._optimizers_in_graphs: Dict[int, torch.optim.Optimizer] = {}
        if isinstance(hysteresis, bool) or not isinstance(hysteresis, int) or hysteresis < 1:
            raise ValueError(f"fastamp.GradScaler: hysteresis must be an int >= 1, got {hysteresis!r}")
        if not (0.0 <= min_scale <= max_scale) or math.isnan(max_scale):
            raise ValueError(
                f"fastamp.GradScaler: need 0 <= min_scale <= max_scale, got min_scale={min_scale!r}, "
                f"max_scale={max_scale!r}"
            )
        self._hysteresis = hysteresis
        self._min_scale = float(min_scale)
        self._max_scale = float(max_scale)
        self._init_hysteresis_tracker = hysteresis
        self._hysteresis_tracker: Optional[Tensor] = None
        # Counters: iterations ended by update() (host int, no sync) and how many of them found inf/nan
        # (a device tensor, read only when asked). An update() inside a compiled function or a captured CUDA
        # graph counts on the device only (a graph cannot move a host int): then the device count is the truth.
        self._num_steps = 0
        self._steps_counted_on_device_only = False
        self._init_skipped_steps = 0
        self._skipped_steps: Optional[Tensor] = None
        self._last_found_inf: Optional[Tensor] = None
        self._last_skipped_on_host: Optional[bool] = None
        # The spike guard, its device counters, and what this iteration observed (reset by update()).
        if spike_guard is not None and not isinstance(spike_guard, SpikeGuard):
            raise TypeError(f"fastamp.GradScaler: spike_guard must be a fastamp.SpikeGuard, got {type(spike_guard).__name__}")
        self.spike_guard = spike_guard
        self._init_counts = {"steps": 0, "overflows": 0, "spikes": 0, "taken": 0}
        self._counts: Dict[str, Tensor] = {}
        self._reset_iteration()

    def _reset_iteration(self) -> None:
        self._observed_sq: Optional[Tensor] = None  # squared unscaled global norm (sum over optimizers)
        self._local_loss: Optional[Tensor] = None  # sum of the losses given to scale()
        self._global_loss: Optional[Tensor] = None  # the same, averaged over the ranks when reduced
        self._spike: Optional[Tensor] = None
        self._param_norms: Optional[List[Tuple[List[Tensor], Tensor]]] = None

    # ---- lazily created device state ---------------------------------------------------------------

    @classmethod
    def nonfinite_guard(cls, device: str = "cuda", *, enabled: bool = True,
                        spike_guard: Optional[SpikeGuard] = None) -> "GradScaler":
        """The non-finite guard for bf16 and fp32 training: a scaler pinned at scale 1 (nothing is scaled,
        the scale never moves), so that a step whose gradients hold inf/nan is skipped on the device, from
        the norm pass the clip makes anyway, with parameters and optimizer state left bit-identical. The
        one definition the trainer, the Lightning plugin and ``apply_fastamp`` use."""
        return cls(device, init_scale=1.0, growth_interval=2**30, enabled=enabled, min_scale=1.0, max_scale=1.0,
                   spike_guard=spike_guard)

    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        super()._lazy_init_scale_growth_tracker(dev)
        self._hysteresis_tracker = torch.full((), self._init_hysteresis_tracker, dtype=torch.int32, device=dev)
        self._skipped_steps = torch.full((), self._init_skipped_steps, dtype=torch.int64, device=dev)
        self._counts = {k: torch.full((), v, dtype=torch.int64, device=dev) for k, v in self._init_counts.items()}

    # ---- the spike guard ---------------------------------------------------------------------------

    def scale(self, outputs: Any) -> Any:
        """As ``torch.amp.GradScaler.scale``; a spike guard watching the loss also notes it here."""
        if self._enabled and self.spike_guard is not None and self.spike_guard.watches_loss and isinstance(outputs, Tensor):
            loss = outputs.detach().float().sum()
            self._local_loss = loss if self._local_loss is None else self._local_loss + loss
        scaled = super().scale(outputs)
        if self._optimizers_in_graphs and not torch.compiler.is_compiling():  # nothing to do in eager training
            self._mark_static_for_graphs()
        return scaled

    def _mark_static_for_graphs(self) -> None:
        # What a compiled step mutates lives at fixed addresses, updated in place: the scaler's device state,
        # and of the optimizers it stepped in a graph, the gradients (the fused kernels write them unscaled;
        # kept with zero_grad(set_to_none=False)) and tensor learning rates. Told so, CUDA graphs
        # (mode="reduce-overhead") update them in place instead of refusing mutated inputs.
        state = [self._scale, self._growth_tracker, self._hysteresis_tracker, self._skipped_steps, *self._counts.values()]
        if self.spike_guard is not None:
            state += self.spike_guard.device_state()
        for optimizer in self._optimizers_in_graphs.values():
            for group in optimizer.param_groups:
                state += [group["lr"]] + [p.grad for p in group["params"]]
        for tensor in state:
            if isinstance(tensor, Tensor):
                torch._dynamo.mark_static_address(tensor)

    def _observe(self, total_norm: Optional[Tensor], reduced_loss: Optional[Tensor] = None,
                 group_size: int = 1) -> None:
        """What the spike guard watches, from a pass made anyway (the clip's norm, the unscale's)."""
        if self.spike_guard is None:
            return
        if total_norm is not None:
            sq = total_norm.double().reshape(()).square()
            self._observed_sq = sq if self._observed_sq is None else self._observed_sq + sq.to(self._observed_sq.device)
        if reduced_loss is not None:
            self._global_loss = reduced_loss.reshape(()) / group_size

    def _loss_to_reduce(self, grads: LocalGrads) -> Optional[Tensor]:
        """The loss rides along in the collective the gradients need anyway."""
        if self.spike_guard is None or not self.spike_guard.watches_loss or not grads.crosses_ranks:
            return None
        assert self._scale is not None
        return self._local_loss if self._local_loss is not None else torch.zeros((), device=self._scale.device)

    def _spike_flag(self) -> Optional[Tensor]:
        """This iteration's spike decision (0/1 on the device), made once, when first needed."""
        if self.spike_guard is None:
            return None
        if self._spike is None:
            norm = self._observed_sq.sqrt() if self._observed_sq is not None else None
            loss = self._global_loss if self._global_loss is not None else self._local_loss
            self._spike = self.spike_guard.is_spike(norm, loss)
        return self._spike

    def _skip_flag(self, found_inf: Optional[Tensor]) -> Optional[Tensor]:
        """Whether to skip: an overflow or a spike."""
        spike = self._spike_flag()
        if spike is None or found_inf is None:
            return found_inf
        return torch.maximum(found_inf.reshape(()), spike.to(found_inf.device).reshape(())).reshape(found_inf.shape)

    # torch's own versions of these live under torch/amp, which torch.compile does not trace: the same
    # few lines here keep the optimizer-side step traceable whole.
    def _check_scale_growth_tracker(self, funcname: str) -> Tuple[Tensor, Tensor]:
        fix = "This may indicate your script did not use scaler.scale(loss or outputs) earlier in the iteration."
        if self._scale is None:
            raise AssertionError(f"Attempted {funcname} but _scale is None.  " + fix)
        if self._growth_tracker is None:
            raise AssertionError(f"Attempted {funcname} but _growth_tracker is None.  " + fix)
        return (self._scale, self._growth_tracker)

    def _get_scale_async(self) -> Optional[Tensor]:
        return self._scale

    def _inv_scale(self) -> Tensor:
        # The reciprocal in fp64, as PyTorch takes it, so that unscaled fp32 grads match it bit for bit.
        assert self._scale is not None
        return self._scale.double().reciprocal().float()

    def _new_found_inf(self) -> Tensor:
        assert self._scale is not None
        return torch.zeros((), dtype=torch.float32, device=self._scale.device)

    # ---- gradients --------------------------------------------------------------------------------

    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: Tensor, found_inf: Tensor, allow_fp16: bool
    ) -> Dict[torch.device, Tensor]:
        # Same contract as PyTorch's (per-device found_inf flags), on fastamp's kernel; fp16 is always
        # allowed. Gradients held across ranks get one global flag (one all-reduce).
        grads = self.local_grads(optimizer)
        per_device_inv_scale = PerDevice(inv_scale)
        per_device_found_inf = PerDevice(found_inf)
        flags: Dict[torch.device, Tensor] = {}
        watch_norm = self.spike_guard is not None and self.spike_guard.watches_grad_norm
        norms: List[Tensor] = []
        with torch.no_grad():
            for device in grads.by_device:
                flags[device] = per_device_found_inf.get(device)
                device_inv_scale = per_device_inv_scale.get(device)
                if watch_norm:  # the norm from the same pass: counted grads, then the replicas
                    if grads.counted.get(device):
                        norms.append(unscale_check_norm_grads_(grads.counted[device], flags[device], device_inv_scale))
                    if grads.duplicates.get(device):
                        unscale_check_grads_(grads.duplicates[device], flags[device], device_inv_scale)
                else:
                    unscale_check_grads_(grads.by_device[device], flags[device], device_inv_scale)
        return self._global_found_inf(grads, flags, norms if watch_norm else None)

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> Dict[torch.device, Tensor]:
        # Read-only check for optimizers that unscale inside their own step (fused ones).
        self._check_scale_growth_tracker("_check_inf_per_device")
        grads = self.local_grads(optimizer)
        per_device_found_inf = PerDevice(self._new_found_inf())
        flags: Dict[torch.device, Tensor] = {}
        watch_norm = self.spike_guard is not None and self.spike_guard.watches_grad_norm
        norms: List[Tensor] = []
        inv_scale = self._inv_scale()
        with torch.no_grad():
            for device in grads.by_device:
                flags[device] = per_device_found_inf.get(device)
                if grads.counted.get(device):
                    norm = norm_and_check(grads.counted[device], inv_scale.to(device) if watch_norm else None, flags[device])
                    norms.append(norm)
                if grads.duplicates.get(device):
                    norm_and_check(grads.duplicates[device], None, flags[device])
        flags = self._global_found_inf(grads, flags, norms if watch_norm else None)
        self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = flags
        return flags

    def _global_found_inf(self, grads: LocalGrads, flags: Dict[torch.device, Tensor],
                          norms: Optional[List[Tensor]] = None) -> Dict[torch.device, Tensor]:
        """The per-device flags as they are in one process; for gradients held across ranks, one flag
        all-reduced over their group (one collective), so that every rank skips when any overflowed. A
        rank without gradients still takes part, with a zero flag. ``norms`` (a spike guard's): the
        counted norms of this pass, made global in the same collective and handed to the guard."""
        assert self._scale is not None
        home = self._scale.device
        if norms is not None and norms:
            local_norm = torch.stack([n.to(home).double().square() for n in norms]).sum().sqrt()
        else:
            local_norm = torch.zeros((), dtype=torch.float64, device=home)
        if not grads.crosses_ranks:
            if norms is not None:
                self._observe(local_norm)
            return flags
        if flags:
            local = torch.stack([f.to(home, non_blocking=True).reshape(()) for f in flags.values()]).amax()
        else:
            local = torch.zeros((), dtype=torch.float32, device=home)
        extra = self._loss_to_reduce(grads)
        reduced = reduce_across_ranks(local_norm, local, grads.group, extra)
        found = reduced[1]
        if norms is not None or extra is not None:
            group_size = dist.get_world_size(grads.group) if extra is not None else 1
            self._observe(reduced[0] if norms is not None else None, reduced[2] if extra is not None else None, group_size)
        if not flags:
            return {home: found}
        return {d: (found if d == home else found.to(d, non_blocking=True)) for d in flags}

    def _combined_found_inf(self, states: Iterable[Dict[str, Any]]) -> Optional[Tensor]:
        """0/1 flag on the scale's device: whether any of these optimizers' grads held inf/nan."""
        assert self._scale is not None
        flags = [
            flag.to(device=self._scale.device, non_blocking=True)
            for state in states
            for flag in state["found_inf_per_device"].values()
        ]
        if not flags:
            return None
        if len(flags) == 1:
            return flags[0]
        return torch.stack(flags).amax()

    # ---- the PyTorch API -------------------------------------------------------------------------

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale the optimizer's gradients in place and record whether any held inf/nan.

        As ``torch.amp.GradScaler.unscale_`` (same errors when called twice or after ``step``), in one
        fused pass per device for all dtypes, fp16 and bf16 included. No host sync.
        """
        if not self._enabled:
            return
        self._check_scale_growth_tracker("unscale_")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        optimizer_state["found_inf_per_device"] = self._unscale_grads_(
            optimizer, self._inv_scale(), self._new_found_inf(), True
        )
        optimizer_state["stage"] = OptState.UNSCALED

    def _read_found_inf(self, optimizer: torch.optim.Optimizer) -> bool:
        """Host value of the optimizer's found_inf; one device read serves every optimizer already checked."""
        state = self._per_optimizer_states[id(optimizer)]
        if "found_inf_host" not in state:
            pending = [s for s in self._per_optimizer_states.values()
                       if s["found_inf_per_device"] and "found_inf_host" not in s]
            flags = [self._skip_flag(self._combined_found_inf([s])) for s in pending]
            for s, value in zip(pending, torch.stack(flags).tolist()):
                s["found_inf_host"] = bool(value)
        return state["found_inf_host"]

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (unless done already) and call ``optimizer.step(*args, **kwargs)`` unless inf/nan was found.

        Returns what ``optimizer.step`` returns (``None`` when skipped). Optimizers that handle AMP
        scaling themselves (``fused=True``) receive ``grad_scale`` and ``found_inf`` and skip on the
        device: no host sync. A folded clip from :meth:`clip_grad_norm_` travels in ``grad_scale``.
        """
        if not self._enabled:
            if self._steps_traceably(optimizer, args, kwargs):
                return fused_step(optimizer, None, None)
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")

        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return self._step_scaling_optimizer(optimizer, optimizer_state, args, kwargs)

        if optimizer_state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        if len(optimizer_state["found_inf_per_device"]) == 0:
            raise AssertionError("No inf checks were recorded for this optimizer.")
        retval = None
        if not self._read_found_inf(optimizer):
            retval = optimizer.step(*args, **kwargs)
        optimizer_state["stage"] = OptState.STEPPED
        return retval

    def _step_scaling_optimizer(
        self, optimizer: torch.optim.Optimizer, optimizer_state: Dict[str, Any], args: Tuple, kwargs: Dict
    ) -> Any:
        # PyTorch's contract with optimizers that unscale and skip on their own (fused Adam/AdamW/SGD):
        # they read `grad_scale` (grads are divided by it) and `found_inf` (skip when 1).
        if self._steps_traceably(optimizer, args, kwargs):
            if id(optimizer) not in self._optimizers_in_graphs:
                self._optimizers_in_graphs[id(optimizer)] = optimizer
            grad_scale, found_inf = self._device_skip_inputs(optimizer, optimizer_state)
            fused_step(optimizer, grad_scale, found_inf)
            optimizer_state["stage"] = OptState.STEPPED
            return None
        kwargs_ = kwargs
        has_grad_scaler_kwarg = "grad_scaler" in inspect.signature(optimizer.step).parameters
        if has_grad_scaler_kwarg:
            warnings.warn(
                "GradScaler is going to stop passing itself as a keyword argument to the passed "
                "optimizer. In the near future GradScaler registers `grad_scale: Tensor` and "
                "`found_inf: Tensor` to the passed optimizer and let the optimizer use them directly.",
                FutureWarning,
                stacklevel=3,
            )
            kwargs_.update({"grad_scaler": self})
        else:
            optimizer.grad_scale, optimizer.found_inf = self._device_skip_inputs(optimizer, optimizer_state)
        fresh_momentum = [] if has_grad_scaler_kwarg else self._params_without_momentum_buffer(optimizer)
        retval = optimizer.step(*args, **kwargs_)
        if fresh_momentum:
            # PyTorch's fused SGD creates its momentum buffers with empty_like before a step it then
            # skips on found_inf, and later steps read that uninitialized memory. Zeroed, the next
            # step starts the momentum from its own gradient, as a first step does.
            skipped = optimizer.found_inf != 0
            for param in fresh_momentum:
                buffer = optimizer.state.get(param, {}).get("momentum_buffer")
                if buffer is not None:
                    buffer.masked_fill_(skipped.to(buffer.device, non_blocking=True), 0.0)
        optimizer_state["stage"] = OptState.STEPPED
        if not has_grad_scaler_kwarg:
            del optimizer.grad_scale
            del optimizer.found_inf
        return retval

    @staticmethod
    def _steps_traceably(optimizer: torch.optim.Optimizer, args: Tuple, kwargs: Dict) -> bool:
        # torch.optim's step breaks the graph; inside torch.compile the same fused kernels, called traceably
        # (fastamp._fused_step), do not.
        return torch.compiler.is_compiling() and has_fused_step(optimizer) and not args and not kwargs

    def _device_skip_inputs(self, optimizer: torch.optim.Optimizer,
                            optimizer_state: Dict[str, Any]) -> Tuple[Optional[Tensor], Tensor]:
        """``grad_scale`` and ``found_inf`` for an optimizer that unscales and skips on the device."""
        if optimizer_state["stage"] is OptState.READY:
            self._check_inf_per_device(optimizer)
        scale = self._get_scale_async()
        assert scale is not None
        found_inf = self._combined_found_inf([optimizer_state])
        if found_inf is None:
            found_inf = self._new_found_inf()
        found_inf = self._skip_flag(found_inf)  # a spike skips as an overflow does
        if optimizer_state["stage"] is OptState.UNSCALED:
            folded = optimizer_state.get("grad_scale")
            return (folded if folded is not None else getattr(optimizer, "grad_scale", None)), found_inf
        return scale * getattr(optimizer, "grad_scale", 1), found_inf

    @staticmethod
    def _params_without_momentum_buffer(optimizer: torch.optim.Optimizer) -> List[Tensor]:
        if not isinstance(optimizer, torch.optim.SGD):
            return []
        return [
            p
            for group in optimizer.param_groups
            if group.get("momentum", 0) != 0
            for p in group["params"]
            if p.grad is not None and optimizer.state.get(p, {}).get("momentum_buffer") is None
        ]

    def update(self, new_scale: Optional[Union[float, Tensor]] = None) -> None:
        """Update the scale on the device (back off on inf/nan, with hysteresis and ``min_scale``; grow
        after ``growth_interval`` clean steps, up to ``max_scale``), or set it to ``new_scale``.

        As ``torch.amp.GradScaler.update``; also advances the step counters. No host sync.
        """
        if not self._enabled:
            return
        scale, growth_tracker = self._check_scale_growth_tracker("update")
        found_inf = self._combined_found_inf(self._per_optimizer_states.values())
        skipped = self._skip_flag(found_inf)
        states = [st for st in self._per_optimizer_states.values() if st["found_inf_per_device"]]
        if new_scale is not None:
            # PyTorch's own branch (its checks, its errors): a user-set scale is torch's business.
            torch.amp.GradScaler.update(self, new_scale)
        else:
            if found_inf is None:
                raise AssertionError("No inf checks were recorded prior to update.")
            ops.update_scale_(
                scale,
                growth_tracker,
                found_inf,
                self._growth_factor,
                self._backoff_factor,
                self._growth_interval,
                self._hysteresis,
                self._hysteresis_tracker,
                self._min_scale,
                self._max_scale,
            )
        self._last_skipped_on_host = (
            any(st["found_inf_host"] for st in states) if states and all("found_inf_host" in st for st in states) else None
        )
        if found_inf is not None:
            assert self._skipped_steps is not None and skipped is not None
            overflow = (found_inf.reshape(()) != 0).to(torch.int64)
            skipped_now = (skipped.reshape(()) != 0).to(torch.int64)
            if _in_graph():
                self._steps_counted_on_device_only = True
            else:
                self._num_steps += 1
            self._counts["steps"] += 1
            self._skipped_steps += skipped_now
            self._counts["overflows"] += overflow
            self._counts["spikes"] += skipped_now - overflow.to(skipped_now.device)
            self._counts["taken"] += 1 - skipped_now
            self._last_found_inf = skipped
            if self.spike_guard is not None:
                norm = self._observed_sq.sqrt() if self._observed_sq is not None else None
                loss = self._global_loss if self._global_loss is not None else self._local_loss
                self.spike_guard.record(norm, loss, skipped_now == 0)
        self._per_optimizer_states = defaultdict(_fresh_optimizer_state)
        param_norms = self._param_norms
        self._reset_iteration()
        self._param_norms = param_norms  # per-parameter norms stay readable until the next clip

    def state_dict(self) -> Dict[str, Any]:
        """PyTorch's five entries (``scale``, ``growth_factor``, ``backoff_factor``, ``growth_interval``,
        ``_growth_tracker``) plus fastamp's: ``hysteresis``, ``_hysteresis_tracker``, ``min_scale``,
        ``max_scale``, ``_num_steps``, ``_skipped_steps``. PyTorch's scaler loads it (it reads only its
        own keys). Empty when disabled. Reads the device state: call it after :meth:`update`."""
        if not self._enabled:
            return {}
        state = super().state_dict()
        state.update(
            {
                "hysteresis": self._hysteresis,
                "_hysteresis_tracker": self._get_hysteresis_tracker(),
                "min_scale": self._min_scale,
                "max_scale": self._max_scale,
            }
        )
        steps, skipped, overflows, spikes = self._read_counters()  # one read of the device counters
        state["_num_steps"] = steps
        state.update({"_skipped_steps": skipped, "_overflow_steps": overflows, "_spike_steps": spikes})
        if self.spike_guard is not None:
            state["spike_guard"] = self.spike_guard.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.amp.GradScaler`` (fastamp's own settings keep
        their current values when absent, and the hysteresis tracker starts full)."""
        if not self._enabled:
            return
        super().load_state_dict(state_dict)
        self._hysteresis = int(state_dict.get("hysteresis", self._hysteresis))
        self._min_scale = float(state_dict.get("min_scale", self._min_scale))
        self._max_scale = float(state_dict.get("max_scale", self._max_scale))
        self._init_hysteresis_tracker = int(state_dict.get("_hysteresis_tracker", self._hysteresis))
        self._num_steps = int(state_dict.get("_num_steps", 0))
        self._init_skipped_steps = int(state_dict.get("_skipped_steps", 0))
        if self._hysteresis_tracker is not None:
            self._hysteresis_tracker.fill_(self._init_hysteresis_tracker)
        if self._skipped_steps is not None:
            self._skipped_steps.fill_(self._init_skipped_steps)
        self._steps_counted_on_device_only = False
        self._init_counts = {"steps": self._num_steps, "overflows": int(state_dict.get("_overflow_steps", 0)),
                             "spikes": int(state_dict.get("_spike_steps", 0)),
                             "taken": self._num_steps - self._init_skipped_steps}
        for key, counter in self._counts.items():
            counter.fill_(self._init_counts[key])
        if "spike_guard" in state_dict:
            if self.spike_guard is None:
                self.spike_guard = SpikeGuard()
            self.spike_guard.load_state_dict(state_dict["spike_guard"])

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        if self._enabled:
            state["_init_hysteresis_tracker"] = self._get_hysteresis_tracker()
            steps, skipped, overflows, spikes = self._read_counters()
            state["_num_steps"] = steps
            state["_steps_counted_on_device_only"] = False
            state["_optimizers_in_graphs"] = {}
            state["_init_skipped_steps"] = skipped
            state["_hysteresis_tracker"] = None
            state["_skipped_steps"] = None
            state["_last_found_inf"] = None
            state["_init_counts"] = {"steps": steps, "overflows": overflows, "spikes": spikes, "taken": steps - skipped}
            state["_counts"] = {}
            for key in ("_observed_sq", "_local_loss", "_global_loss", "_spike", "_param_norms"):
                state[key] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # A scaler pickled before these existed: no step counted on the device alone, none stepped in a graph.
        self.__dict__.setdefault("_steps_counted_on_device_only", False)
        self.__dict__.setdefault("_optimizers_in_graphs", {})
        if "_init_counts" in self.__dict__:
            self._init_counts.setdefault("steps", self._num_steps)

    def _get_hysteresis_tracker(self) -> int:
        if self._hysteresis_tracker is None:
            return self._init_hysteresis_tracker
        return int(self._hysteresis_tracker.item())

    # ---- beyond PyTorch --------------------------------------------------------------------------

    def get_hysteresis(self) -> int:
        """Consecutive overflows tolerated before the scale backs off."""
        return self._hysteresis

    def get_min_scale(self) -> float:
        """The scale never backs off below this."""
        return self._min_scale

    def get_max_scale(self) -> float:
        """The scale never grows above this."""
        return self._max_scale

    def clip_grad_norm_(
        self,
        optimizer: OptimizerOrList,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        *,
        per_param_norms: bool = False,
    ) -> Tensor:
        """Unscale and clip the optimizer's gradients: ``unscale_`` + ``torch.nn.utils.clip_grad_norm_``
        fused.

        One read pass per device computes found_inf and the L2 norm of the unscaled grads; one write
        pass multiplies by ``inv_scale * clip_coef`` (skipped on an overflow, so the grads of a skipped
        step are left scaled). With a ``fused=True`` optimizer the write pass is folded into the
        optimizer's step through its ``grad_scale``: the grads are not rewritten here, and stay scaled
        until ``step``. Pass several optimizers to clip their gradients together (one norm, one
        found_inf: an overflow in any skips them all).

        Counts as this iteration's ``unscale_`` for each optimizer. Works when the scaler is disabled
        too (plain fused clipping). A ``norm_type`` other than 2 falls back to ``unscale_`` and
        PyTorch's clip. ``error_if_nonfinite=True`` costs a host sync, as in PyTorch.
        ``per_param_norms=True`` keeps each parameter's unscaled pre-clip norm on the device, from the same
        pass (:meth:`grad_norms` reads them). A spike guard decides on the norm computed here.

        Returns:
            The total norm of the unscaled gradients (before clipping), a 0-dim fp32 tensor on the
            scale's device (the gradients' device when disabled).
        """
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
        if not optimizers:
            raise ValueError("fastamp.GradScaler.clip_grad_norm_: no optimizer given")
        if self._enabled:
            self._check_scale_growth_tracker("clip_grad_norm_")
            for opt in optimizers:
                stage = self._per_optimizer_states[id(opt)]["stage"]
                if stage is OptState.UNSCALED:
                    raise RuntimeError(
                        "clip_grad_norm_() unscales the gradients, but unscale_() or clip_grad_norm_() has "
                        "already been called on this optimizer since the last update()."
                    )
                if stage is OptState.STEPPED:
                    raise RuntimeError("clip_grad_norm_() is being called after step().")
        if float(norm_type) != 2.0:
            for opt in optimizers:
                self.unscale_(opt)
            params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)

        # One walk over each optimizer's parameters; clipped together, they share one norm and one collective.
        per_optimizer = [self.local_grads(opt) for opt in optimizers]
        grads = LocalGrads.merge(per_optimizer)
        inv_scale = self._inv_scale() if self._enabled else None
        home = self._scale.device if self._enabled and self._scale is not None else None
        extra = self._loss_to_reduce(grads) if self._enabled else None
        result = clip_gradients(grads, max_norm, inv_scale=inv_scale, home=home, error_if_nonfinite=error_if_nonfinite,
                                per_param_norms=per_param_norms, extra=extra)
        if self._enabled:
            group_size = dist.get_world_size(grads.group) if extra is not None else 1
            self._observe(result.total_norm, result.extra if extra is not None else None, group_size)
        if per_param_norms:
            self._param_norms = result.per_param
        with torch.no_grad():
            for opt, opt_devices in zip(optimizers, per_optimizer):
                if self._enabled and getattr(opt, "_step_supports_amp_scaling", False):
                    # The fused optimizer divides its grads by grad_scale inside its own step.
                    state = self._per_optimizer_states[id(opt)]
                    state["grad_scale"] = self._scale if result.coef is None else self._scale / result.coef
                else:
                    result.apply_(opt_devices)
                if self._enabled:
                    state = self._per_optimizer_states[id(opt)]
                    flags = {d: result.found_inf_per_device[d] for d in opt_devices.by_device}
                    if not flags and grads.crosses_ranks:  # ranks without grads still take the decision
                        flags = {result.found_inf.device: result.found_inf}
                    state["found_inf_per_device"] = flags
                    state["stage"] = OptState.UNSCALED
        return result.total_norm

    def local_grads(self, optimizer: torch.optim.Optimizer) -> LocalGrads:
        """The optimizer's gradients as this rank holds them, sorted for the global norm (see
        :func:`fastamp._gradients.local_grads`). Here: DTensor gradients (FSDP2, HSDP, TP, on any mesh)
        are reduced over the world, each element counted once; plain ones are taken as they are (one
        process, DDP). :class:`fastamp.distributed.ShardedGradScaler` says more."""
        return local_grads(optimizer)

    def get_scale_tensor(self) -> Optional[Tensor]:
        """The live scale on the device (no host sync, unlike :meth:`get_scale`); ``None`` when disabled
        or before the first :meth:`scale`."""
        return self._scale if self._enabled else None

    def optimizer_stage(self, optimizer: torch.optim.Optimizer) -> OptState:
        """Where ``optimizer`` is in this iteration: ``READY``, ``UNSCALED`` (unscaled or clipped) or
        ``STEPPED``."""
        return self._per_optimizer_states[id(optimizer)]["stage"]

    @property
    def found_inf(self) -> Optional[Tensor]:
        """Device tensor, nonzero if inf/nan was found: in the iteration under way once any optimizer has
        been checked, else in the last one ended by :meth:`update`. ``None`` before any check."""
        if not self._enabled:
            return None
        current = self._combined_found_inf(self._per_optimizer_states.values()) if self._scale is not None else None
        return self._skip_flag(current) if current is not None else self._last_found_inf

    def last_step_skipped_if_known(self) -> Optional[bool]:
        """Whether the step ended by the last :meth:`update` was skipped, if that is already known on the
        host (a non-fused optimizer's step had to read it); ``None`` otherwise. Never syncs."""
        return self._last_skipped_on_host

    def last_step_skipped(self) -> bool:
        """Whether the latest step was skipped for inf/nan gradients (reads :attr:`found_inf`: a host sync)."""
        flag = self.found_inf
        return bool(flag.item()) if flag is not None else False

    @property
    def num_steps(self) -> int:
        """Iterations ended by :meth:`update` that checked gradients: a host counter, no sync, unless an
        update ran inside a ``torch.compile``'d function (a graph cannot move a host counter): from then on
        this reads the device counter (one sync). The same after an update captured in a CUDA graph."""
        if self._steps_counted_on_device_only:
            return self._read_counters()[0]
        return self._num_steps

    @property
    def skipped_steps(self) -> Optional[Tensor]:
        """Device int64 counter of iterations whose gradients held inf/nan (no sync); ``None`` before the
        first :meth:`scale`."""
        return self._skipped_steps

    def step_counts(self) -> Dict[str, int]:
        """``{"steps", "taken", "skipped", "overflows", "spikes"}`` over the scaler's life: ``skipped`` counts
        every skipped step, ``overflows`` those with inf/nan gradients, ``spikes`` those only the spike
        guard skipped (reads the device counters: one host sync)."""
        if not self._enabled:
            return {"steps": self._num_steps, "taken": self._num_steps, "skipped": 0, "overflows": 0, "spikes": 0}
        steps, skipped, overflows, spikes = self._read_counters()
        return {"steps": steps, "taken": steps - skipped, "skipped": skipped, "overflows": overflows, "spikes": spikes}

    def taken_steps(self) -> Tensor:
        """Device int64 counter of the optimizer steps taken (not skipped), for hand-written loops that
        drive a schedule on the device; no host sync. Before the first :meth:`scale` (or when
        disabled, where nothing is skipped) a CPU tensor of the step count."""
        counter = self._counts.get("taken") if self._enabled else None
        return counter if counter is not None else torch.tensor(self._num_steps - self._init_skipped_steps)

    def _read_counters(self) -> Tuple[int, int, int, int]:
        """steps, skipped, overflows, spikes: one read of the device counters."""
        if self._skipped_steps is None:
            return self._num_steps, self._init_skipped_steps, self._init_counts["overflows"], self._init_counts["spikes"]
        values = torch.stack([self._counts["steps"], self._skipped_steps, self._counts["overflows"],
                              self._counts["spikes"]]).tolist()
        return int(values[0]), int(values[1]), int(values[2]), int(values[3])

    def grad_norms(self, model: Union[torch.nn.Module, Iterable[Tuple[str, Tensor]]], depth: Optional[int] = None
                   ) -> Dict[str, float]:
        """``{parameter name: norm}`` of the unscaled gradients before clipping, from the last
        ``clip_grad_norm_(..., per_param_norms=True)``, in one host read. ``depth``: group by the first
        ``depth`` components of the names (``depth=2``: ``"layers.3"``), the norm of each group's norms.
        Under sharding each rank has the norms of its own pieces of the parameters."""
        return named_norms(self._param_norms, model, depth)

    def overflow_report(self, model: NamedTensors) -> List[ops.NonFiniteRecord]:
        """Which parameters' gradients hold nan/+inf/-inf, and how many of each.

        ``model`` is an ``nn.Module`` (its named parameters' ``.grad``), a mapping of names to tensors or
        an iterable of ``(name, tensor)``. Reads counts to the host: call it when asked, typically after
        :meth:`last_step_skipped` said so, before ``zero_grad``.
        """
        if isinstance(model, torch.nn.Module):
            named: Any = [(name, p.grad) for name, p in model.named_parameters()]
        else:
            named = model
        return ops.nonfinite_report(named)
