"""LR schedules that know a step was skipped: the trainer steps its scheduler after taken steps only,
fused optimizers included (on the device, no host sync), and the scheduler object ends where a run
without the skipped step ends."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastamp import GradScaler
from fastamp.testing import HostReads
from fastamp.trainer import FusedMixedPrecisionTrainer

NAN_AT = 4


def model_and_batches(n=10):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))
    g = torch.Generator().manual_seed(1)
    return model, [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def loss_fn(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def nan_at(model, step):
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * math.nan if calls["n"] - 1 == step else grad

    model[2].weight.register_hook(hook)


@pytest.mark.parametrize("fused", [False, True])
def test_steplr_ends_where_ten_steps_with_one_skipped_end(fused):
    model, batches = model_and_batches()
    nan_at(model, NAN_AT)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused or None, foreach=None if fused else True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    trainer = FusedMixedPrecisionTrainer(model, opt, precision="fp32", max_grad_norm=1.0, loss_fn=loss_fn,
                                         lr_scheduler=sched, diagnose_overflows=False)
    stats = trainer.fit(batches, 10, progress=False)
    assert stats["overflow_step_indices"] == [NAN_AT]
    assert sched.last_epoch == 9
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 * 0.9**9, rel=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_the_rates_each_step_used_are_those_of_the_taken_steps(fused):
    """Against a plain run without the skipped batch: the same parameters (the same lr at every step)."""
    model, batches = model_and_batches()
    oracle = copy.deepcopy(model)
    nan_at(model, NAN_AT)
    make = lambda m: torch.optim.AdamW(m.parameters(), lr=0.1, fused=fused or None, foreach=None if fused else True)  # noqa: E731
    opt, oracle_opt = make(model), make(oracle)
    warmup_cosine = lambda step: min(1.0, (step + 1) / 3) * 0.5 * (1 + math.cos(math.pi * step / 10))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    oracle_sched = torch.optim.lr_scheduler.LambdaLR(oracle_opt, warmup_cosine)
    trainer = FusedMixedPrecisionTrainer(model, opt, precision="fp32", max_grad_norm=1e9, loss_fn=loss_fn,
                                         lr_scheduler=sched, diagnose_overflows=False)
    trainer.fit(batches, 10, progress=False)
    for batch in batches[:NAN_AT] + batches[NAN_AT + 1:]:
        oracle_opt.zero_grad()
        loss_fn(oracle, batch).backward()
        oracle_opt.step()
        oracle_sched.step()
    for p, q in zip(model.parameters(), oracle.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert sched.last_epoch == oracle_sched.last_epoch == 9


def test_a_fused_step_with_a_schedule_makes_no_host_sync():
    model, batches = model_and_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    trainer = FusedMixedPrecisionTrainer(model, opt, precision="fp32", max_grad_norm=1.0, loss_fn=loss_fn,
                                         lr_scheduler=sched, diagnose_overflows=False)
    trainer.train_step(batches[0])  # the table is made on the first step
    counter = HostReads()
    counter.exclude(opt)
    with counter:
        for batch in batches[1:]:
            trainer.train_step(batch)
    assert counter.count == 0


def test_checkpoint_carries_the_scheduler():
    model, batches = model_and_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    trainer = FusedMixedPrecisionTrainer(model, opt, precision="fp32", loss_fn=loss_fn, lr_scheduler=sched)
    trainer.fit(batches[:3], 3, progress=False)
    state = trainer.state_dict()
    assert state["lr_scheduler"]["last_epoch"] == 3


def test_taken_steps_is_a_device_counter():
    scaler = GradScaler("cpu", init_scale=4.0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(model(torch.ones(1, 2)).sum()).backward()
        if step == 1:
            model.weight.grad.fill_(math.inf)
        scaler.step(opt)
        scaler.update()
    assert int(scaler.taken_steps()) == 2 and scaler.step_counts()["taken"] == 2


def test_reduce_lr_on_plateau_is_refused():
    model, _ = model_and_batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        FusedMixedPrecisionTrainer(model, opt, precision="fp32", loss_fn=loss_fn,
                                   lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
