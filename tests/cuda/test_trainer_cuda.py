"""FusedMixedPrecisionTrainer on CUDA: no host sync in train_step, and the demo runs. Skipped without a GPU."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastamp.cli.demo import run_demo
from fastamp.testing.models import build_model, synthetic_batches
from fastamp.trainer import FusedMixedPrecisionTrainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_train_step_makes_no_host_sync_with_a_fused_optimizer(precision, accumulation_steps):
    torch.manual_seed(0)
    model = build_model("tiny").cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    trainer = FusedMixedPrecisionTrainer(model, opt, precision=precision, accumulation_steps=accumulation_steps)
    data = list(itertools.islice(synthetic_batches(model.config, 8, device="cuda"), 8))
    trainer.train_step(data[0])  # first call creates optimizer state and caches
    if accumulation_steps == 2:
        trainer.train_step(data[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in data[2:]:
            result = trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result.tensors["loss"].device.type == "cuda"
    stats = trainer.get_training_statistics()
    assert stats["total_steps"] == 8 // accumulation_steps and stats["peak_memory_mb"] > 0
    assert all(t > 0 for t in stats["step_times"])


def test_demo_on_cuda(tmp_path):
    results = run_demo(device="cuda", steps=10, size="tiny", out=str(tmp_path), progress=False, log=lambda s: None)
    assert results["config"]["precision"] == "fp16"
    assert (tmp_path / "results.json").exists()
    # The planted inf (step 10 // 3 = 3) is an overflow both loops skip; fastamp names where it came from.
    assert results["injected"] == {"step": 3, "parameter": "layers.0.feedforward.0.weight", "value": "inf"}
    assert results["summary"]["stock AMP"]["skipped_steps"] >= 1 and 3 in results["fastamp"]["overflow_step_indices"]
    first = results["overflow_diagnoses"][0]
    assert first["found"] and first["parameter"] == "layers.0.feedforward.0.weight"


def test_diagnosis_of_an_fp16_overflow_on_cuda_names_the_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).cuda()
    model[0].register_forward_hook(lambda m, i, out: out * 1e6)
    from fastamp import diagnose_overflow

    report = diagnose_overflow(model, torch.randn(8, 64, device="cuda"),
                               loss_fn=lambda m, b: m(b).float().mean(), precision="fp16")
    assert report.found and (report.phase, report.module, report.dtype) == ("forward", "0", "torch.float16")
