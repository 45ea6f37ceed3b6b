"""fastamp.SpikeGuard: a finite spike is skipped like an overflow, on the device, and only then.

The oracle is a plain PyTorch loop in which the spiking batch never came: with no clipping and a scale
of 1, the guarded run must end with the very same parameters, bit for bit."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastamp
from fastamp import GradScaler, SpikeGuard
from fastamp.testing import HostReads
from fastamp.trainer import FusedMixedPrecisionTrainer

STEPS, SPIKE_AT = 24, 16

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
}


def model_and_data(seed=0, spike=1000.0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)) for _ in range(STEPS)]
    x, y = batches[SPIKE_AT]
    batches[SPIKE_AT] = (x * spike, y * spike)  # a bad batch: finite, huge
    return model, batches


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def guarded_run(model, opt, batches, guard, scaler=None):
    scaler = scaler or GradScaler.nonfinite_guard("cpu", spike_guard=guard)
    for batch in batches:
        opt.zero_grad()
        scaler.scale(loss_of(model, batch)).backward()
        scaler.clip_grad_norm_(opt, math.inf)  # the norm, no clip
        scaler.step(opt)
        scaler.update()
    return scaler


def plain_run(model, opt, batches):
    for batch in batches:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()


def guard(**kwargs):
    return SpikeGuard(**{"threshold": 6.0, "window": 16, "warmup": 8, **kwargs})


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("on", ["grad_norm", "loss", "both"])
def test_a_planted_spike_is_skipped_as_if_the_batch_never_came(name, on):
    model, batches = model_and_data()
    oracle = copy.deepcopy(model)
    scaler = guarded_run(model, OPTIMIZERS[name](model.parameters()), batches, guard(on=on))
    plain_run(oracle, OPTIMIZERS[name](oracle.parameters()), batches[:SPIKE_AT] + batches[SPIKE_AT + 1:])
    for p, q in zip(model.parameters(), oracle.parameters()):
        assert torch.equal(p, q)
    assert scaler.step_counts() == {"steps": STEPS, "taken": STEPS - 1, "skipped": 1, "overflows": 0, "spikes": 1}
    assert scaler.get_scale() == 1.0


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_no_false_positive_on_a_normal_run(name):
    model, batches = model_and_data()
    x, y = batches[SPIKE_AT]
    batches[SPIKE_AT] = (x / 1000, y / 1000)  # no spike
    unguarded = copy.deepcopy(model)
    scaler = guarded_run(model, OPTIMIZERS[name](model.parameters()), batches, guard())
    guarded_run(unguarded, OPTIMIZERS[name](unguarded.parameters()), batches, None)
    for p, q in zip(model.parameters(), unguarded.parameters()):
        assert torch.equal(p, q)
    assert scaler.step_counts()["spikes"] == 0


def test_no_decision_before_warmup_and_only_taken_steps_enter_the_history():
    model, batches = model_and_data()
    late = guard(warmup=SPIKE_AT + 5)  # not ready when the spike comes
    scaler = guarded_run(model, torch.optim.SGD(model.parameters(), lr=0.05), batches, late)
    assert scaler.step_counts()["spikes"] == 0
    model, batches = model_and_data()
    on_time = guard()
    scaler = guarded_run(model, torch.optim.SGD(model.parameters(), lr=0.05), batches, on_time)
    assert on_time.state_dict()["grad_norm"]["count"] == STEPS - 1  # the spike is not in the history


def test_resume_mid_run_from_state_dict_is_bit_identical():
    model, batches = model_and_data()
    straight = copy.deepcopy(model)
    opt = torch.optim.AdamW(straight.parameters(), lr=1e-2, fused=True)
    guarded_run(straight, opt, batches, guard())
    first = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = guarded_run(model, first, batches[:12], guard())
    saved = copy.deepcopy({"model": model.state_dict(), "opt": first.state_dict(), "scaler": scaler.state_dict()})
    resumed_model, _ = model_and_data()
    resumed_model.load_state_dict(saved["model"])
    resumed_opt = torch.optim.AdamW(resumed_model.parameters(), lr=1e-2, fused=True)
    resumed_opt.load_state_dict(saved["opt"])
    resumed_scaler = GradScaler.nonfinite_guard("cpu", spike_guard=SpikeGuard())
    resumed_scaler.load_state_dict(saved["scaler"])
    assert resumed_scaler.spike_guard.window == 16 and resumed_scaler.spike_guard.warmup == 8
    guarded_run(resumed_model, resumed_opt, batches[12:], None, scaler=resumed_scaler)
    for p, q in zip(resumed_model.parameters(), straight.parameters()):
        assert torch.equal(p, q)
    assert resumed_scaler.step_counts()["spikes"] == 1


def test_fp16_an_overflow_and_a_spike_are_counted_apart_and_only_the_overflow_backs_off():
    model, batches = model_and_data(spike=20.0)  # a spike that stays finite in fp16 at this scale
    scaler = GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6, spike_guard=guard())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scales = []
    for step, batch in enumerate(batches):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(model, batch)
        scaler.scale(loss.float()).backward()
        if step == 10:
            model[0].weight.grad[0, 0] = math.inf
        scaler.clip_grad_norm_(opt, math.inf)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scaler.step_counts() == {"steps": STEPS, "taken": STEPS - 2, "skipped": 2, "overflows": 1, "spikes": 1}
    assert scales[10] == 2.0**7 and scales[SPIKE_AT] == scales[SPIKE_AT - 1] == 2.0**7


def test_bf16_trainer_skips_the_spike():
    model, batches = model_and_data()
    trainer = FusedMixedPrecisionTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
                                         precision="bf16", max_grad_norm=1.0, spike_guard=guard(),
                                         loss_fn=loss_of, diagnose_overflows=False)
    stats = trainer.fit(batches, STEPS, progress=False)
    assert stats["overflow_step_indices"] == [SPIKE_AT] and stats["spike_steps"] == 1


def test_fused_steps_make_no_host_sync():
    model, batches = model_and_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = GradScaler.nonfinite_guard("cpu", spike_guard=guard(on="both"))
    counter = HostReads()
    counter.exclude(opt)
    with counter:
        guarded_run(model, opt, batches, None, scaler=scaler)
    assert counter.count == 0
    assert scaler.step_counts()["spikes"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_parameter_norms_from_the_clip(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", init_scale=64.0)
    scaler.scale(model(torch.randn(4, 8, dtype=dtype)).float().pow(2).sum()).backward()
    scaled = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    scaler.clip_grad_norm_(opt, 0.01, per_param_norms=True)
    norms = scaler.grad_norms(model)
    assert set(norms) == set(scaled)
    for name, grad in scaled.items():
        expected = float(torch.linalg.vector_norm(grad.double() / 64.0))
        assert norms[name] == pytest.approx(expected, rel=1e-6)
    grouped = scaler.grad_norms(model, depth=1)
    assert set(grouped) == {"0", "2"}
    assert grouped["0"] == pytest.approx(math.hypot(norms["0.weight"], norms["0.bias"]), rel=1e-12)


def test_trainer_logs_grad_norms():
    model, batches = model_and_data()
    trainer = FusedMixedPrecisionTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
                                         precision="fp32", max_grad_norm=1.0, log_grad_norms=True, loss_fn=loss_of)
    trainer.fit(batches[:3], 3, progress=False)
    norms = trainer.grad_norms()
    assert set(norms) == {n for n, _ in model.named_parameters()} and all(v > 0 for v in norms.values())
    assert trainer.get_training_statistics()["grad_norms"] == norms


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="on must be one of"):
        SpikeGuard(on="norm")
    with pytest.raises(TypeError, match="spike_guard must be a fastamp.SpikeGuard"):
        fastamp.GradScaler("cpu", spike_guard=6.0)
