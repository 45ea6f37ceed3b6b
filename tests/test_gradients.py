"""The gradient core (fastamp._gradients) and the clip paths on it: the drifts that one core fixes."""

from __future__ import annotations

import math

import pytest
import torch

from fastamp import GradScaler
from fastamp import _gradients as gradients
from fastamp.distributed import clip_grad_norm_ as sharded_clip
from fastamp.trainer import FusedMixedPrecisionTrainer


def _grads(*sizes, dtype=torch.float32, scale=1.0):
    return [torch.randn(n, dtype=torch.float64).mul(scale).to(dtype) for n in sizes]


def test_kernel_dtypes_are_stated_once():
    from fastamp import ops

    assert ops.kernel_dtypes("cpu") == (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    assert ops.kernel_dtypes("cuda") == (torch.float32, torch.float16, torch.bfloat16)
    assert gradients.kernel_handles(torch.zeros(1, dtype=torch.float64))
    assert not gradients.kernel_handles(torch.zeros(1, dtype=torch.float64, device="meta"))


def test_clip_result_matches_torch_clip_and_applies_once():
    grads = _grads(70000, 17, 300)
    by_device = {torch.device("cpu"): grads}
    expected = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for p, g in zip(params, expected):
        p.grad = g
    torch_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    result = gradients.clip_gradients(by_device, 1.0)
    assert result.coef is not None and result.found_inf.item() == 0.0
    torch.testing.assert_close(result.total_norm, torch_norm, rtol=2e-6, atol=0)
    result.apply_(by_device)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("max_norm", [None, 0.0, math.inf])
def test_clipping_off_means_no_coefficient_and_exactly_inv_scale(max_norm):
    huge = _grads(1000, scale=1e36)  # finite, but the fp32 norm overflows: a diverging run
    by_device = {torch.device("cpu"): huge}
    before = [g.clone() for g in huge]
    result = gradients.clip_gradients(by_device, max_norm, inv_scale=torch.tensor(0.5))
    assert result.coef is None and torch.equal(result.factor, torch.tensor(0.5))
    assert math.isinf(result.total_norm.item()) and result.found_inf.item() == 0.0
    result.apply_(by_device)
    assert all(torch.equal(g, b * 0.5) for g, b in zip(huge, before))
    assert gradients.clip_gradients(by_device, max_norm).factor is None  # nothing to do at all


def test_grad_scaler_clip_at_inf_on_an_overflowing_norm_writes_no_nan():
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = GradScaler("cpu", init_scale=1.0)
    scaler.scale(torch.zeros(()))
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e30)
    norm = scaler.clip_grad_norm_(opt, math.inf)
    assert math.isinf(norm.item())
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_trainer_without_clipping_steps_like_the_optimizer_on_a_diverging_run(fused):
    """max_grad_norm=0 on grads that are finite but whose fp32 norm overflows: the weights stay finite
    and equal those of a plain optimizer.step() (it used to write a NaN factor into them)."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 16)
        with torch.no_grad():
            model.weight.fill_(1e19)
        return model, torch.optim.SGD(model.parameters(), lr=1e-30, fused=fused or None)

    x = torch.full((4, 16), 1e19)
    model, opt = make()
    trainer = FusedMixedPrecisionTrainer(model, opt, precision="fp32", max_grad_norm=0,
                                         loss_fn=lambda m, batch: m(batch).sum())
    trainer.train_step(x)
    reference, ref_opt = make()
    reference(x).sum().backward()
    ref_opt.step()
    assert bool(torch.isfinite(model.weight).all())
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_distributed_clip_takes_the_core_path_for_fp64_and_multiple_dtypes():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        params = [torch.nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in ((300, torch.float64), (70000, torch.bfloat16))]
        for p in params:
            p.grad = torch.randn_like(p) * 3
        expected = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in params]))
        norm = sharded_clip(params, 1.0)
        assert abs(norm.item() - expected.item()) <= 2e-6 * expected.item()
        clipped = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in params]))
        assert abs(clipped.item() - 1.0) < 1e-2
    finally:
        dist.destroy_process_group()
