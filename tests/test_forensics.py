"""fastamp.diagnose_overflow with planted culprits, and the state it must leave untouched."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from fastamp import GradScaler, OverflowDiagnosis, TrainingStuckWarning, diagnose_overflow
from fastamp.forensics import FP16_MAX, OverflowWatch


class Amplify(nn.Module):
    """Multiplies its input: past fp16's range in the forward when the factor is large."""

    def __init__(self, factor: float, to_fp32: bool = False) -> None:
        super().__init__()
        self.factor, self.to_fp32 = factor, to_fp32

    def forward(self, x):
        return (x.float() if self.to_fp32 else x) * self.factor


class _AmplifyGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class AmplifyGrad(nn.Module):
    """The identity forward; its backward alone multiplies the gradient (overflows at a high scale)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return _AmplifyGrad.apply(x, self.factor)


class Fails(nn.Module):
    def forward(self, x):
        raise RuntimeError("the model rejects this batch")


def net(*middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), *middle, nn.Linear(16, 1))


def mean_loss(model, batch):
    return model(batch).float().mean()


BATCH = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def test_forward_value_beyond_fp16_range_is_named():
    # fp32 output, finite, but beyond what an fp16 op downstream can hold.
    report = diagnose_overflow(net(Amplify(1e7, to_fp32=True)), BATCH, loss_fn=mean_loss, precision="fp16")
    assert report.found and report.phase == "forward" and report.tensor == "output"
    assert (report.module, report.module_type) == ("1", "Amplify")
    assert math.isfinite(report.max_abs) and report.max_abs > FP16_MAX and report.dtype == "torch.float32"
    assert "autocast" in report.recommendation and "bf16" in report.recommendation


def test_forward_inf_in_fp16_is_named():
    report = diagnose_overflow(net(Amplify(1e7)), BATCH, loss_fn=mean_loss, precision="16-mixed")
    assert report.found and report.phase == "forward" and report.module == "1"
    assert report.dtype == "torch.float16" and math.isinf(report.max_abs)


def test_the_same_model_is_clean_in_bf16():
    # bf16 has fp32's range: the same amplifier does not overflow there.
    report = diagnose_overflow(net(Amplify(1e7)), BATCH, loss_fn=mean_loss, precision="bf16")
    assert not report.found and report.precision == "bf16" and report.loss_scale == 1.0


def test_backward_only_overflow_at_the_loss_scale():
    model = net(nn.ReLU(), AmplifyGrad(1e4))
    report = diagnose_overflow(model, BATCH, loss_fn=mean_loss, precision="fp16", loss_scale=1024.0)
    assert report.found and report.phase == "backward"
    assert (report.module, report.module_type, report.tensor) == ("2", "AmplifyGrad", "grad_input")
    assert report.dtype == "torch.float16" and not math.isfinite(report.max_abs)
    assert "max_scale=512" in report.recommendation
    # At a scale the gradient fits under, nothing overflows.
    assert not diagnose_overflow(model, BATCH, loss_fn=mean_loss, precision="fp16", loss_scale=1.0).found


def test_the_scale_comes_from_a_scaler():
    model = net(AmplifyGrad(1e4))
    scaler = GradScaler("cpu", init_scale=2.0**3)
    scaler.scale(torch.ones(()))
    assert not diagnose_overflow(model, BATCH, loss_fn=mean_loss, loss_scale=scaler).found
    scaler.update(2.0**12)
    report = diagnose_overflow(model, BATCH, loss_fn=mean_loss, loss_scale=scaler)
    assert report.found and report.loss_scale == 2.0**12 and report.module == "1"


def test_nan_gradient_injected_into_one_parameter_in_bf16():
    model = net(nn.ReLU())
    model[2].weight.register_hook(lambda g: g * math.nan)
    report = diagnose_overflow(model, BATCH, loss_fn=mean_loss, precision="bf16")
    assert report.found and report.phase == "backward" and report.tensor == "param_grad"
    assert (report.module, report.parameter, report.module_type) == ("2", "2.weight", "Linear")
    assert math.isnan(report.max_abs)


def test_the_first_of_several_culprits_is_named():
    model = net(Amplify(1e7, to_fp32=True), nn.Linear(16, 16), Amplify(1e9, to_fp32=True), nn.Linear(16, 16))
    report = diagnose_overflow(model, BATCH, loss_fn=mean_loss)
    assert report.module == "1"
    # Backward order: the last module to run forward is the first to run backward.
    model = net(AmplifyGrad(1e4), nn.Linear(16, 16), AmplifyGrad(1e4), nn.Linear(16, 16))
    report = diagnose_overflow(model, BATCH, loss_fn=mean_loss, loss_scale=1024.0)
    assert (report.phase, report.module) == ("backward", "3")


def test_nested_modules_name_the_innermost():
    inner = nn.Sequential(nn.Linear(16, 16), Amplify(1e7, to_fp32=True))
    model = net(nn.Sequential(nn.ReLU(), inner))
    report = diagnose_overflow(model, BATCH, loss_fn=mean_loss)
    assert (report.module, report.module_type) == ("1.1.1", "Amplify")


def test_a_non_finite_loss_is_the_loss_phase():
    model = net()
    report = diagnose_overflow(model, BATCH, loss_fn=lambda m, b: torch.log(m(b).float().mean() * 0), precision="fp32")
    assert report.found and report.phase == "loss" and report.tensor == "loss" and math.isinf(report.max_abs)


def test_batch_protocol_dict_with_loss():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net(Amplify(1e7, to_fp32=True))

        def forward(self, x, y):
            return {"loss": (self.body(x) - y).float().pow(2).mean()}

    report = diagnose_overflow(WithLoss(), {"x": BATCH, "y": torch.zeros(4, 1)})
    assert report.module == "body.1"


def _state(model):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [b.clone() for b in model.buffers()], [m.training for m in model.modules()])


def _assert_same(model, saved):
    params, grads, buffers, modes = _state(model)
    for a, b in zip(params + buffers, saved[0] + saved[2]):
        assert torch.equal(a, b)
    for a, b in zip(grads, saved[1]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert modes == saved[3]


def test_state_is_left_exactly_as_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), AmplifyGrad(1e4), nn.Linear(16, 1))
    model.train()
    model[1].eval()  # a mixed mode must survive too
    mean_loss(model, BATCH).backward()  # existing .grads
    model[4].weight.grad = None  # and a missing one
    saved = _state(model)
    rng = torch.get_rng_state()
    report = diagnose_overflow(model, BATCH, loss_fn=mean_loss, loss_scale=1024.0)
    assert report.found
    _assert_same(model, saved)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters() if p._backward_hooks is not None)


def test_batchnorm_running_stats_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 1)).train()
    before = copy.deepcopy(model.state_dict())
    diagnose_overflow(model, BATCH, loss_fn=mean_loss, precision="bf16")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_model_that_raises_is_restored_and_unhooked():
    model = net(nn.BatchNorm1d(16), Fails())
    saved = _state(model)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="rejects this batch"):
        diagnose_overflow(model, BATCH, loss_fn=mean_loss)
    _assert_same(model, saved)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # And it still trains normally afterwards: no hook left behind fires.
    assert math.isfinite(mean_loss(model[:2], BATCH).item())


def test_bad_input():
    with pytest.raises(ValueError, match="no parameters"):
        diagnose_overflow(nn.ReLU(), BATCH)
    with pytest.raises(ValueError, match="unknown precision"):
        diagnose_overflow(net(), BATCH, loss_fn=mean_loss, precision="fp8")
    with pytest.raises(ValueError, match="scalar"):
        diagnose_overflow(net(), BATCH, loss_fn=lambda m, b: m(b))
    clean = diagnose_overflow(net(), BATCH, loss_fn=mean_loss, precision="fp32")
    assert not clean.found and clean.precision == "fp32" and "no overflow" in str(clean)


def test_report_is_json_friendly():
    report = diagnose_overflow(net(Amplify(1e7)), BATCH, loss_fn=mean_loss)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["found"] is True and d["max_abs"] == "inf" and d["module"] == "1"
    assert isinstance(report, OverflowDiagnosis) and "Amplify" in str(report)


def test_watch_diagnoses_first_then_every_n_and_warns_once_when_stuck():
    watch = OverflowWatch(diagnose_every=5, stuck_after=3)
    assert watch.observe(0, True) and not watch.observe(1, False)
    assert not watch.observe(2, True) and not watch.observe(4, True)
    with pytest.warns(TrainingStuckWarning, match="3 consecutive"):
        assert watch.observe(5, True)  # five steps after the first diagnosis
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.observe(6, True)  # warned once only
    floor = OverflowWatch(min_scale=4.0)
    with pytest.warns(TrainingStuckWarning, match="min_scale=4"):
        floor.observe(0, True, scale=4.0)
