"""fastamp.gemm: alignment arithmetic, the peak table, the audit, padded Linear layers, the GEMM timer on CPU
and the gemm/analyze/info commands. GPU timings run in tests/cuda."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fastamp.cli import main
from fastamp.gemm import (
    AlignedLinear,
    GemmResult,
    align_up,
    audit_model,
    benchmark_gemm,
    format_gemm_table,
    pad_linear_,
    peak_tflops,
)


def test_align_up_and_peaks():
    assert [align_up(n, 8) for n in (1, 8, 9, 50257, 4095)] == [8, 8, 16, 50264, 4096]
    assert align_up(50257, 64) == 50304
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert peak_tflops("Tesla T4", "fp16") == 65.0
    assert peak_tflops("NVIDIA GeForce RTX 4090", "fp8") == 330.3
    assert peak_tflops("NVIDIA H200", "fp8") == 1979.0
    assert peak_tflops("Some GPU", "fp16") is None and peak_tflops("Tesla T4", "bf16") is None


def test_benchmark_gemm_on_cpu():
    results = benchmark_gemm([(32, 50, 36)], dtypes=["fp32", "bf16"], device="cpu", multiples=(8, 64), repeats=2)
    assert [(r.dtype, r.aligned_to) for r in results] == [("fp32", None), ("fp32", 8), ("fp32", 64),
                                                          ("bf16", None), ("bf16", 8), ("bf16", 64)]
    for r in results:
        assert r.tflops == pytest.approx(2 * 32 * 50 * 36 / (r.median_ms / 1e3) / 1e12)
        assert r.pct_of_peak is None and r.device == "cpu"
    table = format_gemm_table(results)
    assert "x8: 32x56x40" in table and "GFLOP/s" in table
    with pytest.raises(ValueError, match="tf32"):
        benchmark_gemm([(8, 8, 8)], dtypes=["tf32"], device="cpu")
    with pytest.raises(ValueError, match="fp8"):
        benchmark_gemm([(8, 8, 8)], dtypes=["fp8"], device="cpu")


def odd_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(1001, 64),
        torch.nn.Linear(64, 130),
        torch.nn.GELU(),
        torch.nn.Linear(130, 77),
        torch.nn.Linear(77, 64),
    )


def test_audit_finds_the_unaligned_layers():
    model = odd_model()
    model.add_module("conv", torch.nn.Conv2d(3, 20, 3))
    entries = {e.name: e for e in audit_model(model, dtype="fp16")}
    assert set(entries) == {"0", "1", "3", "4", "conv"}
    assert entries["0"].misaligned == {"num_embeddings": 1008}
    assert entries["1"].misaligned == {"out_features": 136}
    assert entries["3"].misaligned == {"in_features": 136, "out_features": 80}
    assert entries["conv"].misaligned == {"in_channels": 8, "out_channels": 24}
    assert {e.name for e in audit_model(model, multiple=2)} == {"0", "3", "4", "conv"}
    fp8 = {e.name: e for e in audit_model(model, dtype="fp8")}
    assert fp8["4"].misaligned == {"in_features": 80} and fp8["4"].multiple == 16
    measured = [GemmResult(1, 1, 1, "fp16", None, 2.0, 1.0, None, "x"), GemmResult(1, 1, 1, "fp16", 8, 1.0, 2.0, None, "x")]
    assert audit_model(model, dtype="fp16", measurements=measured)[0].estimated_speedup == 2.0


def test_padded_linear_layers_compute_the_same_function_and_gradients():
    model = odd_model()
    reference = copy.deepcopy(model)
    replaced = pad_linear_(model, multiple=8, min_features=16)
    assert replaced == ["1", "3", "4"] and isinstance(model[3], AlignedLinear)
    assert audit_model(torch.nn.Sequential(*[m for m in model if isinstance(m, torch.nn.Linear)])) == []
    x = torch.randint(0, 1001, (5, 7))
    out, ref = model(x), reference(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.square().mean().backward()
    ref.square().mean().backward()
    for i in (1, 3, 4):
        layer, original = model[i], reference[i]
        torch.testing.assert_close(layer.weight_padded.grad[: layer.out_features, : layer.in_features],
                                   original.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias_padded.grad[: layer.out_features], original.bias.grad, rtol=1e-5, atol=1e-7)
        padding = layer.weight_padded.grad.clone()
        padding[: layer.out_features, : layer.in_features] = 0
        assert not padding.any() and not layer.bias_padded.grad[layer.out_features :].any()
    # Trained side by side (AdamW with weight decay), the padding stays zero and the functions stay equal.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    assert not model[3].weight_padded.detach()[model[3].out_features :].any()


def test_cli_gemm_analyze_and_info(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["gemm", "--device", "cpu", "--shape", "16x20x12", "--dtype", "fp32", "--repeats", "1",
                 "--json", str(tmp_path / "g.json"), "--plot", str(tmp_path / "g.png")]) == 0
    assert len(json.loads((tmp_path / "g.json").read_text())) == 5  # as given + 4 multiples
    assert main(["analyze", "--steps", "2", "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert set(report["formats"]) == {"fp32", "fp16", "bf16"} and report["gradients"]
    for png in ("g.png", "a.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "recommendations" in out and "because" in out
