"""Hand-computed expectations and input makers for the op tests, written with torch's own ops."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from .cases import tolerance

__all__ = ["bits", "clone_all", "flags", "fresh_state", "make_grads", "norm_by_torch", "norm_rtol", "opmath",
           "skip_unless_supported", "supported", "unscaled_by_hand"]

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


def norm_rtol(dtype: torch.dtype, device: str) -> float:
    """The norm ops' tolerance (see :func:`fastamp.testing.tolerance`)."""
    return tolerance("grad_norm", device, dtype)


def supported(dtype: torch.dtype, device: str) -> bool:
    """fp64 gradients are a CPU-only feature of the kernels (and of the reference, which mirrors them)."""
    return dtype in ops.kernel_dtypes(device)


def skip_unless_supported(dtype: torch.dtype, device: str) -> None:
    """Skip the calling test (pytest) where the kernels do not take ``dtype`` on ``device``."""
    if not supported(dtype, device):
        import pytest

        pytest.skip(f"{dtype} is not taken on {device}")


def bits(t: Tensor) -> Tensor:
    """The tensor's bit patterns as integers."""
    return t.contiguous().view(_INT_VIEW[t.dtype])


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_grads(sizes: Sequence[int], dtype: torch.dtype = torch.float32, magnitude: float = 100.0,
               device: str = "cpu") -> List[Tensor]:
    """Normal values drawn on the CPU (the same on every device), then moved."""
    return [(torch.randn(n, dtype=torch.float64) * magnitude).to(device=device, dtype=dtype) for n in sizes]


def unscaled_by_hand(g: Tensor, inv: float) -> Tensor:
    """g * inv in opmath, rounded once: the documented semantics."""
    a = opmath(g.dtype)
    if inv == 1.0:
        return g.clone()
    return (g.to(a) * torch.tensor(inv, dtype=torch.float32).to(a)).to(g.dtype)


def clone_all(tensors: Sequence[Tensor]) -> List[Tensor]:
    return [t.clone() for t in tensors]


def flags(device: str = "cpu") -> Tuple[Tensor, Tensor]:
    """Two zeroed found_inf flags (one per implementation)."""
    return torch.zeros(1, device=device), torch.zeros(1, device=device)


def norm_by_torch(grads: Sequence[Tensor], inv: float = 1.0) -> Tensor:
    """fp64 L2 norm of the concatenated grads times ``inv``, by torch.linalg.vector_norm."""
    flat = torch.cat([g.to(torch.float64).flatten() for g in grads]) if grads else torch.zeros(0, dtype=torch.float64)
    return torch.linalg.vector_norm(flat * inv)


def fresh_state(scale: float, device: str = "cpu") -> Tuple[Tensor, Tensor]:
    """A scale and a growth tracker as the scaler keeps them."""
    return torch.full((1,), scale, dtype=torch.float32, device=device), torch.zeros(1, dtype=torch.int32, device=device)
