"""The gradient core: the one module that walks gradients and clips them.

Every clip path in fastamp (``GradScaler.clip_grad_norm_``, ``ShardedGradScaler``,
``fastamp.distributed.clip_grad_norm_``, the Lightning plugin and ``FusedMixedPrecisionTrainer``) goes
through :func:`clip_gradients`:

1. gradients collected by device (:func:`grads_by_device`: dense, sparse values, DTensor shards);
2. split into what fastamp's kernels take and what PyTorch's ops take (:func:`split_for_kernels`:
   fp32/fp16/bf16 anywhere, fp64 on CPU; fp64 on CUDA goes to PyTorch);
3. per device, one read pass for the norm and found_inf (:func:`norm_and_check`);
4. reduced across devices here, and across ranks by the caller's ``reduce`` (one packed all-reduce);
5. the clip coefficient, and the factor that unscales and clips in one multiply.

The caller then either folds the factor into a fused optimizer's ``grad_scale`` or writes it
(:func:`scale_grads_`, nothing written on overflow). Clipping switched off (``max_norm`` None, 0 or
inf) means no coefficient at all: the factor is exactly ``inv_scale`` (or nothing), never
``clip_coef(inf, inf)``, which is NaN when a diverging run's fp32 norm overflows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops

__all__ = [
    "ClipResult",
    "PerDevice",
    "Reduce",
    "clip_gradients",
    "grads_by_device",
    "is_dtensor",
    "kernel_handles",
    "merge_by_device",
    "norm_and_check",
    "scale_grads_",
    "split_for_kernels",
    "unscale_check_grads_",
]

GradSource = Union[torch.optim.Optimizer, Tensor]
# (total_norm, found_inf) -> the global (total_norm, found_inf); a sharded job all-reduces here.
Reduce = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's sharded parameters and grads); torch.distributed may be absent."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def kernel_handles(grad: Tensor) -> bool:
    """Whether fastamp's ops take this gradient (see ``fastamp.ops.kernel_dtypes``); the rest go to
    PyTorch's ops."""
    return grad.dtype in ops.kernel_dtypes(grad.device)


def split_for_kernels(grads: Iterable[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """(gradients fastamp's ops take, the others)."""
    fused: List[Tensor] = []
    other: List[Tensor] = []
    for g in grads:
        (fused if kernel_handles(g) else other).append(g)
    return fused, other


class PerDevice:
    """Copies of a scalar tensor on each device that asks, made once (non-blocking)."""

    def __init__(self, master: Tensor) -> None:
        self.master = master
        self._copies: Dict[torch.device, Tensor] = {master.device: master}

    def get(self, device: torch.device) -> Tensor:
        copy = self._copies.get(device)
        if copy is None:
            copy = self.master.to(device=device, non_blocking=True, copy=True)
            self._copies[device] = copy
        return copy


def _params_of(sources: Iterable[GradSource]) -> Iterable[Tensor]:
    for source in sources:
        if isinstance(source, torch.optim.Optimizer):
            for group in source.param_groups:
                for param in group["params"]:
                    if not isinstance(param, Tensor):
                        raise AssertionError(f"expected param to be torch.Tensor, got {type(param).__name__}")
                    yield param
        else:
            yield source


def grads_by_device(sources: Union[GradSource, Iterable[GradSource]]) -> Dict[torch.device, List[Tensor]]:
    """The gradients of optimizers or parameters, grouped by device: DTensor grads as the local shard
    (a view, written in place), sparse grads as their values (fp16 ones coalesced first, as PyTorch
    does: duplicate indices of scaled values can overflow when summed later)."""
    if isinstance(sources, (torch.optim.Optimizer, Tensor)):
        sources = [sources]
    by_device: Dict[torch.device, List[Tensor]] = defaultdict(list)
    for param in _params_of(sources):
        grad = param.grad
        if grad is None:
            continue
        if is_dtensor(grad):
            grad = grad.to_local()
        if grad.is_sparse:
            if grad.dtype is torch.float16:
                param.grad = grad = grad.coalesce()
            grad = grad._values()
        by_device[grad.device].append(grad)
    return dict(by_device)


def merge_by_device(groups: Iterable[Dict[torch.device, List[Tensor]]]) -> Dict[torch.device, List[Tensor]]:
    """The concatenation, per device, of several :func:`grads_by_device` results."""
    merged: Dict[torch.device, List[Tensor]] = defaultdict(list)
    for group in groups:
        for device, grads in group.items():
            merged[device].extend(grads)
    return dict(merged)


def unscale_check_grads_(grads: List[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    """``g *= inv_scale`` and the inf/nan check, for grads on one device (fastamp's kernel where it
    applies, PyTorch's op for the rest)."""
    fused, other = split_for_kernels(grads)
    if fused:
        ops.unscale_check_(fused, found_inf, inv_scale)
    by_dtype: Dict[torch.dtype, List[Tensor]] = defaultdict(list)
    for g in other:
        by_dtype[g.dtype].append(g)
    for same_dtype in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, found_inf, inv_scale)


def norm_and_check(grads: List[Tensor], inv_scale: Optional[Tensor], found_inf: Tensor) -> Tensor:
    """fp32 L2 norm of ``g * inv_scale`` over grads on one device (one read pass), setting found_inf."""
    fused, other = split_for_kernels(grads)
    total, _ = ops.grad_norm(fused, inv_scale, found_inf) if fused else (found_inf.new_zeros(()), None)
    total = total.float()
    if other:
        norms = torch._foreach_norm(other)
        squares = torch.stack([n.double() for n in norms]).square().sum()
        if inv_scale is not None:
            squares = squares * inv_scale.double().reshape(()).square()
        flag = torch.stack([(~torch.isfinite(g)).any() for g in other]).any()
        found_inf.copy_(torch.where(flag, torch.ones_like(found_inf), found_inf))
        total = (total.double().square() + squares).sqrt().float()
    return total


def scale_grads_(grads: List[Tensor], factor: Tensor, found_inf: Optional[Tensor]) -> None:
    """``g *= factor`` for grads on one device; nothing at all where ``found_inf`` is set."""
    fused, other = split_for_kernels(grads)
    if fused:
        ops.scale_(fused, factor, found_inf)
    for g in other:
        keep = factor.reshape(()) == 1
        if found_inf is not None:
            keep = keep | (found_inf.reshape(()) != 0)
        g.copy_(torch.where(keep.to(g.device), g, g * factor.to(g.dtype)))


@dataclass
class ClipResult:
    """What :func:`clip_gradients` decided, all on the devices, nothing read on the host.

    ``total_norm``: of the unscaled grads, before clipping (fp32, on ``home``). ``found_inf``: global
    flag on ``home``; ``found_inf_per_device``: the same on each grads' device. ``coef``: the clip
    coefficient, ``None`` when clipping is off. ``factor``: what multiplies the grads to unscale and
    clip them (``inv_scale * coef``, ``coef`` or ``inv_scale``), ``None`` when there is nothing to do.
    """

    total_norm: Tensor
    found_inf: Tensor
    found_inf_per_device: Dict[torch.device, Tensor]
    coef: Optional[Tensor]
    factor: Optional[Tensor]

    def apply_(self, by_device: Dict[torch.device, List[Tensor]], skip_on_found_inf: bool = True) -> None:
        """Write the factor into the grads (not on an overflow, unless ``skip_on_found_inf=False``)."""
        if self.factor is None:
            return
        factors = PerDevice(self.factor)
        for device, grads in by_device.items():
            flag = self.found_inf_per_device.get(device) if skip_on_found_inf else None
            scale_grads_(grads, factors.get(device), flag)


def clipping_enabled(max_norm: Optional[float]) -> bool:
    """Whether ``max_norm`` asks for clipping at all (None, 0 and inf do not)."""
    return max_norm is not None and 0 < float(max_norm) < math.inf


def clip_gradients(
    by_device: Dict[torch.device, List[Tensor]],
    max_norm: Optional[float],
    *,
    inv_scale: Optional[Tensor] = None,
    home: Optional[torch.device] = None,
    reduce: Optional[Reduce] = None,
    error_if_nonfinite: bool = False,
) -> ClipResult:
    """The one clip routine: norm + found_inf of ``g * inv_scale`` in one read per device, reduced
    across devices (and across ranks by ``reduce``), then the clip coefficient and the combined factor.
    Writes nothing: see :meth:`ClipResult.apply_`.

    ``home`` is where the total norm and the global flag live (default: the first grads' device, else
    the CPU). ``error_if_nonfinite=True`` raises as ``torch.nn.utils.clip_grad_norm_`` does (a host sync).
    """
    if home is None:
        home = inv_scale.device if inv_scale is not None else next(iter(by_device), torch.device("cpu"))
    inv_scales = PerDevice(inv_scale) if inv_scale is not None else None
    flags: Dict[torch.device, Tensor] = {}
    norms: List[Tensor] = []
    with torch.no_grad():
        for device, grads in by_device.items():
            flags[device] = torch.zeros((), dtype=torch.float32, device=device)
            norms.append(norm_and_check(grads, inv_scales.get(device) if inv_scales else None, flags[device]))
        if not norms:
            total_norm = torch.zeros((), dtype=torch.float32, device=home)
        elif len(norms) == 1:
            total_norm = norms[0].to(home, non_blocking=True)
        else:
            total_norm = torch.stack([n.to(home, non_blocking=True) for n in norms]).norm()
        if not flags:
            found_inf = torch.zeros((), dtype=torch.float32, device=home)
        elif len(flags) == 1:
            found_inf = next(iter(flags.values())).to(home, non_blocking=True)
        else:
            found_inf = torch.stack([f.to(home, non_blocking=True) for f in flags.values()]).amax()
        if reduce is not None:
            total_norm, found_inf = reduce(total_norm, found_inf)
        if error_if_nonfinite and bool(torch.logical_or(total_norm.isnan(), total_norm.isinf())):
            raise RuntimeError(
                "The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot be "
                "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
                "`error_if_nonfinite=False`"
            )
        coef = ops.clip_coef(total_norm, float(max_norm)).float() if clipping_enabled(max_norm) else None
        if coef is None:
            factor = inv_scale
        else:
            factor = coef if inv_scale is None else inv_scale * coef
    per_device = {d: (found_inf if d == found_inf.device else found_inf.to(d, non_blocking=True)) for d in flags}
    return ClipResult(total_norm, found_inf, per_device, coef, factor)
