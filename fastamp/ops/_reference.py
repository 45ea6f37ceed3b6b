"""Pure-PyTorch implementation of every fastamp op.

Two jobs: it is the kernel registered for any dispatch key that the C++ extension does not cover (so
fastamp works without a compiler), and it is the oracle every C++ and CUDA kernel is tested against.
Each function has exactly the semantics of the kernel of the same name, and validates its inputs with
the same messages. Like the kernels it never reads a device value on the host: decisions are
``torch.where`` on device tensors. Norms are accumulated in fp64 here, more accurately than the
kernels' fp32 partials, which makes this a stricter oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "NonFiniteRecord",
    "kernel_dtypes",
    "norm_dtype",
    "validate_clip_coef",
    "validate_clip_norm",
    "validate_grad_norm",
    "validate_scale",
    "validate_unscale_check",
    "validate_update_scale",
    "clip_coef",
    "clip_norm",
    "grad_norm",
    "nonfinite_report",
    "scale_",
    "unscale_check_",
    "unscale_check_norm_",
    "update_scale_",
]

_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_dtypes(device: Union[str, torch.device]) -> Tuple[torch.dtype, ...]:
    """The gradient dtypes the ops take on ``device``: fp32, fp16, bf16, and fp64 on CPU (csrc/checks.h
    states the same for the compiled kernels)."""
    return _GRAD_DTYPES + ((torch.float64,) if torch.device(device).type == "cpu" else ())


def norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """dtype of a norm over ``tensors``: float64 if any is float64 (accumulated in fp64), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- validation: the same checks and messages as csrc/checks.h ------------------------------------


def _fail(op: str, message: str) -> None:
    raise RuntimeError(f"fastamp.{op}: {message}")


def _check_tensor_list(
    op: str, name: str, tensors: Sequence[Tensor], device: torch.device, written: bool
) -> None:
    allow_double = device.type == "cpu"
    accepted = kernel_dtypes(device)
    for i, t in enumerate(tensors):
        if t is None:
            _fail(op, f"{name}[{i}] is undefined (None)")
        if t.dtype not in accepted:
            extra = " or torch.float64" if allow_double else " (torch.float64 is supported on CPU only)"
            _fail(op, f"{name}[{i}] has dtype {t.dtype}; expected torch.float32, torch.float16, torch.bfloat16{extra}")
        if t.device != device:
            _fail(
                op,
                f"{name}[{i}] is on {t.device} but the op runs on {device}; move every tensor of the call to one device",
            )
        if written and t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
            _fail(op, f"{name}[{i}] has elements that share memory (e.g. an expand()ed tensor) and cannot be written in place")
    if written:
        _check_no_aliasing(op, name, tensors)


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense (ATen's is_non_overlapping_and_dense): a permutation of a contiguous layout."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_no_aliasing(op: str, name: str, tensors: Sequence[Tensor]) -> None:
    """As csrc/checks.h: two entries of a written list must not share memory (the same view twice, or
    dense tensors whose spans overlap); strided views with gaps are let be."""
    views: dict = {}
    spans = []
    for i, t in enumerate(tensors):
        if t.numel() == 0 or t.device.type == "meta":
            continue
        begin = t.data_ptr()
        first = views.setdefault((begin, tuple(t.shape), t.stride()), i)
        if first != i:
            _fail(op, f"{name}[{first}] and {name}[{i}] are the same memory; each element would be written twice. "
                      "Pass each tensor once")
        if _is_dense(t):
            spans.append((begin, begin + t.numel() * t.element_size(), i))
    spans.sort()
    for (begin, end, i), (next_begin, next_end, j) in zip(spans, spans[1:]):
        if next_begin < end:
            _fail(op, f"{name}[{min(i, j)}] and {name}[{max(i, j)}] overlap in memory; each shared element would be "
                      "written twice. Pass each tensor once")


def _check_scalar(op: str, name: str, t: Optional[Tensor], device: torch.device, allow_double: bool) -> None:
    if t is None:
        _fail(op, f"{name} is undefined (None)")
    if t.numel() != 1:
        _fail(op, f"{name} must be a 1-element tensor, got shape {list(t.shape)}")
    if t.dtype != torch.float32 and not (allow_double and t.dtype == torch.float64):
        _fail(op, f"{name} must be a torch.float32{' or torch.float64' if allow_double else ''} tensor, got {t.dtype}")
    if t.device != device:
        _fail(op, f"{name} is on {t.device} but the op runs on {device}; create it on the gradients' device")


def _check_int(op: str, name: str, t: Optional[Tensor], device: torch.device) -> None:
    if t is None:
        _fail(op, f"{name} is undefined (None)")
    if t.numel() != 1:
        _fail(op, f"{name} must be a 1-element tensor, got shape {list(t.shape)}")
    if t.dtype != torch.int32:
        _fail(op, f"{name} must be a torch.int32 tensor, got {t.dtype}")
    if t.device != device:
        _fail(op, f"{name} is on {t.device} but the op runs on {device}")


def validate_unscale_check(
    op: str, grads: Sequence[Tensor], found_inf: Tensor, inv_scale: Tensor, written: bool = True
) -> None:
    device = found_inf.device
    _check_scalar(op, "found_inf", found_inf, device, False)
    _check_scalar(op, "inv_scale", inv_scale, device, False)
    _check_tensor_list(op, "grads", grads, device, written)


def _grad_norm_device(grads: Sequence[Tensor], inv_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> torch.device:
    """Where grad_norm runs: on the grads, or for an empty list where its scalars are (CPU without any)."""
    for t in (*grads[:1], inv_scale, found_inf):
        if t is not None:
            return t.device
    return torch.device("cpu")


def _validate_norm_inputs(op: str, grads: Sequence[Tensor], inv_scale: Optional[Tensor],
                          found_inf: Optional[Tensor]) -> None:
    device = _grad_norm_device(grads, inv_scale, found_inf)
    _check_tensor_list(op, "grads", grads, device, written=False)
    if inv_scale is not None:
        _check_scalar(op, "inv_scale", inv_scale, device, False)
    if found_inf is not None:
        _check_scalar(op, "found_inf", found_inf, device, False)


def _check_clip_args(op: str, max_norm: float, eps: float) -> None:
    if max_norm < 0:
        _fail(op, f"max_norm must be non-negative, got {max_norm}")
    if eps < 0:
        _fail(op, f"eps must be non-negative, got {eps}")


def validate_grad_norm(grads: Sequence[Tensor], inv_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    _validate_norm_inputs("grad_norm", grads, inv_scale, found_inf)


def validate_clip_coef(total_norm: Tensor, max_norm: float, eps: float) -> None:
    op = "clip_coef"
    _check_scalar(op, "total_norm", total_norm, total_norm.device, True)
    _check_clip_args(op, max_norm, eps)


def validate_clip_norm(grads: Sequence[Tensor], max_norm: float, inv_scale: Optional[Tensor],
                       found_inf: Optional[Tensor], eps: float) -> None:
    _validate_norm_inputs("clip_norm", grads, inv_scale, found_inf)
    _check_clip_args("clip_norm", max_norm, eps)


def validate_scale(tensors: Sequence[Tensor], factor: Tensor, found_inf: Optional[Tensor], written: bool = True) -> None:
    op = "scale_"
    device = factor.device
    _check_scalar(op, "factor", factor, device, device.type == "cpu")
    if found_inf is not None:
        _check_scalar(op, "found_inf", found_inf, device, False)
    _check_tensor_list(op, "tensors", tensors, device, written)


def validate_update_scale(
    scale: Tensor,
    growth_tracker: Tensor,
    found_inf: Tensor,
    hysteresis: int,
    hysteresis_tracker: Optional[Tensor],
    min_scale: float,
    max_scale: float,
) -> None:
    op = "update_scale_"
    device = scale.device
    _check_scalar(op, "scale", scale, device, False)
    _check_int(op, "growth_tracker", growth_tracker, device)
    _check_scalar(op, "found_inf", found_inf, device, False)
    if hysteresis < 1:
        _fail(op, f"hysteresis must be >= 1, got {hysteresis}")
    if hysteresis != 1 and hysteresis_tracker is None:
        _fail(op, f"hysteresis={hysteresis} needs a hysteresis_tracker (a 1-element torch.int32 tensor)")
    if hysteresis_tracker is not None:
        _check_int(op, "hysteresis_tracker", hysteresis_tracker, device)
    if not (0.0 <= min_scale <= max_scale):
        _fail(op, f"need 0 <= min_scale <= max_scale, got min_scale={min_scale}, max_scale={max_scale}")


# ---- helpers -------------------------------------------------------------------------------------


def _any_nonfinite(tensors: Iterable[Tensor]) -> Optional[Tensor]:
    flags = [~torch.isfinite(t).all() for t in tensors if t.numel() > 0]
    return torch.stack(flags).any() if flags else None


def _set_found_inf(found_inf: Tensor, flag: Optional[Tensor]) -> None:
    # Only ever set, never cleared, so one flag can gather several groups.
    if flag is not None:
        found_inf.masked_fill_(flag, 1.0)


def _unscaled(g: Tensor, inv_scale: Tensor) -> Tensor:
    """g * inv_scale in opmath, not yet rounded; multiplying by exactly 1 is skipped (as torch does)."""
    a = _opmath(g.dtype)
    x = g.to(a)
    inv = inv_scale.reshape(()).to(a)
    return torch.where(inv == 1, x, x * inv)


def _norms(values: Sequence[Tensor], dtype: torch.dtype, device: torch.device, per_tensor: bool) -> Tuple[Tensor, Tensor]:
    if not values:
        return torch.zeros((), dtype=dtype, device=device), torch.zeros((0,), dtype=dtype, device=device)
    sums = torch.stack([v.to(torch.float64).square().sum() for v in values])
    total = sums.sum().sqrt().to(dtype)
    per = sums.sqrt().to(dtype) if per_tensor else sums.new_empty((0,), dtype=dtype)
    return total, per


# ---- the ops -------------------------------------------------------------------------------------


def unscale_check_(grads: Sequence[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    """Reference for :func:`fastamp.ops.unscale_check_`."""
    validate_unscale_check("unscale_check_", grads, found_inf, inv_scale)
    flag = _any_nonfinite(grads)
    for g in grads:
        g.copy_(_unscaled(g, inv_scale).to(g.dtype))
    _set_found_inf(found_inf, flag)


def grad_norm(
    grads: Sequence[Tensor],
    inv_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    per_tensor: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Reference for :func:`fastamp.ops.grad_norm` (per-tensor norms: an empty tensor unless asked)."""
    validate_grad_norm(grads, inv_scale, found_inf)
    device = _grad_norm_device(grads, inv_scale, found_inf)
    if found_inf is not None:
        _set_found_inf(found_inf, _any_nonfinite(grads))
    values = [g if inv_scale is None else g.to(_opmath(g.dtype)) * inv_scale.reshape(()).to(_opmath(g.dtype)) for g in grads]
    return _norms(values, norm_dtype(list(grads)), device, per_tensor)


def unscale_check_norm_(
    grads: Sequence[Tensor], found_inf: Tensor, inv_scale: Tensor, per_tensor: bool = False
) -> Tuple[Tensor, Tensor]:
    """Reference for :func:`fastamp.ops.unscale_check_norm_`: the norm is of the grads as written."""
    validate_unscale_check("unscale_check_norm_", grads, found_inf, inv_scale)
    flag = _any_nonfinite(grads)
    for g in grads:
        g.copy_(_unscaled(g, inv_scale).to(g.dtype))
    _set_found_inf(found_inf, flag)
    return _norms(list(grads), norm_dtype(list(grads)), found_inf.device, per_tensor)


def clip_coef(total_norm: Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
    """Reference for :func:`fastamp.ops.clip_coef`: clamp(max_norm / (norm + eps), max=1), as clip_grad_norm_."""
    validate_clip_coef(total_norm, max_norm, eps)
    norm = total_norm.reshape(())
    return ((norm + eps).reciprocal() * max_norm).clamp(max=1.0)


def clip_norm(
    grads: Sequence[Tensor],
    max_norm: float,
    inv_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    per_tensor: bool = False,
    eps: float = 1e-6,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference for :func:`fastamp.ops.clip_norm`: grad_norm, then clip_coef of its total (fp32) and the
    factor ``inv_scale * coef`` (``coef`` without inv_scale), fp32."""
    validate_clip_norm(grads, max_norm, inv_scale, found_inf, eps)
    device = _grad_norm_device(grads, inv_scale, found_inf)
    if found_inf is not None:
        _set_found_inf(found_inf, _any_nonfinite(grads))
    values = [g if inv_scale is None else g.to(_opmath(g.dtype)) * inv_scale.reshape(()).to(_opmath(g.dtype)) for g in grads]
    total, per = _norms(values, norm_dtype(list(grads)), device, per_tensor)
    coef = clip_coef(total, max_norm, eps).float()
    factor = coef.clone() if inv_scale is None else inv_scale.reshape(()) * coef
    return total, per, coef, factor


def scale_(tensors: Sequence[Tensor], factor: Tensor, found_inf: Optional[Tensor] = None) -> None:
    """Reference for :func:`fastamp.ops.scale_`: t *= factor unless found_inf is set or factor is 1."""
    validate_scale(tensors, factor, found_inf)
    keep = factor.reshape(()) == 1
    if found_inf is not None:
        keep = keep | (found_inf.reshape(()) != 0)
    for t in tensors:
        a = _opmath(t.dtype)
        scaled = (t.to(a) * factor.reshape(()).to(a)).to(t.dtype)
        t.copy_(torch.where(keep, t, scaled))


def update_scale_(
    scale: Tensor,
    growth_tracker: Tensor,
    found_inf: Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    hysteresis: int = 1,
    hysteresis_tracker: Optional[Tensor] = None,
    min_scale: float = 0.0,
    max_scale: float = math.inf,
) -> None:
    """Reference for :func:`fastamp.ops.update_scale_` (double arithmetic, as torch._amp_update_scale_)."""
    validate_update_scale(scale, growth_tracker, found_inf, hysteresis, hysteresis_tracker, min_scale, max_scale)

    current = scale.reshape(())
    overflow = found_inf.reshape(()) != 0
    as_double = current.to(torch.float64)
    backed_off = torch.clamp(as_double * backoff_factor, min=min_scale).to(torch.float32)
    grown = torch.clamp(as_double * growth_factor, max=max_scale).to(torch.float32)
    grown = torch.where(torch.isfinite(grown), grown, current)
    successful = growth_tracker.reshape(()) + 1
    grow = ~overflow & (successful == growth_interval)
    if hysteresis_tracker is not None:
        remaining = hysteresis_tracker.reshape(()) - 1
        tolerated = overflow & (remaining > 0)
        new_hysteresis = torch.where(overflow, remaining, torch.full_like(remaining, hysteresis))
    else:
        tolerated = torch.zeros_like(overflow)
    new_scale = torch.where(overflow, torch.where(tolerated, current, backed_off), torch.where(grow, grown, current))
    new_tracker = torch.where(overflow | grow, torch.zeros_like(successful), successful)
    scale.copy_(new_scale.reshape(scale.shape))
    growth_tracker.copy_(new_tracker.reshape(growth_tracker.shape))
    if hysteresis_tracker is not None:
        hysteresis_tracker.copy_(new_hysteresis.reshape(hysteresis_tracker.shape))


# ---- off the hot path ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NonFiniteRecord:
    """Counts of non-finite values in one named tensor."""

    name: str
    nan: int
    posinf: int
    neginf: int
    numel: int
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def total(self) -> int:
        """All non-finite values: nan + posinf + neginf."""
        return self.nan + self.posinf + self.neginf


def nonfinite_report(
    named_tensors: Union[Mapping[str, Optional[Tensor]], Iterable[Tuple[str, Optional[Tensor]]]],
) -> List[NonFiniteRecord]:
    """Names and counts of nan/+inf/-inf for each tensor that has any, in the order given.

    Meant to run after an overflow, off the hot path: it reads the counts to the host, once per device.
    ``None`` entries (parameters without a gradient) are skipped.
    """
    items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
    items = [(name, t) for name, t in items if t is not None]
    by_device: dict = {}
    for index, (_, t) in enumerate(items):
        by_device.setdefault(t.device, []).append(index)
    counts: dict = {}
    for indices in by_device.values():
        stacked = torch.stack(
            [
                torch.stack([items[i][1].isnan().sum(), items[i][1].isposinf().sum(), items[i][1].isneginf().sum()])
                for i in indices
            ]
        ).cpu()
        for row, i in zip(stacked.tolist(), indices):
            counts[i] = row
    records = []
    for index, (name, t) in enumerate(items):
        nan, posinf, neginf = counts[index]
        if nan or posinf or neginf:
            records.append(NonFiniteRecord(name, nan, posinf, neginf, t.numel(), t.dtype, tuple(t.shape)))
    return records
