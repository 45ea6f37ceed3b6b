"""The gradient core's CUDA-only cases: fp64 grads on CUDA go to PyTorch's ops on every clip path, and
the Lightning plugin's norm lives on its device and spans devices. Skipped without an NVIDIA GPU."""

from __future__ import annotations

import pytest
import torch

from fastamp import _gradients as gradients
from fastamp.testing import tolerance

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
NORM_RTOL = tolerance("grad_norm", "cuda", torch.float32)


def _params(device="cuda"):
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dt, device=device))
              for n, dt in ((300, torch.float64), (70000, torch.float32), (999, torch.bfloat16))]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    return params


def _norm(params):
    return torch.linalg.vector_norm(torch.cat([p.grad.double().flatten().cpu() for p in params])).item()


def test_core_norm_of_fp64_cuda_grads_with_the_others():
    params = _params()
    found = torch.zeros((), device="cuda")
    norm = gradients.norm_and_check([p.grad for p in params], None, found)
    assert abs(norm.item() - _norm(params)) <= NORM_RTOL * _norm(params) and found.item() == 0.0


def test_distributed_clip_with_fp64_cuda_grads():
    import torch.distributed as dist

    from fastamp.distributed import clip_grad_norm_

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        params = _params()
        expected = _norm(params)
        norm = clip_grad_norm_(params, 1.0)
        assert abs(norm.item() - expected) <= NORM_RTOL * expected
        assert abs(_norm(params) - 1.0) < 1e-2
    finally:
        dist.destroy_process_group()


def test_trainer_without_scaler_folds_the_clip_with_fp64_cuda_grads():
    from fastamp.trainer import FusedMixedPrecisionTrainer

    model = torch.nn.Linear(16, 8).cuda().double()
    trainer = FusedMixedPrecisionTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1, fused=True),
                                         precision="fp32", max_grad_norm=0.01, loss_fn=lambda m, x: m(x).sum())
    result = trainer.train_step(torch.randn(4, 16, device="cuda", dtype=torch.float64))
    assert torch.isfinite(result["grad_norm"]).item()


def test_lightning_plugin_norm_is_on_its_device_and_spans_devices():
    pytest.importorskip("lightning.pytorch")
    from fastamp.integrations.lightning import FusedMixedPrecision

    plugin = FusedMixedPrecision("bf16-mixed", "cuda")
    empty = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3, device="cuda"))], lr=0.1)
    plugin.clip_gradients(empty, 1.0)
    assert plugin.last_grad_norm.device.type == "cuda" and plugin.last_grad_norm.item() == 0.0
    params = _params("cuda")[:2] + _params("cpu")[:2]
    expected = _norm(params)
    plugin.clip_gradients(torch.optim.SGD(params, lr=0.1), 1.0)
    assert abs(plugin.last_grad_norm.item() - expected) <= NORM_RTOL * expected
    assert abs(_norm(params) - 1.0) < 1e-2
