"""fastamp.analysis: format facts, the precision analyzer, gradient analysis and the hardware report."""

from __future__ import annotations

import math

import pytest
import torch

from fastamp.analysis import FORMATS, PrecisionAnalyzer, analyze_gradients, format_facts, hardware_report, recommendations


def test_format_facts_match_finfo_and_hand_values():
    for name in FORMATS:
        facts = format_facts(name)
        if facts.torch_dtype:
            info = torch.finfo(getattr(torch, facts.torch_dtype))
            assert (facts.max, facts.smallest_normal, facts.eps) == (info.max, info.smallest_normal, info.eps)
            assert facts.bits == info.bits
    fp16 = format_facts("fp16")
    assert (fp16.max, fp16.smallest_normal, fp16.smallest_subnormal, fp16.eps) == (65504.0, 2.0**-14, 2.0**-24, 2.0**-10)
    bf16 = format_facts("bf16")
    assert bf16.eps == 2.0**-7 and bf16.smallest_normal == 2.0**-126 and bf16.smallest_subnormal == 2.0**-133
    tf32 = format_facts("tf32")
    assert (tf32.bits, tf32.eps, tf32.max, tf32.smallest_normal) == (19, 2.0**-10, (2 - 2.0**-10) * 2.0**127, 2.0**-126)
    assert format_facts("fp8_e4m3").max == 448.0 and format_facts("fp8_e5m2").max == 57344.0
    assert format_facts("fp8_e4m3").smallest_subnormal == 2.0**-9
    assert format_facts("fp32").decimal_digits == round(math.log10(2.0**24), 2)
    with pytest.raises(ValueError, match="unknown format"):
        format_facts("fp4")


def test_precision_analyzer_against_direct_conversions():
    results = PrecisionAnalyzer(num_samples=500).analyze()
    fp16 = results["fp16"]
    sweep = torch.logspace(-10, -1, 1000, dtype=torch.float64).float()
    assert fp16["gradient_underflow"]["underflow_rate"] == pytest.approx(float((sweep.half() == 0).double().mean()))
    threshold = fp16["gradient_underflow"]["underflow_threshold"]
    assert 2.0**-25 * 0.9 < threshold <= 2.0**-25  # below half the smallest subnormal rounds to zero
    assert fp16["gradient_underflow"]["recommended_loss_scale"] == 2.0**15  # 1e-3 / 3e-8 = 3.4e4 -> 2**15
    assert results["bf16"]["gradient_underflow"]["underflow_rate"] == 0.0
    assert results["bf16"]["gradient_underflow"]["recommended_loss_scale"] == 1.0
    over = fp16["overflow"]
    # The sweep steps by 4.6% per point: the threshold lies within one step above 65520 (rounds to inf).
    assert 65520 <= over["overflow_threshold"] < 65520 * 1.05 and over["max_safe_value"] < 65520
    assert results["fp32"]["overflow"]["overflow_threshold"] > 3.4e38
    # Round-trip errors of normal values are bounded by half an ulp: eps / 2 relative; subnormal ones
    # (fp16 below 6.1e-5) lose more.
    for name in ("fp16", "bf16"):
        per_range = zip(PrecisionAnalyzer.DEFAULT_RANGES, results[name]["precision_loss"].values())
        for (low, _), stats in per_range:
            if low >= format_facts(name).smallest_normal:
                assert stats["max_relative_error"] <= format_facts(name).eps / 2 + 1e-12
    assert results["fp16"]["precision_loss"]["1e-08-1e-06"]["max_relative_error"] > format_facts("fp16").eps
    assert results["fp16"]["representable_range"]["min_representable"] == pytest.approx(2.0**-24, rel=0.05)


def test_tf32_rounding_is_round_to_nearest_even():
    analyzer = PrecisionAnalyzer(formats=["tf32"], num_samples=100)
    from fastamp.analysis import _round_trip

    x = torch.tensor([1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-10, 3.0])
    assert _round_trip(x, "tf32").tolist() == [1.0, 1 + 2.0**-9, 1 + 2.0**-10, 3.0]
    assert analyzer.analyze()["tf32"]["facts"]["mantissa_bits"] == 10


def test_analyze_gradients_counts_and_best_scale():
    # Four classes in fp16 at scale 1: underflow (< 2**-25), subnormal, normal, overflow (> 65520).
    grads = [torch.tensor([1e-9, 2e-9, 1e-6, 3e-6]), torch.tensor([1e-3, 0.5, 1e5, -2e5, 0.0])]
    r = analyze_gradients(grads, loss_scale=1.0)
    fp16 = r["formats"]["fp16"]
    assert r["num_nonzero"] == 8 and r["num_values"] == 9
    assert (fp16["underflow_fraction"], fp16["subnormal_fraction"], fp16["overflow_fraction"]) == (0.25, 0.25, 0.25)
    assert fp16["normal_fraction"] == 0.25
    bf16 = r["formats"]["bf16"]
    assert (bf16["underflow_fraction"], bf16["subnormal_fraction"], bf16["overflow_fraction"]) == (0, 0, 0)
    # With a loss scale of 2**10 the tiny ones rise: 1e-9 * 1024 = 1e-6 is subnormal, 1e-6 * 1024 normal.
    scaled = analyze_gradients(grads, loss_scale=2.0**10)["formats"]["fp16"]
    assert scaled["underflow_fraction"] == 0 and scaled["subnormal_fraction"] == 0.25
    # Best scale by hand: values 2**-20 and 2**-3 need exponents 6 and -11 to be normal; max allows 18.
    best = analyze_gradients([torch.tensor([2.0**-20, 2.0**-3])])["formats"]["fp16"]
    assert best["best_power_of_two_scale"] == 2.0**6 and best["normal_fraction_at_best_scale"] == 1.0
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    assert analyze_gradients(model)["num_values"] == 8
    with pytest.raises(ValueError, match="no gradients"):
        analyze_gradients(torch.nn.Linear(2, 2))


def test_hardware_report_and_recommendations():
    report = hardware_report()
    for key in ["device", "compute_capability", "tensor_cores", "bf16_supported", "fp8_supported", "memory_gb",
                "torch", "torch_cuda", "fastamp_kernels", "recommendations"]:
        assert key in report
    if not torch.cuda.is_available():
        assert report["device"] == "cpu" and "no CUDA GPU" in report["note"]
    for advice in report["recommendations"].values():
        assert advice["value"] and advice["reason"]
    assert "fp16" in recommendations((7, 0))["precision"]["value"]
    assert "bf16" in recommendations((8, 0))["precision"]["value"]
    assert "fp8" in recommendations((9, 0))["precision"]["value"]
    assert recommendations((6, 1))["precision"]["value"] == "fp32"
