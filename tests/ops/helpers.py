"""What the op tests share: awkward sizes, dtypes and their tolerances, bitwise comparison, oracles."""

from __future__ import annotations

import pytest
import torch

from fastamp import ops

# Sizes around the 64K-element chunk boundary of the kernels, and the 16-lane inner loop.
SIZES = [0, 1, 15, 16, 17, 65535, 65536, 65537, 131073]
GRAD_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
# Relative error of a norm against the fp64 oracle: fp32 sums per 64K chunk on CPU (cascaded in
# 1K-element sub-blocks), per block on CUDA, then fp64 across chunks; fp64 all the way for fp64 grads.
NORM_RTOL = {"cpu": 2e-6, "cuda": 5e-6}


def norm_rtol(dtype: torch.dtype, device: str) -> float:
    return 1e-12 if dtype == torch.float64 else NORM_RTOL[torch.device(device).type]


def supported(dtype: torch.dtype, device: str) -> bool:
    """fp64 gradients are a CPU-only feature of the kernels (and of the reference, which mirrors them)."""
    return dtype in ops.kernel_dtypes(device)


def skip_unless_supported(dtype: torch.dtype, device: str) -> None:
    if not supported(dtype, device):
        pytest.skip(f"{dtype} is not taken on {device}")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bitwise_equal(actual, expected):
    """Bit-identical, except that any NaN matches any NaN (PyTorch's own scalar and vectorized bf16
    conversions disagree on the NaN bit pattern)."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        nan = a.isnan()
        assert torch.equal(nan, e.isnan()), f"tensor {i}: NaNs differ"
        assert torch.equal(bits(a)[~nan], bits(e)[~nan]), f"tensor {i} differs"


def opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_grads(sizes, dtype=torch.float32, magnitude=100.0, device="cpu"):
    """Normal values drawn on the CPU (the same on every device), then moved."""
    return [(torch.randn(n, dtype=torch.float64) * magnitude).to(device=device, dtype=dtype) for n in sizes]


def unscaled_by_hand(g, inv):
    """g * inv in opmath, rounded once: the documented semantics."""
    a = opmath(g.dtype)
    if inv == 1.0:
        return g.clone()
    return (g.to(a) * torch.tensor(inv, dtype=torch.float32).to(a)).to(g.dtype)


def clone_all(tensors):
    return [t.clone() for t in tensors]


def flags(device="cpu"):
    return torch.zeros(1, device=device), torch.zeros(1, device=device)


def norm_by_torch(grads, inv=1.0):
    flat = torch.cat([g.to(torch.float64).flatten() for g in grads]) if grads else torch.zeros(0, dtype=torch.float64)
    return torch.linalg.vector_norm(flat * inv)


def fresh_state(scale, device="cpu"):
    return torch.full((1,), scale, dtype=torch.float32, device=device), torch.zeros(1, dtype=torch.int32, device=device)
