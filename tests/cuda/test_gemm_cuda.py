"""fastamp.gemm on a GPU: Tensor Core timings with % of the published peak, fp8 where supported, and
padded layers in fp16. Skipped without an NVIDIA GPU."""

from __future__ import annotations

import pytest
import torch

from fastamp.analysis import hardware_report
from fastamp.gemm import benchmark_gemm, pad_linear_, peak_tflops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def test_gpu_gemm_timings_and_peaks():
    results = benchmark_gemm([(1024, 1023, 1000)], repeats=5)
    dtypes = {r.dtype for r in results}
    assert {"fp32", "tf32", "fp16", "bf16"} <= dtypes
    if torch.cuda.get_device_capability() >= (8, 9):
        assert "fp8" in dtypes and all(r.aligned_to for r in results if r.dtype == "fp8")
    name = torch.cuda.get_device_name()
    for r in results:
        assert r.tflops > 0
        assert (r.pct_of_peak is None) == (peak_tflops(name, r.dtype) is None)


def test_padded_linear_in_fp16_on_gpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(770, 1001), torch.nn.GELU(), torch.nn.Linear(1001, 770)).cuda().half()
    x = torch.randn(64, 770, device="cuda", dtype=torch.float16)
    ref = model(x)
    assert pad_linear_(model) == ["0", "2"]
    torch.testing.assert_close(model(x), ref, rtol=2e-2, atol=2e-2)


def test_hardware_report_on_gpu():
    report = hardware_report()
    assert report["compute_capability"] and report["tensor_cores"] and report["memory_gb"] > 0
