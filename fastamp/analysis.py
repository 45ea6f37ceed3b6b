"""Precision analysis and the hardware report: which format a model should train in, and why.

* :func:`format_facts`: bits, range, smallest normal and subnormal, epsilon and decimal digits of
  fp64, fp32, tf32, fp16, bf16 and fp8 (e4m3, e5m2), from ``torch.finfo`` where PyTorch has the dtype.
* :class:`PrecisionAnalyzer`: the reference notebook's analyses (representable range, round-trip
  precision loss per magnitude range, gradient underflow, overflow threshold, recommended loss scale).
* :func:`analyze_gradients`: for a model's actual gradients, the fraction that would underflow (flush
  to zero), become subnormal or overflow in fp16 and bf16 at a given loss scale, and the power-of-two
  scale that keeps the most of them representable without overflow.
* :func:`hardware_report`: device, compute capability, Tensor Core generation, bf16/fp8 support,
  memory, versions, fastamp's kernels, and recommendations per GPU family, with reasons.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._plots import pyplot

__all__ = [
    "FORMATS",
    "FormatFacts",
    "PrecisionAnalyzer",
    "analyze_gradients",
    "format_facts",
    "hardware_report",
    "plot_gradient_histogram",
    "recommendations",
]


@dataclass(frozen=True)
class FormatFacts:
    name: str
    bits: int
    exponent_bits: int
    mantissa_bits: int  # explicit fraction bits
    max: float
    smallest_normal: float
    smallest_subnormal: float
    eps: float  # distance from 1.0 to the next representable number
    decimal_digits: float  # log10(2 ** (mantissa_bits + 1))
    torch_dtype: Optional[str]  # None for tf32 (a Tensor Core mode, stored as fp32)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


_LAYOUT = {  # name: (bits, exponent bits, mantissa bits, torch dtype attribute)
    "fp64": (64, 11, 52, "float64"),
    "fp32": (32, 8, 23, "float32"),
    "tf32": (19, 8, 10, None),
    "fp16": (16, 5, 10, "float16"),
    "bf16": (16, 8, 7, "bfloat16"),
    "fp8_e4m3": (8, 4, 3, "float8_e4m3fn"),
    "fp8_e5m2": (8, 5, 2, "float8_e5m2"),
}
FORMATS: Tuple[str, ...] = tuple(_LAYOUT)


def _ieee_facts(exponent_bits: int, mantissa_bits: int) -> Tuple[float, float, float, float]:
    bias = 2 ** (exponent_bits - 1) - 1
    smallest_normal = 2.0 ** (1 - bias)
    smallest_subnormal = 2.0 ** (1 - bias - mantissa_bits)
    largest = (2 - 2.0 ** -mantissa_bits) * 2.0**bias
    return largest, smallest_normal, smallest_subnormal, 2.0 ** -mantissa_bits


def format_facts(name: str) -> FormatFacts:
    """Facts of one format (``fp64``, ``fp32``, ``tf32``, ``fp16``, ``bf16``, ``fp8_e4m3``, ``fp8_e5m2``).
    From ``torch.finfo`` where PyTorch has the dtype; tf32 from its layout (fp32 range, 10-bit mantissa)."""
    if name not in _LAYOUT:
        raise ValueError(f"unknown format {name!r}; choose from {list(FORMATS)}")
    bits, e, m, attr = _LAYOUT[name]
    dtype = getattr(torch, attr, None) if attr else None
    if dtype is not None:
        info = torch.finfo(dtype)
        largest, normal, subnormal, eps = info.max, info.smallest_normal, float(info.smallest_normal) * info.eps, info.eps
        # finfo has no smallest subnormal; it is smallest_normal * eps for these formats.
    else:
        largest, normal, subnormal, eps = _ieee_facts(e, m)
    return FormatFacts(name, bits, e, m, float(largest), float(normal), float(subnormal), float(eps),
                       round(math.log10(2.0 ** (m + 1)), 2), attr)


def _round_trip(values: Tensor, name: str) -> Tensor:
    """Values after conversion to the format and back to fp32."""
    if name == "tf32":  # round the fp32 mantissa to 10 bits, nearest even
        bits = values.float().view(torch.int32)
        rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
        return torch.where(torch.isfinite(values), rounded.view(torch.float32), values)
    dtype = getattr(torch, _LAYOUT[name][3])
    return values.to(dtype).to(torch.float32)


class PrecisionAnalyzer:
    """The reference notebook's precision analyses, per format, on the CPU (deterministic).

    ``analyze()`` returns, for each format: ``representable_range`` (smallest/largest nonzero finite value
    of a log-spaced sweep after a round trip, dynamic range in dB, epsilon), ``precision_loss`` (relative
    round-trip error per magnitude range: mean, max, p95, p99), ``gradient_underflow`` (fraction of a
    1e-10..1e-1 sweep flushed to zero, the largest value that underflows, the recommended loss scale) and
    ``overflow`` (the smallest value of a 10..1e40 sweep that overflows, the largest safe one).
    """

    DEFAULT_RANGES = [(1e-8, 1e-6), (1e-6, 1e-4), (1e-4, 1e-2), (1e-2, 1.0), (1.0, 100.0)]

    def __init__(self, formats: Sequence[str] = ("fp32", "fp16", "bf16"), ranges=None, num_samples: int = 10000,
                 seed: int = 0) -> None:
        for f in formats:
            format_facts(f)  # validates
        self.formats = list(formats)
        self.ranges = list(ranges or self.DEFAULT_RANGES)
        self.num_samples = num_samples
        self.seed = seed

    def representable_range(self, name: str) -> Dict[str, float]:
        sweep = torch.logspace(-45, 38, 4000, dtype=torch.float64).float()
        back = _round_trip(sweep, name)
        ok = torch.isfinite(back) & (back != 0)
        low, high = float(back[ok].min()), float(back[ok].max())
        return {"min_representable": low, "max_representable": high,
                "dynamic_range_db": 20 * math.log10(high / low), "machine_epsilon": format_facts(name).eps}

    def precision_loss(self, name: str) -> Dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed)
        per_range = {}
        for low, high in self.ranges:
            x = torch.rand(self.num_samples, generator=gen, dtype=torch.float64) * (high - low) + low
            x = x.float()
            back = _round_trip(x, name)
            rel = ((back.double() - x.double()).abs() / x.double())[torch.isfinite(back)]
            per_range[f"{low:g}-{high:g}"] = {
                "mean_relative_error": float(rel.mean()), "max_relative_error": float(rel.max()),
                "p95_relative_error": float(rel.quantile(0.95)), "p99_relative_error": float(rel.quantile(0.99)),
                "flushed_to_zero": float((back == 0).double().mean()),
            }
        return per_range

    def gradient_underflow(self, name: str) -> Dict[str, Any]:
        sweep = torch.logspace(-10, -1, 1000, dtype=torch.float64).float()
        back = _round_trip(sweep, name)
        under = back == 0
        threshold = float(sweep[under].max()) if bool(under.any()) else None
        facts = format_facts(name)
        return {
            "underflow_rate": float(under.double().mean()),
            "subnormal_rate": float(((back != 0) & (back.abs() < facts.smallest_normal)).double().mean()),
            "underflow_threshold": threshold,
            "recommended_loss_scale": self.recommended_loss_scale(name, threshold),
        }

    @staticmethod
    def recommended_loss_scale(name: str, underflow_threshold: Optional[float]) -> Optional[float]:
        """The notebook's rule: bf16 and wider need no scaling (1.0); fp16 scales the largest underflowing
        gradient up to ~1e-3, clamped to [1, 65536], as a power of two."""
        if name in ("bf16", "fp32", "fp64", "tf32"):
            return 1.0
        if underflow_threshold is None:
            return 1.0
        scale = min(max(1e-3 / underflow_threshold, 1.0), 65536.0)
        return float(2 ** math.floor(math.log2(scale)))

    def overflow(self, name: str) -> Dict[str, Any]:
        sweep = torch.logspace(1, 40, 2000, dtype=torch.float64)
        back = _round_trip(sweep.float(), name) if name != "fp64" else sweep
        over = ~torch.isfinite(back) | ~torch.isfinite(sweep.float())
        return {
            "overflow_threshold": float(sweep[over].min()) if bool(over.any()) else None,
            "max_safe_value": float(sweep[~over].max()) if bool((~over).any()) else None,
            "format_max": format_facts(name).max,
        }

    def analyze(self) -> Dict[str, Dict[str, Any]]:
        return {
            name: {
                "facts": format_facts(name).as_dict(),
                "representable_range": self.representable_range(name),
                "precision_loss": self.precision_loss(name),
                "gradient_underflow": self.gradient_underflow(name),
                "overflow": self.overflow(name),
            }
            for name in self.formats
        }


def _gradients(model_or_grads: Union[nn.Module, Iterable[Tensor]]) -> List[Tensor]:
    if isinstance(model_or_grads, nn.Module):
        return [p.grad.detach() for p in model_or_grads.parameters() if p.grad is not None]
    return [g.detach() for g in model_or_grads if g is not None]


def analyze_gradients(
    model_or_grads: Union[nn.Module, Iterable[Tensor]],
    loss_scale: float = 1.0,
    formats: Sequence[str] = ("fp16", "bf16"),
) -> Dict[str, Any]:
    """What happens to these fp32 gradients (unscaled) if they are produced at ``loss_scale`` in each
    format: fractions of nonzero values that underflow to zero, become subnormal, or overflow to inf, and
    the best power-of-two loss scale for the format (the one that keeps the most values normal without
    any overflow, and the smallest such: the most headroom). Counts are exact over all elements (on the gradients'
    device, one read to the host).
    """
    grads = _gradients(model_or_grads)
    if not grads:
        raise ValueError("analyze_gradients: no gradients (run a backward pass first)")
    values = torch.cat([g.reshape(-1).float() for g in grads])
    values = values[torch.isfinite(values)]
    nonzero = values[values != 0].abs().double()
    total = max(1, nonzero.numel())
    log2 = torch.log2(nonzero)
    result: Dict[str, Any] = {"num_values": values.numel(), "num_nonzero": nonzero.numel(), "loss_scale": loss_scale,
                              "abs_min": float(nonzero.min()) if nonzero.numel() else 0.0,
                              "abs_max": float(nonzero.max()) if nonzero.numel() else 0.0, "formats": {}}
    for name in formats:
        facts = format_facts(name)
        converted = _round_trip((nonzero * loss_scale).float(), name).abs()  # rounding as the cast does
        underflow = float((converted == 0).double().sum()) / total
        subnormal = float(((converted > 0) & (converted < facts.smallest_normal)).double().sum()) / total
        overflow = float(torch.isinf(converted).double().sum()) / total
        # Best scale: the smallest power of two that keeps as many values normal as any scale can without
        # overflowing one (more would only spend headroom). Value i is normal from exponent need[i] up.
        if nonzero.numel():
            max_exponent = math.floor(math.log2(facts.max) - float(log2.max()))
            need = torch.ceil(math.log2(facts.smallest_normal) - log2)
            reachable = need[need <= max_exponent]
            best_exponent = min(max_exponent, max(0, int(reachable.max()) if reachable.numel() else 0))
            best = 2.0**best_exponent
            kept = float(((nonzero * best) >= facts.smallest_normal).double().sum()) / total
        else:
            best, kept = 1.0, 1.0
        result["formats"][name] = {
            "underflow_fraction": underflow,
            "subnormal_fraction": subnormal,
            "overflow_fraction": overflow,
            "normal_fraction": 1.0 - underflow - subnormal - overflow,
            "best_power_of_two_scale": best,
            "normal_fraction_at_best_scale": kept,
        }
    return result


def plot_gradient_histogram(model_or_grads: Union[nn.Module, Iterable[Tensor]], path: str,
                            loss_scale: float = 1.0) -> str:
    """Histogram of log2 |gradient| with the fp16 and bf16 subnormal/normal/overflow limits (matplotlib)."""
    plt = pyplot("plot_gradient_histogram")
    values = torch.cat([g.reshape(-1).float() for g in _gradients(model_or_grads)])
    values = values[torch.isfinite(values) & (values != 0)].abs().double() * loss_scale
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(torch.log2(values).numpy(), bins=120, color="0.5")
    for name, color in (("fp16", "tab:red"), ("bf16", "tab:blue")):
        f = format_facts(name)
        for value, style in ((f.smallest_subnormal, ":"), (f.smallest_normal, "--"), (f.max, "-")):
            ax.axvline(math.log2(value), color=color, linestyle=style, linewidth=1)
    ax.set(xlabel=f"log2 |gradient x {loss_scale:g}|", ylabel="count",
           title="gradient magnitudes vs fp16 (red) / bf16 (blue): subnormal, normal, max")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- hardware report ------------------------------------------------------------------------------

# (compute capability major, minor) -> (architecture, Tensor Core generation)
_ARCHITECTURES = {
    (7, 0): ("Volta", "1st generation (fp16)"),
    (7, 2): ("Volta", "1st generation (fp16)"),
    (7, 5): ("Turing", "2nd generation (fp16, int8)"),
    (8, 0): ("Ampere", "3rd generation (fp16, bf16, tf32)"),
    (8, 6): ("Ampere", "3rd generation (fp16, bf16, tf32)"),
    (8, 7): ("Ampere", "3rd generation (fp16, bf16, tf32)"),
    (8, 9): ("Ada Lovelace", "4th generation (fp16, bf16, tf32, fp8)"),
    (9, 0): ("Hopper", "4th generation (fp16, bf16, tf32, fp8; Transformer Engine)"),
    (10, 0): ("Blackwell", "5th generation (fp16, bf16, tf32, fp8, fp4)"),
    (12, 0): ("Blackwell", "5th generation (fp16, bf16, tf32, fp8, fp4)"),
}


def recommendations(capability: Optional[Tuple[int, int]]) -> Dict[str, Dict[str, str]]:
    """Precision, loss scaling and alignment advice for a GPU generation (None: CPU), each with its reason."""
    if capability is None:
        return {
            "precision": {"value": "bf16-mixed (or fp32)",
                          "reason": "CPUs have no Tensor Cores; bf16 autocast uses AVX-512-BF16/AMX where present "
                                    "and halves activation memory, while fp16 matmuls on CPU are slow"},
            "loss_scaling": {"value": "none", "reason": "bf16 has fp32's exponent range, so gradients do not underflow"},
            "alignment": {"value": "not critical", "reason": "CPU GEMMs are not tied to 8-element Tensor Core tiles"},
            "fused_ops": {"value": "fastamp CPU kernels", "reason": "memory-bound optimizer-side passes at "
                                                                    "memory speed; fused AdamW folds the clip"},
        }
    major, minor = capability
    if major < 7:
        return {"precision": {"value": "fp32", "reason": "no Tensor Cores before Volta (sm_70)"},
                "loss_scaling": {"value": "none", "reason": "fp32 training"},
                "alignment": {"value": "not critical", "reason": "no Tensor Cores"}}
    if major == 7:
        return {"precision": {"value": "fp16-mixed", "reason": "Volta/Turing Tensor Cores run fp16; bf16 is not "
                                                              "supported in hardware"},
                "loss_scaling": {"value": "dynamic (fastamp.GradScaler, init 2**16)",
                                 "reason": "fp16 gradients underflow below 6e-8 without a loss scale"},
                "alignment": {"value": "multiples of 8", "reason": "fp16 Tensor Core tiles are 8 elements wide"}}
    fp8 = (major, minor) >= (8, 9)
    return {
        "precision": {"value": "bf16-mixed" + (" (fp8 via Transformer Engine for the largest GEMMs)" if fp8 else ""),
                      "reason": "bf16 runs at the fp16 Tensor Core rate with fp32's exponent range"
                                + ("; fp8 doubles GEMM throughput on this generation" if fp8 else "")},
        "loss_scaling": {"value": "none for bf16; dynamic for fp16",
                         "reason": "bf16 gradients do not underflow; fp16 ones do without scaling"},
        "alignment": {"value": "multiples of 8 (16 for fp8), 64-128 for the largest GEMMs",
                      "reason": "Tensor Core tiles and cuBLAS's fastest kernels; pad vocabularies (50257 -> 50304)"},
        "tf32": {"value": "torch.backends.cuda.matmul.allow_tf32 = True for fp32 parts",
                 "reason": "tf32 Tensor Cores run fp32 GEMMs several times faster with a 10-bit mantissa"},
    }


def hardware_report() -> Dict[str, Any]:
    """Device, compute capability, Tensor Core generation, bf16/fp8 support, memory, versions, fastamp's
    compiled kernels and :func:`recommendations`. On a machine without a GPU, says what that means."""
    from . import build_info

    info = build_info()
    report: Dict[str, Any] = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "fastamp_kernels": {"cpu": info.get("cpu_kernels"), "cuda": info.get("cuda_kernels"),
                            "cuda_archs": info.get("cuda_archs")},
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        capability = (props.major, props.minor)
        arch, tensor_cores = _ARCHITECTURES.get(capability, ("unknown", "unknown"))
        report.update({
            "device": torch.cuda.get_device_name(0), "compute_capability": f"{props.major}.{props.minor}",
            "architecture": arch, "tensor_cores": tensor_cores, "bf16_supported": torch.cuda.is_bf16_supported(),
            "fp8_supported": capability >= (8, 9), "memory_gb": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "recommendations": recommendations(capability),
        })
    else:
        report.update({
            "device": "cpu", "compute_capability": None, "architecture": None, "tensor_cores": None,
            "bf16_supported": True, "fp8_supported": False, "memory_gb": None,
            "note": "no CUDA GPU visible: fastamp runs its CPU kernels; Tensor Core, fp8 and GEMM-alignment "
                    "advice applies when you run on a GPU",
            "recommendations": recommendations(None),
        })
    return report
