"""fastamp.GradScaler on CUDA: no host syncs with fused optimizers, one per iteration otherwise, and the
same results as torch.amp.GradScaler. Skipped without an NVIDIA GPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fastamp import GradScaler

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)).to("cuda", dtype)


def loss_of(model, step):
    g = torch.Generator(device="cuda").manual_seed(step)
    x = torch.randn(32, 64, device="cuda", generator=g, dtype=next(model.parameters()).dtype)
    return model(x).float().square().mean()


def run(scaler_cls, optimizer_factory, steps=6, overflow_at=(1, 4), clip=None, seed=0):
    model = make_model(seed)
    opt = optimizer_factory(model.parameters())
    scaler = scaler_cls("cuda", init_scale=2.0**12, growth_interval=2)
    scales = []
    for step in range(steps):
        opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        if step in overflow_at:
            model[0].weight.grad[0, 0] = math.inf
        if clip == "torch":
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        elif clip == "fastamp":
            scaler.clip_grad_norm_(opt, 0.5)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, [p.detach().clone() for p in model.parameters()], opt


OPTIMIZERS = {
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, "torch"])
def test_bit_identical_to_torch_on_cuda(name, clip):
    scales_t, params_t, _ = run(torch.amp.GradScaler, OPTIMIZERS[name], clip=clip)
    scales_f, params_f, _ = run(GradScaler, OPTIMIZERS[name], clip=clip)
    assert scales_f == scales_t
    for a, b in zip(params_f, params_t):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_clip_matches_unscale_plus_torch_clip_on_cuda(name):
    scales_t, params_t, _ = run(torch.amp.GradScaler, OPTIMIZERS[name], clip="torch")
    scales_f, params_f, _ = run(GradScaler, OPTIMIZERS[name], clip="fastamp")
    assert scales_f == scales_t
    for a, b in zip(params_f, params_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [False, True])
def test_fused_optimizer_step_has_no_host_sync(clip):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = GradScaler("cuda", init_scale=2.0**12, hysteresis=2, min_scale=1.0)
    for step in range(4):
        opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        if step == 2:
            model[2].bias.grad[0] = math.nan
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            if clip:
                norm = scaler.clip_grad_norm_(opt, 1.0)
                assert norm.device.type == "cuda"
            scaler.step(opt)
            scaler.update()
            flag = scaler.found_inf
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert flag is not None and flag.device.type == "cuda"
    assert scaler.step_counts() == {"steps": 4, "taken": 3, "skipped": 1, "overflows": 1, "spikes": 0}


def test_non_fused_optimizers_cost_one_sync_per_iteration_together():
    models = [make_model(0), make_model(1)]
    opts = [torch.optim.AdamW(models[0].parameters(), lr=1e-3, foreach=True),
            torch.optim.SGD(models[1].parameters(), lr=1e-2, momentum=0.9, foreach=True)]
    scaler = GradScaler("cuda")
    for step in range(3):
        for opt in opts:
            opt.zero_grad()
        scaler.scale(loss_of(models[0], step) + loss_of(models[1], step)).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scaler.clip_grad_norm_(opts, 1.0)
                for opt in opts:
                    scaler.step(opt)
                scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchronizing" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_grads_on_cuda(dtype):
    model = make_model(0, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = GradScaler("cuda", init_scale=2.0**8)
    scaler.scale(loss_of(model, 0)).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.unscale_(opt)
    for p, s in zip(model.parameters(), scaled):
        assert torch.equal(p.grad, (s.float() * 2.0**-8).to(dtype))
    scaler.step(opt)
    scaler.update()
    assert not scaler.last_step_skipped()


def test_skipped_fused_step_leaves_adam_state_bit_identical_on_cuda():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = GradScaler("cuda")
    for step in range(2):
        opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        scaler.step(opt)
        scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}
    opt.zero_grad()
    scaler.scale(loss_of(model, 9)).backward()
    model[2].weight.grad[-1, -1] = -math.inf
    scaler.clip_grad_norm_(opt, 1.0)
    scaler.step(opt)
    scaler.update()
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    for k, s in opt.state.items():
        for n, v in s.items():
            assert torch.equal(v, state[k][n]), n
