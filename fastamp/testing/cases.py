"""What ``fastamp check``, the op tests and ``make gpu-check`` share to judge an op: the awkward inputs,
one bitwise comparator, one tolerance table per (device, dtype, op), the kernels' chunk size (read from
the built extension), and the two implementations an op test runs (kernel and reference)."""

from __future__ import annotations

import math
import types
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from .._extension import extension_status
from ..ops import _reference as reference

__all__ = [
    "GRAD_DTYPES",
    "IMPLEMENTATIONS",
    "MIXED_DTYPES",
    "NORM_OPS",
    "assert_bitwise_equal",
    "chunk_size",
    "clones",
    "grad_cases",
    "relative_error",
    "same_bits",
    "sizes_around_chunks",
    "tolerance",
]

GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MIXED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NORM_OPS = ("grad_norm", "unscale_check_norm_")
_DEFAULT_CHUNK = 65536  # the kernels' value, for a process that runs the reference only
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}

# Relative error of a norm against the fp64 oracle: fp32 sums per chunk (cascaded in 1K sub-blocks on
# CPU, a block's tree on CUDA), then fp64 across chunks; fp64 all the way for fp64 grads. Every other op
# is exact: bit for bit (tolerance 0).
_NORM_RTOL = {"cpu": 2e-6, "cuda": 5e-6}


def tolerance(op: str, device: str, dtype: torch.dtype) -> float:
    """Relative error allowed for ``op``'s result on ``device`` with ``dtype`` grads; 0 means bitwise."""
    if op not in NORM_OPS:
        return 0.0
    if dtype == torch.float64:
        return 1e-12
    return _NORM_RTOL[torch.device(device).type]


def chunk_size() -> int:
    """Elements per chunk of the compiled kernels (``fastamp._C.chunk_size``)."""
    return int(extension_status().get("chunk_size") or _DEFAULT_CHUNK)


def sizes_around_chunks() -> List[int]:
    """Sizes that end just before, at and after chunk boundaries, and at the 16-lane inner loop."""
    c = chunk_size()
    return [0, 1, 15, 16, 17, c - 1, c, c + 1, 2 * c + 1]


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit-identical, except that any NaN matches any NaN (PyTorch's own scalar and vectorized bf16
    conversions disagree on the NaN bit pattern, so payloads are not part of any op's contract)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach(), b.detach()
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    view = _INT_VIEW.get(a.dtype)
    if view is None:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(view)[~nan], b.contiguous().view(view)[~nan])


def assert_bitwise_equal(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> None:
    """:func:`same_bits` for each pair, naming the first tensor that differs."""
    assert len(actual) == len(expected), f"{len(actual)} tensors vs {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"tensor {i}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
        assert same_bits(a, e), f"tensor {i} differs"


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Largest relative error over finite expected values; inf where non-finite values disagree."""
    a, e = actual.double().reshape(-1), expected.double().reshape(-1)
    if a.shape != e.shape:
        return math.inf
    if not bool(((a.isnan() == e.isnan()) & (a.isinf() == e.isinf())).all()):
        return math.inf
    finite = torch.isfinite(e)
    if not bool(finite.any()):
        return 0.0 if bool((a[~finite] == e[~finite]).all() | (a.isnan() & e.isnan()).all()) else math.inf
    diff = (a[finite] - e[finite]).abs() / e[finite].abs().clamp(min=1e-30)
    return float(diff.max())


def _values(n: int, dtype: torch.dtype, device: str, generator: torch.Generator) -> Tensor:
    return (torch.randn(n, generator=generator) * 30).to(device=device, dtype=dtype)


def grad_cases(device: str, seed: int = 0) -> Iterator[Tuple[str, List[Tensor]]]:
    """Named lists of gradients covering the awkward cases (each call makes fresh tensors): sizes at
    vector and chunk boundaries, one element, empty tensors, 300 tensors, each dtype alone and mixed,
    fp64 (CPU), non-contiguous and misaligned views, nan/inf/-inf at the first and the last element."""
    g = torch.Generator().manual_seed(seed)
    c = chunk_size()

    def mixed(sizes: Sequence[int]) -> List[Tensor]:
        return [_values(n, MIXED_DTYPES[i % len(MIXED_DTYPES)], device, g) for i, n in enumerate(sizes)]

    yield "vector-boundaries", mixed([0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65])
    yield "chunk-boundaries", mixed([c - 1, c, c + 1, 2 * c + 3])
    yield "one-element", mixed([1])
    yield "empty-tensors", mixed([0, 0, 5, 0])
    yield "300-tensors", mixed(torch.randint(1, 700, (300,), generator=g).tolist())
    for dtype in MIXED_DTYPES:
        yield f"only-{str(dtype).replace('torch.', '')}", [_values(n, dtype, device, g) for n in (1000, 70001)]
    if device == "cpu":
        yield "float64", [_values(n, torch.float64, device, g) for n in (3, 70001)]
    base = _values(3 * 70000 + 8, torch.float16, device, g)
    matrix = _values(300 * 257, torch.float32, device, g).reshape(300, 257)
    yield "non-contiguous", [matrix.t(), matrix[:, ::2], _values(64 * 33, torch.bfloat16, device, g).reshape(64, 33)[1:, 3:]]
    yield "misaligned-views", [base[1:70001], base[70003:140010], base[140013:]]
    for where in ("first", "last"):
        for bad in ("nan", "inf", "-inf"):
            grads = mixed([17, c + 5, 33])
            target = grads[0] if where == "first" else grads[-1]
            target.view(-1)[0 if where == "first" else -1] = float(bad)
            yield f"{bad}-at-{where}-element", grads


def clones(grads: Sequence[Tensor]) -> List[Tensor]:
    """Copies with the same strides and storage offset (non-contiguity and misalignment preserved)."""
    out = []
    for t in grads:
        storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=t.device)
        if storage.numel():
            storage.copy_(torch.as_strided(t, (storage.numel(),), (1,), 0))
        out.append(torch.as_strided(storage, t.shape, t.stride(), t.storage_offset()))
    return out


def _reference_namespace() -> types.SimpleNamespace:
    """The reference with the public wrappers' return conventions (per-tensor norms None unless asked,
    update_scale_ returning the scale), so that one test body runs either implementation."""

    def grad_norm(grads, inv_scale=None, found_inf=None, per_tensor=False):
        if not grads:
            return ops.grad_norm(grads, inv_scale, found_inf, per_tensor)
        total, per = reference.grad_norm(grads, inv_scale, found_inf, per_tensor)
        return total, (per if per_tensor else None)

    def unscale_check_norm_(grads, found_inf, inv_scale, per_tensor=False):
        total, per = reference.unscale_check_norm_(grads, found_inf, inv_scale, per_tensor)
        return total, (per if per_tensor else None)

    def clip_norm(grads, max_norm, inv_scale=None, found_inf=None, per_tensor=False, eps=1e-6):
        if not grads:
            return ops.clip_norm(grads, max_norm, inv_scale, found_inf, per_tensor, eps)
        total, per, coef, factor = reference.clip_norm(grads, max_norm, inv_scale, found_inf, per_tensor, eps)
        return total, (per if per_tensor else None), coef, factor

    def update_scale_(scale, *args, **kwargs):
        reference.update_scale_(scale, *args, **kwargs)
        return scale

    return types.SimpleNamespace(unscale_check_=reference.unscale_check_, grad_norm=grad_norm,
                                 unscale_check_norm_=unscale_check_norm_, clip_coef=reference.clip_coef, clip_norm=clip_norm,
                                 scale_=reference.scale_, update_scale_=update_scale_)


IMPLEMENTATIONS: Dict[str, object] = {"kernel": ops, "reference": _reference_namespace()}
