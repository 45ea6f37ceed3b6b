"""fastamp's fused mixed-precision ops: the functions users import.

Each is a thin typed wrapper over the ``torch.ops.fastamp`` operator of the same name (C++ on CPU,
CUDA on GPU, the pure-PyTorch reference where no kernel was built). All take lists of tensors of mixed
dtypes (fp32, fp16, bf16; fp64 on CPU), sizes (empty included) and layouts (non-contiguous tensors are
handled correctly, at the cost of a copy). Scalars such as the scale, inverse scale, norm and found_inf
are 1-element fp32 tensors on the gradients' device, never Python numbers, so nothing forces a host
sync. ``found_inf`` is only ever set to 1, never cleared, so one flag can gather several groups.

Where each op lives. Schemas: ``_library.SCHEMAS``; reference: ``_reference.<op>``; CPU and CUDA
registration (validation, then the kernel): ``csrc/cpu/ops.cpp``, ``csrc/cuda/ops.cpp``; the per-element
math both kernels share: ``csrc/functors.h``. Each multi-tensor op is one chunk functor run by one
harness per device (``multi_tensor_apply`` in ``csrc/cpu/multi_tensor_cpu.h`` and
``csrc/cuda/multi_tensor_apply.cuh``), named after the op on both. Tests: ``tests/ops/test_<op>.py``
(every device and implementation), ``tests/test_library.py`` (schemas, opcheck on every device); the
bench key is the op's name (``fastamp bench --op grad_norm``):

=====================  ==========================================  ==================================
op                     CPU kernel (csrc/cpu/), functor             CUDA kernel (csrc/cuda/), functor
=====================  ==========================================  ==================================
unscale_check_         unscale_check.cpp, UnscaleCheckOp           unscale_check.cu, UnscaleCheckOp
grad_norm              grad_norm.cpp, GradNormOp                   grad_norm.cu, GradNormOp
unscale_check_norm_    grad_norm.cpp, UnscaleCheckNormOp           grad_norm.cu, UnscaleCheckNormOp
clip_coef              clip_coef.cpp (scalar)                      clip_coef.cu (scalar)
clip_norm              ops.cpp (grad_norm, then clip_coef)         grad_norm.cu (GradNormOp, the finish)
scale_                 scale.cpp, ScaleOp                          scale.cu, ScaleOp
update_scale_          update_scale.cpp, ``ScaleUpdate``           update_scale.cu, ``ScaleUpdate``
=====================  ==========================================  ==================================

Composite benchmarks: ``clipped-step`` (grad_norm + clip_coef + scale_ against unscale_ +
clip_grad_norm_) and ``optimizer-step`` (the whole step with AdamW).

CUDA-only tests (graphs, sync debug, >2**31 elements, misaligned views, launches) are in ``tests/cuda``.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _extension  # noqa: F401  (loads the kernels and registers fallbacks)
from ._library import OP_NAMES
from ._reference import NonFiniteRecord, kernel_dtypes
from ._reference import nonfinite_report as _nonfinite_report

__all__ = [
    "NonFiniteRecord",
    "OP_NAMES",
    "clip_coef",
    "clip_norm",
    "grad_norm",
    "kernel_dtypes",
    "nonfinite_report",
    "scale_",
    "unscale_check_",
    "unscale_check_norm_",
    "update_scale_",
]

_ops = torch.ops.fastamp


def unscale_check_(grads: Sequence[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    """Unscale gradients in place and flag non-finite values, in one pass.

    ``g *= inv_scale`` for every tensor (computed in fp32, rounded once to the tensor's dtype), and
    ``found_inf`` is set to 1.0 if any element was inf or nan before unscaling. On fp32 grads this is
    bit-identical to ``torch._amp_foreach_non_finite_check_and_unscale_``; unlike it, fp16 and bf16
    grads are accepted.

    Args:
        grads: tensors to unscale in place (fp32, fp16, bf16; fp64 on CPU), all on one device.
        found_inf: 1-element fp32 tensor on that device; set to 1.0 on a non-finite value, never cleared.
        inv_scale: 1-element fp32 tensor on that device, usually ``1 / scale``.
    """
    _ops.unscale_check_(list(grads), found_inf, inv_scale)


def grad_norm(
    grads: Sequence[Tensor],
    inv_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    per_tensor: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """L2 norm of ``g * inv_scale`` over all grads, reading each gradient once and writing nothing.

    Args:
        grads: gradients (fp32, fp16, bf16; fp64 on CPU), all on one device.
        inv_scale: optional 1-element fp32 tensor; the norm is that of the unscaled grads.
        found_inf: optional 1-element fp32 tensor, set to 1.0 if any gradient holds inf or nan.
        per_tensor: also return each gradient's norm.

    Returns:
        ``(total_norm, per_tensor_norms)``: a 0-dim tensor (fp32; fp64 if any grad is fp64) on the
        grads' device, and a 1-D tensor with one norm per grad when ``per_tensor`` else ``None``.
        Accumulation is fp32 per 64K-element chunk and fp64 across chunks, in a fixed order, so the
        result is bit-identical from run to run.
    """
    total, per = _ops.grad_norm(list(grads), inv_scale, found_inf, per_tensor)
    return total, (per if per_tensor else None)


def unscale_check_norm_(
    grads: Sequence[Tensor], found_inf: Tensor, inv_scale: Tensor, per_tensor: bool = False
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`unscale_check_` and the L2 norm of the unscaled grads (as written), in one pass.

    Returns ``(total_norm, per_tensor_norms)`` as :func:`grad_norm` does.
    """
    total, per = _ops.unscale_check_norm_(list(grads), found_inf, inv_scale, per_tensor)
    return total, (per if per_tensor else None)


def clip_coef(total_norm: Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
    """Gradient-clipping coefficient ``min(1, max_norm / (total_norm + eps))``, on the norm's device.

    Computed as ``torch.nn.utils.clip_grad_norm_`` computes it (a nan norm gives a nan coefficient).
    Returns a 0-dim tensor of the norm's dtype.
    """
    return _ops.clip_coef(total_norm, float(max_norm), float(eps))


def clip_norm(
    grads: Sequence[Tensor],
    max_norm: float,
    inv_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    per_tensor: bool = False,
    eps: float = 1e-6,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Everything a clip needs from one read of the gradients: :func:`grad_norm`, the clip coefficient
    of its total (:func:`clip_coef`) and the factor that unscales and clips in one multiply.

    On CUDA the coefficient and the factor are computed by the norm's own finishing kernel: a clipped
    step is the norm pass, one finish and the :func:`scale_` pass (none with a fused optimizer, which
    takes the factor as its ``grad_scale``).

    Returns:
        ``(total_norm, per_tensor_norms, coef, factor)``: the first two as :func:`grad_norm` returns them;
        ``coef = min(1, max_norm / (total_norm + eps))`` and ``factor = inv_scale * coef`` (``coef``
        without ``inv_scale``), 0-dim fp32 tensors on the grads' device.
    """
    total, per, coef, factor = _ops.clip_norm(list(grads), float(max_norm), inv_scale, found_inf, per_tensor, float(eps))
    return total, (per if per_tensor else None), coef, factor


def scale_(tensors: Sequence[Tensor], factor: Tensor, found_inf: Optional[Tensor] = None) -> None:
    """``t *= factor`` in place (fp32 math, rounded once), doing nothing at all if ``found_inf`` is set
    or ``factor`` is exactly 1 (so unscaling at scale 1 without a clip costs no pass and keeps every bit).

    With ``factor = inv_scale * clip_coef`` this unscales and clips in one write pass; on an overflow
    step the tensors stay bit-identical.

    Args:
        tensors: tensors to scale (fp32, fp16, bf16; fp64 on CPU), on one device.
        factor: 1-element fp32 tensor (fp64 also accepted on CPU) on that device.
        found_inf: optional 1-element fp32 tensor; when nonzero, nothing is written.
    """
    _ops.scale_(list(tensors), factor, found_inf)


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
) -> Tensor:
    """Dynamic loss-scale update on the device; returns ``scale`` (updated in place).

    On overflow (``found_inf`` nonzero) the growth tracker resets and the scale is multiplied by
    ``backoff_factor`` (not below ``min_scale``); otherwise after ``growth_interval`` consecutive clean
    steps it is multiplied by ``growth_factor`` (not above ``max_scale``, and never to inf). Arithmetic
    is in double as in PyTorch: with ``hysteresis=1`` and no bounds this equals
    ``torch._amp_update_scale_`` bit for bit. With ``hysteresis=N`` the scale backs off only on the N-th
    consecutive overflow (and on each one after it); ``hysteresis_tracker`` (1-element int32, start it
    at N) counts the overflows still tolerated and is refilled by every clean step.

    Args:
        scale: 1-element fp32 tensor, updated in place.
        growth_tracker: 1-element int32 tensor, updated in place.
        found_inf: 1-element fp32 tensor.
    """
    _ops.update_scale_(
        scale,
        growth_tracker,
        found_inf,
        float(growth_factor),
        float(backoff_factor),
        int(growth_interval),
        int(hysteresis),
        hysteresis_tracker,
        float(min_scale),
        float(max_scale),
    )
    return scale


def nonfinite_report(
    named_tensors: Union[Mapping[str, Optional[Tensor]], Iterable[Tuple[str, Optional[Tensor]]]],
) -> List[NonFiniteRecord]:
    """Which tensors hold nan/+inf/-inf, and how many of each, e.g. ``nonfinite_report(
    {n: p.grad for n, p in model.named_parameters()})``. Reads counts to the host: call it only after
    an overflow, off the hot path. Returns one :class:`NonFiniteRecord` per offending tensor."""
    return _nonfinite_report(named_tensors)
