"""Tensor-Core alignment: GEMM timing (aligned vs unaligned shapes), a model alignment audit, and
padded Linear layers that compute the same function on aligned GEMMs.

Tensor Cores run fp16/bf16 GEMMs at full speed when every GEMM dimension is a multiple of 8 elements
(16 bytes; fp8: 16 elements), and cuBLAS picks its best kernels for multiples of 64-128. A vocabulary
of 50257 or a hidden size of 770 misses that; padding to 50304 or 776 costs a few % more FLOPs and can
be much faster. :func:`benchmark_gemm` measures that on the machine at hand, :func:`audit_model` lists
the layers of a model that miss the alignment, and :func:`pad_linear_` fixes them in place.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._plots import pyplot

__all__ = [
    "ALIGNMENT",
    "CPU_SHAPES",
    "DEFAULT_SHAPES",
    "PEAK_TFLOPS",
    "AlignedLinear",
    "AuditEntry",
    "GemmResult",
    "align_up",
    "audit_model",
    "benchmark_gemm",
    "format_gemm_table",
    "pad_linear_",
    "peak_tflops",
    "plot_gemm",
]

# Elements each GEMM dimension should be a multiple of for Tensor Cores (16 bytes of the dtype).
ALIGNMENT: Dict[str, int] = {"fp32": 4, "tf32": 4, "fp16": 8, "bf16": 8, "fp8": 16}

# Published dense (no sparsity) peak TFLOP/s per dtype: NVIDIA data sheets. tf32 is the Tensor Core
# rate; fp32 the CUDA-core rate.
PEAK_TFLOPS: Dict[str, Dict[str, float]] = {
    "V100": {"fp32": 15.7, "fp16": 125.0},
    "T4": {"fp32": 8.1, "fp16": 65.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "fp16": 125.0, "bf16": 125.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0, "fp8": 242.5},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "fp16": 362.0, "bf16": 362.0, "fp8": 733.0},
    "H100 SXM": {"fp32": 67.0, "tf32": 494.5, "fp16": 989.5, "bf16": 989.5, "fp8": 1979.0},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0, "fp8": 1513.0},
    "H200": {"fp32": 67.0, "tf32": 494.5, "fp16": 989.5, "bf16": 989.5, "fp8": 1979.0},
    "B200": {"fp32": 80.0, "tf32": 1100.0, "fp16": 2250.0, "bf16": 2250.0, "fp8": 4500.0},
    "RTX 3090": {"fp32": 35.6, "tf32": 35.6, "fp16": 71.0, "bf16": 71.0},
    "RTX 4090": {"fp32": 82.6, "tf32": 82.6, "fp16": 165.2, "bf16": 165.2, "fp8": 330.3},
}

# (M, N, K) pairs the notebook and GPT-style models hit: LM heads over a 50257 vocabulary, hidden sizes
# one off a power of two.
DEFAULT_SHAPES: List[Tuple[int, int, int]] = [
    (4096, 50257, 768),
    (4096, 4095, 4095),
    (8192, 770, 768),
    (2048, 3000, 1000),
]

# The same kinds of shape at a size a CPU times in about half a minute (``fastamp gemm --device cpu``);
# ``--full`` takes DEFAULT_SHAPES there too.
CPU_SHAPES: List[Tuple[int, int, int]] = [
    (512, 12565, 768),
    (2048, 2047, 2047),
    (4096, 770, 768),
]

_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "fp8": torch.float8_e4m3fn if hasattr(torch, "float8_e4m3fn") else None}


def align_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= n."""
    return ((int(n) + multiple - 1) // multiple) * multiple


def peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    """Published dense peak for this GPU and dtype, or None when the GPU is not in :data:`PEAK_TFLOPS`."""
    name = device_name.upper().replace("NVIDIA", "").replace("GEFORCE", "").strip()
    # Longest key first: "H100 PCIe" before "H100"; SXM is the default H100.
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        parts = key.upper().split()
        if all(part in name for part in parts):
            return PEAK_TFLOPS[key].get(dtype)
    if "H100" in name:
        return PEAK_TFLOPS["H100 SXM"].get(dtype)
    return None


def _fp8_supported(device: torch.device) -> bool:
    if device.type != "cuda" or _DTYPES["fp8"] is None or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass
class GemmResult:
    m: int
    n: int
    k: int
    dtype: str
    aligned_to: Optional[int]  # None: the original shape; else the multiple the dims were rounded up to
    median_ms: float
    tflops: float
    pct_of_peak: Optional[float]
    device: str


def _timed_gemm(m: int, n: int, k: int, dtype: str, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of one (m x k) @ (k x n) product."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    if dtype == "fp8":
        a = torch.randn(m, k, generator=gen).to(device).to(_DTYPES["fp8"])
        b = torch.randn(n, k, generator=gen).to(device).to(_DTYPES["fp8"]).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device)

        def run() -> Any:
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        a = torch.randn(m, k, generator=gen).to(device=device, dtype=_DTYPES[dtype])
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=_DTYPES[dtype])

        def run() -> Any:
            return a @ b

    tf32_before = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        for _ in range(warmup):
            run()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            events = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                events.append((start, end))
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) / 1e3 for s, e in events]
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
    finally:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32_before
    return statistics.median(times)


def benchmark_gemm(
    shapes: Sequence[Tuple[int, int, int]] = DEFAULT_SHAPES,
    dtypes: Optional[Sequence[str]] = None,
    device: Optional[str] = None,
    multiples: Sequence[int] = (8, 16, 64, 128),
    repeats: Optional[int] = None,
    warmup: int = 3,
    progress: Optional[Callable[[str], None]] = None,
) -> List[GemmResult]:
    """Time each (M, N, K) GEMM as given and with every dimension rounded up to each multiple.

    dtypes: ``fp32``, ``tf32``, ``fp16``, ``bf16``, ``fp8`` (e4m3 through ``torch._scaled_mm``, on GPUs of
    compute capability 8.9+; fp8 dims are aligned to at least 16). Default: all the device supports
    (CPU: fp32 and bf16). CUDA timing uses events; CPU uses perf_counter (GFLOP/s = TFLOP/s x 1000).
    ``pct_of_peak`` is relative to :data:`PEAK_TFLOPS` for known GPUs, else None. ``progress`` is called
    with a line before each GEMM is timed.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes is None:
        if dev.type == "cuda":
            dtypes = ["fp32", "tf32", "fp16", "bf16"] + (["fp8"] if _fp8_supported(dev) else [])
        else:
            dtypes = ["fp32", "bf16"]
    for d in dtypes:
        if d not in _DTYPES:
            raise ValueError(f"fastamp.gemm: unknown dtype {d!r}; choose from {sorted(_DTYPES)}")
        if d == "fp8" and not _fp8_supported(dev):
            raise ValueError(f"fastamp.gemm: fp8 GEMMs need a CUDA GPU of compute capability 8.9+ (device: {dev})")
        if d == "tf32" and dev.type != "cuda":
            raise ValueError("fastamp.gemm: tf32 is a CUDA Tensor Core mode; on CPU use fp32")
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    results = []
    for m, n, k in shapes:
        for dtype in dtypes:
            variants: List[Tuple[Optional[int], Tuple[int, int, int]]] = [(None, (m, n, k))]
            for multiple in multiples:
                if dtype == "fp8":
                    multiple = max(multiple, 16)
                aligned = (align_up(m, multiple), align_up(n, multiple), align_up(k, multiple))
                if all(a == b for a, b in zip(aligned, (m, n, k))) and multiple != multiples[0]:
                    continue
                variants.append((multiple, aligned))
            if dtype == "fp8":  # _scaled_mm needs dims that are multiples of 16: no unaligned fp8 GEMM
                variants = [v for v in variants if v[0] is not None]
            for aligned_to, (mm, nn_, kk) in variants:
                if progress is not None:
                    progress(f"{m}x{n}x{k} {dtype}" + (f" aligned to {aligned_to}" if aligned_to else "") + " ...")
                n_repeats = repeats or (20 if dev.type == "cuda" else 3)
                seconds = _timed_gemm(mm, nn_, kk, dtype, dev, n_repeats, warmup if dev.type == "cuda" else 1)
                # FLOPs of the original problem: padding is overhead, not useful work.
                tflops = 2.0 * m * n * k / seconds / 1e12
                peak = peak_tflops(device_name, dtype) if dev.type == "cuda" else None
                results.append(GemmResult(m, n, k, dtype, aligned_to, seconds * 1e3, tflops,
                                          100.0 * tflops / peak if peak else None, device_name))
    return results


def format_gemm_table(results: Sequence[GemmResult]) -> str:
    """Aligned vs unaligned table: useful TFLOP/s (GFLOP/s on CPU) and speedup over the original shape."""
    cpu = bool(results) and results[0].device == "cpu"
    unit = "GFLOP/s" if cpu else "TFLOP/s"
    scale = 1e3 if cpu else 1.0
    lines = [f"{'M x N x K':>22} {'dtype':5} {'shape':>22} {'ms':>9} {unit:>9} {'% peak':>7} {'speedup':>8}"]
    base: Dict[Tuple[int, int, int, str], GemmResult] = {}
    for r in results:
        key = (r.m, r.n, r.k, r.dtype)
        if r.aligned_to is None:
            base[key] = r
        original = base.get(key)
        mult = r.aligned_to or 1
        shape = "as given" if r.aligned_to is None else \
            f"x{r.aligned_to}: {align_up(r.m, mult)}x{align_up(r.n, mult)}x{align_up(r.k, mult)}"
        speedup = f"{original.median_ms / r.median_ms:.2f}x" if original else "-"
        peak = f"{r.pct_of_peak:.0f}%" if r.pct_of_peak is not None else "unknown" if not cpu else "-"
        lines.append(f"{f'{r.m}x{r.n}x{r.k}':>22} {r.dtype:5} {shape:>22} {r.median_ms:9.3f} "
                     f"{r.tflops * scale:9.1f} {peak:>7} {speedup:>8}")
    return "\n".join(lines)


def plot_gemm(results: Sequence[GemmResult], path: str) -> str:
    """Bar chart of useful TFLOP/s, original vs aligned shapes, per GEMM and dtype (needs matplotlib)."""
    plt = pyplot("plot_gemm")
    groups = list(dict.fromkeys((r.m, r.n, r.k, r.dtype) for r in results))
    variants = list(dict.fromkeys(r.aligned_to for r in results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        xs, ys = [], []
        for g, key in enumerate(groups):
            r = next((r for r in results if (r.m, r.n, r.k, r.dtype) == key and r.aligned_to == variant), None)
            if r is not None:
                xs.append(g + i * width)
                ys.append(r.tflops)
        ax.bar(xs, ys, width, label="as given" if variant is None else f"aligned to {variant}")
    ax.set_xticks([g + width * (len(variants) - 1) / 2 for g in range(len(groups))],
                  [f"{m}x{n}x{k}\n{d}" for m, n, k, d in groups], fontsize=8)
    ax.set_ylabel("useful TFLOP/s" if results and results[0].device != "cpu" else "useful TFLOP/s (CPU)")
    ax.set_title(f"GEMM: original vs Tensor-Core-aligned shapes ({results[0].device if results else ''})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- model audit and padding ------------------------------------------------------------------------


@dataclass
class AuditEntry:
    """One weight whose GEMM dimensions miss the alignment."""

    name: str
    kind: str  # "Linear", "Embedding", "Conv2d", ...
    dims: Dict[str, int]  # the GEMM dimensions that matter, e.g. {"in_features": 770, "out_features": 50257}
    misaligned: Dict[str, int]  # dimension -> padded size to use
    multiple: int
    estimated_speedup: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _gemm_dims(module: nn.Module) -> Optional[Tuple[str, Dict[str, int]]]:
    if isinstance(module, nn.Linear):
        return "Linear", {"in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.Embedding):
        # Tied LM heads multiply by the embedding matrix: its rows are a GEMM dimension.
        return "Embedding", {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim}
    if isinstance(module, nn.modules.conv._ConvNd):
        # Implicit GEMM: K = in_channels / groups * kernel volume, N = out_channels; channels are what
        # can be padded.
        return type(module).__name__, {"in_channels": module.in_channels // module.groups,
                                       "out_channels": module.out_channels}
    return None


def audit_model(
    model: nn.Module,
    multiple: Optional[int] = None,
    dtype: str = "fp16",
    measurements: Optional[Sequence[GemmResult]] = None,
) -> List[AuditEntry]:
    """Linear, Embedding and conv layers whose GEMM dimensions are not multiples of ``multiple``
    (default: what ``dtype`` wants, :data:`ALIGNMENT`: 8 for fp16/bf16, 16 for fp8), with the padded size
    to use. With ``measurements`` from :func:`benchmark_gemm`, each entry carries the speedup measured for
    that dtype and multiple (the median over the measured shapes), as an estimate."""
    if multiple is None:
        if dtype not in ALIGNMENT:
            raise ValueError(f"fastamp.gemm: unknown dtype {dtype!r}; choose from {sorted(ALIGNMENT)}")
        multiple = ALIGNMENT[dtype]
    estimate = None
    if measurements:
        by_shape: Dict[Tuple[int, int, int], Dict[Optional[int], float]] = {}
        for r in measurements:
            if r.dtype == dtype:
                by_shape.setdefault((r.m, r.n, r.k), {})[r.aligned_to] = r.median_ms
        speedups = [t[None] / t[multiple] for t in by_shape.values() if None in t and multiple in t]
        estimate = statistics.median(speedups) if speedups else None
    entries = []
    for name, module in model.named_modules():
        found = _gemm_dims(module)
        if found is None:
            continue
        kind, dims = found
        misaligned = {d: align_up(v, multiple) for d, v in dims.items() if v % multiple}
        if misaligned:
            entries.append(AuditEntry(name, kind, dims, misaligned, multiple, estimate))
    return entries


class AlignedLinear(nn.Module):
    """A Linear layer stored padded to aligned sizes: zero-padded inputs and outputs, sliced back.

    ``y = x @ W.T + b`` with ``W`` of shape (out, in) is computed as ``pad(x) @ W_pad.T + b_pad`` and the
    first ``out_features`` columns are returned. The padding is zero and receives zero gradient (kept at
    zero), so outputs and gradients equal the original layer's in fp32 (up to the summation order of the
    GEMM). ``weight``/``bias`` views give the unpadded parameters' values.
    """

    def __init__(self, linear: nn.Linear, multiple: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features, self.multiple = linear.in_features, linear.out_features, multiple
        self.in_padded = align_up(linear.in_features, multiple)
        self.out_padded = align_up(linear.out_features, multiple)
        w = linear.weight.detach()
        padded = w.new_zeros(self.out_padded, self.in_padded)
        padded[: self.out_features, : self.in_features] = w
        self.weight_padded = nn.Parameter(padded, requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            b = linear.bias.detach().new_zeros(self.out_padded)
            b[: self.out_features] = linear.bias.detach()
            self.bias_padded = nn.Parameter(b, requires_grad=linear.bias.requires_grad)
        else:
            self.register_parameter("bias_padded", None)
        # Keep the padding exactly zero: its gradient is zeroed as it is produced.
        self.weight_padded.register_hook(self._mask_weight_grad)
        if self.bias_padded is not None:
            self.bias_padded.register_hook(self._mask_bias_grad)

    def _mask_weight_grad(self, grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[self.out_features :, :] = 0
        grad[:, self.in_features :] = 0
        return grad

    def _mask_bias_grad(self, grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[self.out_features :] = 0
        return grad

    @property
    def weight(self) -> Tensor:
        return self.weight_padded[: self.out_features, : self.in_features]

    @property
    def bias(self) -> Optional[Tensor]:
        return None if self.bias_padded is None else self.bias_padded[: self.out_features]

    def forward(self, x: Tensor) -> Tensor:
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        return F.linear(x, self.weight_padded, self.bias_padded)[..., : self.out_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (padded {self.in_padded}), out_features={self.out_features} "
                f"(padded {self.out_padded}), bias={self.bias_padded is not None}")


def pad_linear_(model: nn.Module, multiple: int = 8, min_features: int = 64) -> List[str]:
    """Replace, in place, every ``nn.Linear`` whose sizes miss ``multiple`` (and that is at least
    ``min_features`` wide: tiny layers gain nothing) with an :class:`AlignedLinear`. Returns the names
    of the replaced layers. Create the optimizer after padding (the parameters are new)."""
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            if child.in_features % multiple == 0 and child.out_features % multiple == 0:
                continue
            if max(child.in_features, child.out_features) < min_features:
                continue
            setattr(module, child_name, AlignedLinear(child, multiple))
            replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced
