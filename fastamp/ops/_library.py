"""The fastamp operator library: schemas (inferred from the reference, here) and fake kernels.

The fake kernels validate their inputs exactly as the real ones do (so a bad call fails at trace
time and on the meta device too) and return correctly shaped outputs.

The C++ extension ``fastamp._C`` registers CPU and CUDA kernels for these schemas. Any dispatch key
left without a kernel (no extension, or an extension built without CUDA) gets the pure-PyTorch
reference from :mod:`fastamp.ops._reference` instead; :func:`fastamp.build_info` says which.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _reference as ref
from ._reference import norm_dtype

__all__ = ["FAKES", "LIBRARY", "MUTATES", "OP_NAMES", "SCHEMAS"]

LIBRARY = torch.library.Library("fastamp", "DEF")

# Each op is stated once, by its reference implementation's signature (names, types, defaults): the
# schema is inferred from it, with these arguments marked as written. The mutation annotations are what
# torch.compile's functionalization and torch.library.opcheck rely on. tests/ops/test_signatures.py
# holds the wrapper, the fake kernel and the C++ registrations to the same signature.
MUTATES = {
    "unscale_check_": ("grads", "found_inf"),
    "grad_norm": ("found_inf",),
    "unscale_check_norm_": ("grads", "found_inf"),
    "clip_coef": (),
    "clip_norm": ("found_inf",),
    "scale_": ("tensors",),
    "update_scale_": ("scale", "growth_tracker", "hysteresis_tracker"),
}


def _inferred_schema(name: str) -> str:
    # The kernels take int64_t: plain ints, not the symbolic ints infer_schema offers for traced shapes.
    # Defaults stay with the Python functions (the schema language cannot say inf); callers pass every argument.
    schema = torch.library.infer_schema(getattr(ref, name), mutates_args=MUTATES[name]).replace("SymInt ", "int ")
    return name + re.sub(r"=[^,)]*", "", schema)


SCHEMAS = {name: _inferred_schema(name) for name in MUTATES}
OP_NAMES = tuple(SCHEMAS)

for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)


# grad_norm([], None, None) names no device, so the dispatcher finds no backend key: this kernel answers
# it (zero on CPU, as torch.linalg.vector_norm of an empty tensor). Backend kernels take every other call.
LIBRARY.impl("grad_norm", ref.grad_norm, "CompositeExplicitAutograd")
LIBRARY.impl("clip_norm", ref.clip_norm, "CompositeExplicitAutograd")


def _norm_outputs(grads: List[Tensor], per_tensor: bool, scalars: Tuple[Optional[Tensor], ...]) -> Tuple[Tensor, Tensor]:
    """Outputs shaped as the kernels return them; an empty list's are on its first scalar's device."""
    like = next((t for t in (*grads[:1], *scalars) if t is not None), None)
    if like is None:
        like = torch.empty(())
    dtype = norm_dtype(grads)
    return like.new_empty((), dtype=dtype), like.new_empty((len(grads) if per_tensor else 0,), dtype=dtype)


@torch.library.register_fake("fastamp::unscale_check_")
def _unscale_check_fake(grads: List[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    ref.validate_unscale_check("unscale_check_", grads, found_inf, inv_scale, written=False)


@torch.library.register_fake("fastamp::grad_norm")
def _grad_norm_fake(
    grads: List[Tensor], inv_scale: Optional[Tensor], found_inf: Optional[Tensor], per_tensor: bool
) -> Tuple[Tensor, Tensor]:
    ref.validate_grad_norm(grads, inv_scale, found_inf)
    return _norm_outputs(grads, per_tensor, (inv_scale, found_inf))


@torch.library.register_fake("fastamp::unscale_check_norm_")
def _unscale_check_norm_fake(
    grads: List[Tensor], found_inf: Tensor, inv_scale: Tensor, per_tensor: bool
) -> Tuple[Tensor, Tensor]:
    ref.validate_unscale_check("unscale_check_norm_", grads, found_inf, inv_scale, written=False)
    return _norm_outputs(grads, per_tensor, (found_inf,))


@torch.library.register_fake("fastamp::clip_coef")
def _clip_coef_fake(total_norm: Tensor, max_norm: float, eps: float) -> Tensor:
    ref.validate_clip_coef(total_norm, max_norm, eps)
    return total_norm.new_empty(())


@torch.library.register_fake("fastamp::clip_norm")
def _clip_norm_fake(
    grads: List[Tensor], max_norm: float, inv_scale: Optional[Tensor], found_inf: Optional[Tensor], per_tensor: bool,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    ref.validate_clip_norm(grads, max_norm, inv_scale, found_inf, eps)
    total, per = _norm_outputs(grads, per_tensor, (inv_scale, found_inf))
    return total, per, total.new_empty((), dtype=torch.float32), total.new_empty((), dtype=torch.float32)


@torch.library.register_fake("fastamp::scale_")
def _scale_fake(tensors: List[Tensor], factor: Tensor, found_inf: Optional[Tensor]) -> None:
    ref.validate_scale(tensors, factor, found_inf, written=False)


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
    ref.validate_update_scale(scale, growth_tracker, found_inf, hysteresis, hysteresis_tracker, min_scale, max_scale)


FAKES = {
    "unscale_check_": _unscale_check_fake,
    "grad_norm": _grad_norm_fake,
    "unscale_check_norm_": _unscale_check_norm_fake,
    "clip_coef": _clip_coef_fake,
    "clip_norm": _clip_norm_fake,
    "scale_": _scale_fake,
    "update_scale_": _update_scale_fake,
}
