"""Hugging Face Accelerate and the Transformers Trainer on fastamp, in one line: :func:`apply_fastamp`.

Both libraries build a stock ``torch.amp.GradScaler`` inside ``Accelerator.__init__`` and clip with
``torch.nn.utils.clip_grad_norm_`` after ``scaler.unscale_``. :func:`apply_fastamp` changes the one
object it is given (never the libraries' modules), in the manner of Liger Kernel's
``apply_liger_kernel_to_*``:

- fp16: the accelerator's scaler becomes a :class:`fastamp.GradScaler` with the same settings (those of
  ``GradScalerKwargs`` included) and the same state, in the accelerator and in every optimizer it has
  prepared or will prepare;
- ``accelerator.clip_grad_norm_(parameters, max_norm)`` (what the Trainer calls every step) runs
  fastamp's fused clip on the prepared optimizers that hold those parameters: one read for the norm
  and found_inf, folded into ``fused=True`` optimizers; it returns the norm, as stock does. Under FSDP2
  the norm is the global one read from the DTensor grads' placements (one all-reduce), and the fp16
  sharded scaler becomes :class:`fastamp.distributed.ShardedGradScaler`. Another ``norm_type``,
  DeepSpeed, XLA and FSDP1, or parameters that are not exactly some prepared optimizers' go to
  Accelerate's own code;
- bf16 and fp32: the same fused clip and, with ``skip_nonfinite=True``, the non-finite guard (a
  :class:`fastamp.GradScaler` pinned at scale 1 in the optimizers): a step with inf/nan gradients is
  skipped, on the device for fused optimizers.

``optimizer.step_was_skipped`` and ``accelerator.optimizer_step_was_skipped`` keep Accelerate's meaning
(its wrapper notices that the scaler did not call the optimizer's step; a fused optimizer is always
called and skips on the device, as with the stock scaler), so the LR scheduler reacts as it does
stock. ``save_state``/``load_state`` carry the scaler in the stock format, both ways.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor

from .._gradients import clip_gradients, local_grads, named_norms
from ..grad_scaler import GradScaler
from ..spike_guard import SpikeGuard

__all__ = ["apply_fastamp", "grad_norms"]

_PATCHED = "_fastamp_applied"
_NORMS = "_fastamp_param_norms"
# Accelerate's own code keeps these (they wrap or shard the gradients their own way).
_OWN_CLIP_TYPES = ("DEEPSPEED", "XLA", "FSDP", "MEGATRON_LM")


def _accelerate():
    try:
        import accelerate
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError as e:  # depends on the environment
        raise ImportError("fastamp.integrations.apply_fastamp needs accelerate: pip install 'fastamp[hf]'") from e
    return accelerate, AcceleratedOptimizer


def _raw(optimizer: Any, wrapper: type) -> torch.optim.Optimizer:
    while isinstance(optimizer, wrapper):
        optimizer = optimizer.optimizer
    return optimizer


def _converted(scaler: torch.amp.GradScaler, device_type: str, **fastamp_kwargs: Any) -> GradScaler:
    """A fastamp.GradScaler (the sharded one for torch's sharded scaler: FSDP) with the stock scaler's
    settings and state (its scale, growth tracker)."""
    state = scaler.state_dict()  # {} when disabled
    if _is_stock_sharded_scaler(scaler):
        from ..distributed import ShardedGradScaler

        cls = ShardedGradScaler
    else:
        cls = GradScaler
    new = cls(device_type, init_scale=state.get("scale", 2.0**16), growth_factor=scaler.get_growth_factor(),
                     backoff_factor=scaler.get_backoff_factor(), growth_interval=scaler.get_growth_interval(),
                     enabled=scaler.is_enabled(), **fastamp_kwargs)
    if state:
        new.load_state_dict(state)
    return new


def _is_stock_scaler(scaler: Any) -> bool:
    # Exactly torch's (or its deprecated torch.cuda.amp alias): XLA scalers keep their own ways.
    return type(scaler) in (torch.amp.GradScaler, getattr(torch.cuda.amp, "GradScaler", torch.amp.GradScaler))


def _is_stock_sharded_scaler(scaler: Any) -> bool:
    # What Accelerate builds for fp16 under FSDP.
    try:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as StockSharded
    except ImportError:  # torch without distributed
        return False
    return type(scaler) is StockSharded


def _attach(optimizer: Any, scaler: GradScaler) -> None:
    """Give an AcceleratedOptimizer a scaler. Its step-skip detection is set up by its own pickling
    protocol (``__setstate__`` builds it whenever a scaler is present), as on an unpickled optimizer."""
    optimizer.scaler = scaler
    optimizer.__setstate__(optimizer.__getstate__())
    _report_device_skips(optimizer)


class _SkipFlag:
    """``step_was_skipped`` of a fused optimizer: the scaler's device flag, read only when asked (the
    Trainer asks when it reads the step's norm anyway)."""

    def __init__(self, flag: Tensor) -> None:
        self.flag = flag

    def __bool__(self) -> bool:
        return bool(self.flag.reshape(()).item() != 0)


def _report_device_skips(optimizer: Any) -> None:
    """Accelerate tells a skipped step by the optimizer's step not being called; a fused optimizer is
    always called and skips on the device, so its ``step_was_skipped`` becomes that decision. The
    optimizer's class becomes a subclass of its own that does this (so that ``step`` stays a method)."""
    base = type(optimizer)
    if getattr(base, "_fastamp_skip_aware", False):
        return
    name = f"SkipAware{base.__name__}"
    cls = globals().get(name)
    if cls is None:

        def step(self: Any, closure: Any = None) -> Any:
            result = base.step(self, closure)
            scaler, raw = self.scaler, self.optimizer
            if (isinstance(scaler, GradScaler) and scaler.is_enabled() and self.gradient_state.sync_gradients
                    and getattr(raw, "_step_supports_amp_scaling", False) and scaler.found_inf is not None):
                self._is_overflow = _SkipFlag(scaler.found_inf)
            return result

        cls = type(name, (base,), {"step": step, "_fastamp_skip_aware": True, "__module__": __name__,
                                   "__qualname__": name})
        globals()[name] = cls  # picklable by name
    optimizer.__class__ = cls


def apply_fastamp(target: Any, *, skip_nonfinite: bool = False, spike_guard: Optional[SpikeGuard] = None,
                  log_grad_norms: bool = False, **scaler_kwargs: Any) -> Any:
    """Run an ``accelerate.Accelerator`` (before or after ``prepare``) or a ``transformers.Trainer`` on
    fastamp's scaler and fused clip. Returns ``target``.

    Args:
        target: the Accelerator, or the Trainer (its ``trainer.accelerator`` is changed; call this
            before ``trainer.train()``).
        skip_nonfinite: bf16 and fp32 only (fp16 always skips): skip steps whose gradients hold inf/nan.
        spike_guard: a :class:`fastamp.SpikeGuard` on the gradient norm the clip computes (fp16: also
            ``on="loss"``; bf16/fp32 bring the guard scaler, which sees the norm, not the loss).
        log_grad_norms: keep each parameter's norm from the clip's pass; a Trainer's logs then carry
            ``grad_norm/<name>`` at its logging steps (read with the norm it reads there anyway), and
            :func:`grad_norms` reads them for an Accelerator.
        **scaler_kwargs: fastamp's own scaler settings for fp16 (``hysteresis``, ``min_scale``,
            ``max_scale``); Accelerate's (``init_scale``, ``growth_interval``, ...) come from its
            ``GradScalerKwargs``.

    Raises:
        TypeError: ``target`` is neither.
        ValueError: ``scaler_kwargs`` without an fp16 scaler to apply them to.
    """
    accelerate, wrapper = _accelerate()
    accelerator = getattr(target, "accelerator", None) if not isinstance(target, accelerate.Accelerator) else target
    if not isinstance(accelerator, accelerate.Accelerator):
        raise TypeError(
            "apply_fastamp: expected an accelerate.Accelerator or a transformers.Trainer, got "
            f"{type(target).__module__}.{type(target).__qualname__}"
        )
    if getattr(accelerator, _PATCHED, False):
        return target
    device_type = accelerator.device.type
    stock = accelerator.scaler
    if scaler_kwargs and not (_is_stock_scaler(stock) or _is_stock_sharded_scaler(stock)):
        raise ValueError(f"apply_fastamp: {sorted(scaler_kwargs)} configure the fp16 loss scaler that replaces "
                         f"Accelerate's, and this accelerator has {'a ' + type(stock).__name__ if stock else 'none'} "
                         f"(mixed_precision={accelerator.mixed_precision!r})")
    scaler: Optional[GradScaler] = None
    if isinstance(stock, GradScaler):
        scaler = stock
    elif _is_stock_scaler(stock) or (_is_stock_sharded_scaler(stock) and getattr(accelerator, "is_fsdp2", False)):
        scaler = _converted(stock, device_type, **scaler_kwargs)
    if scaler is not None and spike_guard is not None:
        scaler.spike_guard = spike_guard
    guard: Optional[GradScaler] = None
    if scaler is not None:
        accelerator.scaler = scaler
    elif (skip_nonfinite or spike_guard is not None) and stock is None:
        guard = GradScaler.nonfinite_guard(device_type, spike_guard=spike_guard)
        guard.scale(torch.zeros((), device=accelerator.device))  # the scale lives on the accelerator's device
    step_scaler = scaler if scaler is not None else guard

    if step_scaler is not None:
        for optimizer in accelerator._optimizers:  # already prepared (Accelerate keeps no public list)
            # The stock scaler's optimizers get fastamp's; the guard goes where there was no scaler (an
            # optimizer Accelerate deliberately left without one, as under MS-AMP, keeps its own way).
            if optimizer.scaler is (stock if scaler is not None else None):
                _attach(optimizer, step_scaler)
        if guard is not None:  # optimizers prepared from now on: Accelerate gives them its scaler, None
            prepare_optimizer = accelerator.prepare_optimizer

            def prepare_optimizer_with_guard(optimizer: Any, device_placement: Optional[bool] = None) -> Any:
                prepared = prepare_optimizer(optimizer, device_placement=device_placement)
                if isinstance(prepared, wrapper) and prepared.scaler is None:
                    _attach(prepared, guard)
                return prepared

            accelerator.prepare_optimizer = prepare_optimizer_with_guard

    norms = _ParamNorms(bool(log_grad_norms))
    setattr(accelerator, _NORMS, norms)
    accelerator.clip_grad_norm_ = _fused_clip(accelerator, accelerator.clip_grad_norm_, wrapper, norms)
    setattr(accelerator, _PATCHED, True)
    if log_grad_norms and target is not accelerator and callable(getattr(target, "log", None)):
        _log_grad_norms_with(target, accelerator)
    return target


class _ParamNorms:
    """The per-parameter norms of the latest fused clip: from the scaler, or kept here."""

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted
        self.scaler: Optional[GradScaler] = None
        self.per_param: Optional[List[Any]] = None

    def read(self, model: Any, depth: Optional[int] = None) -> Dict[str, float]:
        if self.scaler is not None:
            return self.scaler.grad_norms(model, depth)
        return named_norms(self.per_param, model, depth)


def grad_norms(target: Any, model: Any, depth: Optional[int] = None) -> Dict[str, float]:
    """``{parameter name: norm}`` before clipping, from the latest ``clip_grad_norm_`` of an accelerator
    (or Trainer) given ``apply_fastamp(..., log_grad_norms=True)``, in one host read."""
    accelerator = getattr(target, "accelerator", target)
    norms = getattr(accelerator, _NORMS, None)
    if norms is None or not norms.wanted:
        raise ValueError("fastamp.integrations.grad_norms: call apply_fastamp(..., log_grad_norms=True) first")
    return norms.read(model, depth)


def _log_grad_norms_with(trainer: Any, accelerator: Any) -> None:
    """The Trainer's training logs (those with the loss, at its logging steps) also get the norms."""
    original = trainer.log

    def log(logs: Dict[str, float], *args: Any, **kwargs: Any) -> Any:
        if "loss" in logs:
            norms = getattr(accelerator, _NORMS).read(trainer.model)
            logs = {**logs, **{f"grad_norm/{name}": value for name, value in norms.items()}}
        return original(logs, *args, **kwargs)

    trainer.log = log


def _fused_clip(accelerator: Any, stock_clip: Callable[..., Any], wrapper: type, norms: _ParamNorms) -> Callable[..., Any]:
    def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2) -> Any:
        """fastamp's fused clip on the prepared optimizers holding ``parameters`` (see apply_fastamp)."""
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        fsdp2 = accelerator.distributed_type.name == "FSDP" and getattr(accelerator, "is_fsdp2", False)
        if (accelerator.distributed_type.name in _OWN_CLIP_TYPES and not fsdp2) or float(norm_type) != 2.0:
            # FSDP2's DTensor grads are fastamp's (the global norm reads their placements); FSDP1's flat
            # parameters and DeepSpeed's, XLA's and Megatron's sharding are their own.
            return stock_clip(params, max_norm, norm_type=norm_type)
        chosen = _optimizers_holding(accelerator._optimizers, params, wrapper)
        if chosen is None:
            return stock_clip(params, max_norm, norm_type=norm_type)
        raw = [_raw(opt, wrapper) for opt in chosen]
        scalers = {id(opt.scaler): opt.scaler for opt in chosen}
        if len(scalers) != 1:  # optimizers on different scalers: Accelerate's own code
            return stock_clip(params, max_norm, norm_type=norm_type)
        (scaler,) = scalers.values()
        if isinstance(scaler, GradScaler):
            norms.scaler, norms.per_param = scaler, None
            return scaler.clip_grad_norm_(raw, max_norm, per_param_norms=norms.wanted)
        if scaler is not None:  # a scaler fastamp did not replace (sharded, XLA)
            return stock_clip(params, max_norm, norm_type=norm_type)
        # No scaler (bf16, fp32): norm in one read, one write to clip.
        grads = local_grads(raw)
        result = clip_gradients(grads, None if math.isinf(float(max_norm)) else float(max_norm),
                                per_param_norms=norms.wanted)
        norms.scaler, norms.per_param = None, result.per_param
        with torch.no_grad():
            result.apply_(grads, skip_on_found_inf=False)  # stock writes even a non-finite norm's factor
        return result.total_norm

    return clip_grad_norm_


def _optimizers_holding(optimizers: List[Any], params: List[Tensor], wrapper: type) -> Optional[List[Any]]:
    """The prepared optimizers whose parameters are exactly ``params`` (those with a gradient), or None."""
    wanted = {id(p) for p in params if p.grad is not None}
    chosen, covered = [], set()
    for opt in optimizers:
        held = {id(p) for group in _raw(opt, wrapper).param_groups for p in group["params"] if p.grad is not None}
        if not held:
            continue
        if held <= wanted:
            chosen.append(opt)
            covered |= held
        elif held & wanted:
            return None  # partly: the clip must see exactly the given parameters
    return chosen if chosen and covered == wanted else None
