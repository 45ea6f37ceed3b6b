"""The fastamp operator library: schemas (defined once, here) and fake kernels.

The C++ extension ``fastamp._C`` registers CPU and CUDA kernels for these schemas. Any dispatch key
left without a kernel (no extension, or an extension built without CUDA) gets the pure-PyTorch
reference from :mod:`fastamp.ops._reference` instead; :func:`fastamp.build_info` says which.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["LIBRARY", "OP_NAMES", "SCHEMAS", "norm_dtype"]

LIBRARY = torch.library.Library("fastamp", "DEF")

# Mutation annotations ((a!) etc.) say exactly which arguments an op writes; torch.compile's
# functionalization and torch.library.opcheck rely on them.
SCHEMAS = {
    "unscale_check_": "unscale_check_(Tensor(a!)[] grads, Tensor(b!) found_inf, Tensor inv_scale) -> ()",
    "grad_norm": (
        "grad_norm(Tensor[] grads, Tensor? inv_scale, Tensor(a!)? found_inf, bool per_tensor) -> (Tensor, Tensor)"
    ),
    "unscale_check_norm_": (
        "unscale_check_norm_(Tensor(a!)[] grads, Tensor(b!) found_inf, Tensor inv_scale, bool per_tensor)"
        " -> (Tensor, Tensor)"
    ),
    "clip_coef": "clip_coef(Tensor total_norm, float max_norm, float eps) -> Tensor",
    "scale_": "scale_(Tensor(a!)[] tensors, Tensor factor, Tensor? found_inf) -> ()",
    "update_scale_": (
        "update_scale_(Tensor(a!) scale, Tensor(b!) growth_tracker, Tensor found_inf, float growth_factor,"
        " float backoff_factor, int growth_interval, int hysteresis, Tensor(c!)? hysteresis_tracker,"
        " float min_scale, float max_scale) -> ()"
    ),
}
OP_NAMES = tuple(SCHEMAS)

for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)


def norm_dtype(tensors: List[Tensor]) -> torch.dtype:
    """dtype of a norm over ``tensors``: float64 if any tensor is float64 (accumulated in fp64), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _norm_outputs(grads: List[Tensor], per_tensor: bool) -> Tuple[Tensor, Tensor]:
    dtype = norm_dtype(grads)
    total = grads[0].new_empty((), dtype=dtype)
    per = grads[0].new_empty((len(grads) if per_tensor else 0,), dtype=dtype)
    return total, per


@torch.library.register_fake("fastamp::unscale_check_")
def _unscale_check_fake(grads: List[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    return None


@torch.library.register_fake("fastamp::grad_norm")
def _grad_norm_fake(
    grads: List[Tensor], inv_scale: Optional[Tensor], found_inf: Optional[Tensor], per_tensor: bool
) -> Tuple[Tensor, Tensor]:
    return _norm_outputs(grads, per_tensor)


@torch.library.register_fake("fastamp::unscale_check_norm_")
def _unscale_check_norm_fake(
    grads: List[Tensor], found_inf: Tensor, inv_scale: Tensor, per_tensor: bool
) -> Tuple[Tensor, Tensor]:
    if not grads:
        total = found_inf.new_empty((), dtype=torch.float32)
        return total, found_inf.new_empty((0,), dtype=torch.float32)
    return _norm_outputs(grads, per_tensor)


@torch.library.register_fake("fastamp::clip_coef")
def _clip_coef_fake(total_norm: Tensor, max_norm: float, eps: float) -> Tensor:
    return total_norm.new_empty(())


@torch.library.register_fake("fastamp::scale_")
def _scale_fake(tensors: List[Tensor], factor: Tensor, found_inf: Optional[Tensor]) -> None:
    return None


@torch.library.register_fake("fastamp::update_scale_")
def _update_scale_fake(
    scale: Tensor,
    growth_tracker: Tensor,
    found_inf: Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    hysteresis: int,
    hysteresis_tracker: Optional[Tensor],
    min_scale: float,
    max_scale: float,
) -> None:
    return None
