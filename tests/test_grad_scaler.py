"""fastamp.GradScaler on CPU against torch.amp.GradScaler (the oracle), and its additions."""

from __future__ import annotations

import copy
import math
import pickle
from typing import Callable, List, Optional

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastamp
from fastamp import GradScaler
from fastamp.testing import FastampOpCalls, HostReads

SCALERS = {"torch": torch.amp.GradScaler, "fastamp": GradScaler}

# Optimizers by name; "fused" ones take PyTorch's grad_scale/found_inf path (no host sync).
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum_foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
}


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)
    ).to(dtype)


def batch(step: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def loss_of(model: torch.nn.Module, step: int, micro: int = 0) -> torch.Tensor:
    x, y = batch(step, micro)
    x = x.to(next(model.parameters()).dtype)
    return ((model(x).float() - y) ** 2).mean()


def inject(model: torch.nn.Module, kind: Optional[str], param_index: int, last: bool) -> None:
    if kind is None:
        return
    value = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}[kind]
    grad = list(model.parameters())[param_index].grad
    grad.view(-1)[-1 if last else 0] = value


def params_of(model: torch.nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same_tensors(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def assert_same_optimizer_state(opt_a, opt_b):
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            va, vb = sa[k][name], sb[k][name]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), (k, name)
            else:
                assert va == vb, (k, name)


def outcome(fn: Callable[[], object]):
    """What an action does: its value, or the type and message of what it raised."""
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the exception itself is what is compared
        return (type(e), str(e))


# ---- construction, getters, disabled scalers ---------------------------------------------------------


def test_is_a_torch_grad_scaler_with_the_same_settings():
    ours = GradScaler("cpu", init_scale=8.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=7)
    theirs = torch.amp.GradScaler("cpu", init_scale=8.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=7)
    assert isinstance(ours, torch.amp.GradScaler)
    for getter in ["get_scale", "get_growth_factor", "get_backoff_factor", "get_growth_interval", "is_enabled"]:
        assert getattr(ours, getter)() == getattr(theirs, getter)()
    for name, value in [("growth_factor", 4.0), ("backoff_factor", 0.125), ("growth_interval", 3)]:
        getattr(ours, f"set_{name}")(value)
        assert getattr(ours, f"get_{name}")() == value
    assert ours.state_dict() == {**theirs.state_dict(), "growth_factor": 4.0, "backoff_factor": 0.125,
                                 "growth_interval": 3, "hysteresis": 1, "_hysteresis_tracker": 1,
                                 "min_scale": 0.0, "max_scale": math.inf, "_num_steps": 0, "_skipped_steps": 0,
                                 "_overflow_steps": 0, "_spike_steps": 0}


@pytest.mark.parametrize("kwargs", [{"growth_factor": 1.0}, {"backoff_factor": 1.0}])
def test_invalid_factors_fail_as_in_torch(kwargs):
    assert outcome(lambda: GradScaler("cpu", **kwargs)) == outcome(lambda: torch.amp.GradScaler("cpu", **kwargs))


@pytest.mark.parametrize(
    "kwargs", [{"hysteresis": 0}, {"hysteresis": 1.5}, {"min_scale": -1.0}, {"min_scale": 4.0, "max_scale": 2.0}]
)
def test_invalid_fastamp_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="fastamp.GradScaler"):
        GradScaler("cpu", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cuda_device_without_cuda_disables_with_a_warning_like_torch():
    with pytest.warns(UserWarning, match="CUDA is not available"):
        scaler = GradScaler()
    assert not scaler.is_enabled()


def test_disabled_scaler_is_a_pass_through():
    scaler = GradScaler("cpu", enabled=False)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss = loss_of(model, 0)
    assert scaler.scale(loss) is loss
    loss.backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    loss_of(reference, 0).backward()
    ref_opt.step()
    assert_same_tensors(params_of(model), params_of(reference))
    assert scaler.state_dict() == {} and scaler.get_scale() == 1.0 and scaler.found_inf is None
    assert scaler.step_counts() == {"steps": 0, "taken": 0, "skipped": 0, "overflows": 0, "spikes": 0}


# ---- scale() ------------------------------------------------------------------------------------------


def test_scale_handles_tensors_and_nested_containers_like_torch():
    ours, theirs = GradScaler("cpu", init_scale=4.0), torch.amp.GradScaler("cpu", init_scale=4.0)
    a, b, c = torch.randn(3), torch.randn(2, 2), torch.randn(())
    out, ref = ours.scale([a, (b, [c])]), theirs.scale([a, (b, [c])])
    assert type(out) is list and type(out[1]) is tuple and type(out[1][1]) is list
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1][0], ref[1][0]) and torch.equal(out[1][1][0], ref[1][1][0])
    assert [torch.equal(x, y) for x, y in zip(ours.scale(t for t in (a, b)), theirs.scale(t for t in (a, b)))] == [
        True,
        True,
    ]
    assert torch.equal(ours.scale(a), a * 4.0)
    assert outcome(lambda: ours.scale([1.0])) == outcome(lambda: theirs.scale([1.0]))


# ---- misuse: the same errors as PyTorch -----------------------------------------------------------


def _misuse_script(kind: str, scaler_cls):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = scaler_cls("cpu")
    if kind == "step_before_scale":
        loss_of(model, 0).backward()
        return scaler.step(opt)
    if kind == "update_before_scale":
        return scaler.update()
    scaler.scale(loss_of(model, 0)).backward()
    if kind == "unscale_twice":
        scaler.unscale_(opt)
        return scaler.unscale_(opt)
    if kind == "unscale_after_step":
        scaler.step(opt)
        return scaler.unscale_(opt)
    if kind == "step_twice":
        scaler.step(opt)
        return scaler.step(opt)
    if kind == "closure_kwarg":
        return scaler.step(opt, closure=lambda: None)
    if kind == "update_without_step":
        return scaler.update()
    if kind == "step_after_update_without_backward":
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return scaler.step(opt)
    if kind == "new_scale_requires_grad":
        scaler.step(opt)
        return scaler.update(torch.tensor(2.0, requires_grad=True))
    if kind == "new_scale_two_elements":
        scaler.step(opt)
        return scaler.update(torch.tensor([2.0, 3.0]))
    if kind == "load_empty_state_dict":
        return scaler.load_state_dict({})
    if kind == "pickle_mid_iteration":
        scaler.step(opt)
        return pickle.dumps(scaler)
    raise AssertionError(kind)


MISUSES = [
    "step_before_scale",
    "update_before_scale",
    "unscale_twice",
    "unscale_after_step",
    "step_twice",
    "closure_kwarg",
    "update_without_step",
    "step_after_update_without_backward",
    "new_scale_requires_grad",
    "new_scale_two_elements",
    "load_empty_state_dict",
    "pickle_mid_iteration",
]


@pytest.mark.parametrize("kind", MISUSES)
def test_misuse_raises_what_torch_raises(kind):
    theirs = outcome(lambda: _misuse_script(kind, torch.amp.GradScaler))
    ours = outcome(lambda: _misuse_script(kind, GradScaler))
    assert theirs[0] != "ok"  # the script must be a misuse for torch too
    assert ours == theirs


# ---- bit-identical to torch on fp32 over random sequences --------------------------------------------


def _train(scaler_cls, optimizer_name, steps, init_scale, growth_interval, seed=0):
    """Runs a sequence of steps; returns (scales after each update, params after each step, model, opt)."""
    model = make_model(seed)
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    scaler = scaler_cls("cpu", init_scale=init_scale, growth_interval=growth_interval)
    scales, trajectory = [], []
    for step, (kind, param_index, last, clip, micro_batches, new_scale) in enumerate(steps):
        opt.zero_grad(set_to_none=step % 2 == 0)
        for micro in range(micro_batches):
            scaler.scale(loss_of(model, step, micro) / micro_batches).backward()
        inject(model, kind, param_index, last)
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, foreach=True)
        scaler.step(opt)
        scaler.update(new_scale)
        scales.append(scaler.get_scale())
        trajectory.append(params_of(model))
    return scales, trajectory, model, opt


STEP = st.tuples(
    st.sampled_from([None, None, None, "inf", "-inf", "nan"]),
    st.integers(0, 3),
    st.booleans(),
    st.booleans(),
    st.integers(1, 3),
    st.sampled_from([None] * 9 + [1024.0]),
)


@settings(max_examples=40, deadline=None)
@given(
    optimizer_name=st.sampled_from(sorted(OPTIMIZERS)),
    steps=st.lists(STEP, min_size=1, max_size=10),
    init_scale=st.sampled_from([1.0, 2.0**8, 2.0**16, 2.0**40]),
    growth_interval=st.integers(1, 4),
)
def test_bit_identical_to_torch_over_random_sequences(optimizer_name, steps, init_scale, growth_interval):
    # PyTorch's fused SGD reads uninitialized momentum after a skipped first step (fastamp zeroes it:
    # see the test below), so there is nothing to be identical to.
    assume(not (optimizer_name == "sgd_fused" and steps[0][0] is not None))
    args = (optimizer_name, steps, init_scale, growth_interval)
    scales_t, traj_t, model_t, opt_t = _train(torch.amp.GradScaler, *args)
    scales_f, traj_f, model_f, opt_f = _train(GradScaler, *args)
    assert scales_f == scales_t
    for after_t, after_f in zip(traj_t, traj_f):
        assert_same_tensors(after_f, after_t)
    assert_same_optimizer_state(opt_f, opt_t)


def test_huge_loss_overflows_naturally_and_scale_backs_off_like_torch():
    # No injection: 2**127 times a loss of ~1e4 overflows fp32 grads by itself, until the scale backs off.
    def run(scaler_cls):
        model = make_model()
        opt = OPTIMIZERS["adam"](model.parameters())
        scaler = scaler_cls("cpu", init_scale=2.0**127, growth_interval=2)
        scales = []
        for step in range(24):
            opt.zero_grad()
            scaler.scale(loss_of(model, step) * 1e4).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        return scales, params_of(model)

    scales_t, params_t = run(torch.amp.GradScaler)
    scales_f, params_f = run(GradScaler)
    assert scales_f == scales_t and scales_t[0] == 2.0**126
    assert_same_tensors(params_f, params_t)


def test_fused_sgd_after_a_skipped_first_step_starts_its_momentum_from_the_gradient():
    def run(optimizer_name, scaler_cls):
        model = make_model()
        opt = OPTIMIZERS[optimizer_name](model.parameters())
        scaler = scaler_cls("cpu", init_scale=2.0**10)
        for step in range(4):
            opt.zero_grad()
            scaler.scale(loss_of(model, step)).backward()
            if step == 0:
                inject(model, "inf", 0, False)
            scaler.step(opt)
            scaler.update()
        return params_of(model), opt

    fused, fused_opt = run("sgd_fused", GradScaler)
    # Oracle: the foreach SGD, which creates no state on a skipped step.
    reference, _ = run("sgd_momentum_foreach", torch.amp.GradScaler)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(torch.isfinite(s["momentum_buffer"]).all() for s in fused_opt.state.values())


# ---- patterns from PyTorch's AMP examples ----------------------------------------------------------


def _multi_loss_multi_optimizer(scaler_cls, inject_into: Optional[int]):
    torch.manual_seed(0)
    model0, model1 = make_model(0), make_model(1)
    opt0 = torch.optim.SGD(model0.parameters(), lr=0.1, momentum=0.9)
    opt1 = torch.optim.Adam(model1.parameters(), lr=1e-2)
    scaler = scaler_cls("cpu", init_scale=2.0**10, growth_interval=2)
    scales = []
    for step in range(4):
        opt0.zero_grad()
        opt1.zero_grad()
        x, y = batch(step)
        out0, out1 = model0(x), model1(x)
        loss0 = ((out0 + out1 - y) ** 2).mean()
        loss1 = ((out0 - out1) ** 2).mean()
        scaler.scale(loss0).backward(retain_graph=True)
        scaler.scale(loss1).backward()
        if step == 1 and inject_into is not None:
            inject((model0, model1)[inject_into], "inf", 0, False)
        scaler.unscale_(opt0)
        torch.nn.utils.clip_grad_norm_(model0.parameters(), 0.5)
        scaler.step(opt0)
        scaler.step(opt1)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, params_of(model0) + params_of(model1)


@pytest.mark.parametrize("inject_into", [None, 0, 1])
def test_multiple_losses_and_optimizers_behave_as_in_torch(inject_into):
    # An overflow in one optimizer's grads skips only that optimizer, and backs the scale off.
    theirs = _multi_loss_multi_optimizer(torch.amp.GradScaler, inject_into)
    ours = _multi_loss_multi_optimizer(GradScaler, inject_into)
    assert ours[0] == theirs[0]
    assert_same_tensors(ours[1], theirs[1])


def test_step_passes_arguments_and_returns_the_optimizers_value():
    class Recording(torch.optim.SGD):
        def step(self, closure=None, *, tag=None):
            super().step(closure)
            return ("stepped", tag)

    model = make_model()
    scaler = GradScaler("cpu")
    opt = Recording(model.parameters(), lr=0.1)
    scaler.scale(loss_of(model, 0)).backward()
    assert scaler.step(opt, None, tag=7) == ("stepped", 7)
    scaler.update()
    opt.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    inject(model, "nan", 1, True)
    assert scaler.step(opt, None, tag=8) is None  # skipped, as in PyTorch


# ---- state_dict and pickling ----------------------------------------------------------------------


def _trained_scaler(scaler_cls, **kwargs):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = scaler_cls("cpu", init_scale=2.0**12, growth_interval=3, **kwargs)
    for step in range(5):
        opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        if step in (1, 3):
            inject(model, "inf", 2, False)
        scaler.step(opt)
        scaler.update()
    return scaler


def test_state_dict_loads_both_ways():
    theirs = _trained_scaler(torch.amp.GradScaler)
    ours = _trained_scaler(GradScaler)
    assert {k: ours.state_dict()[k] for k in theirs.state_dict()} == theirs.state_dict()

    into_torch = torch.amp.GradScaler("cpu")
    into_torch.load_state_dict(ours.state_dict())  # fastamp's extra keys do not bother torch
    assert into_torch.state_dict() == theirs.state_dict()

    into_ours = GradScaler("cpu", hysteresis=2)
    into_ours.load_state_dict(theirs.state_dict())
    assert {k: into_ours.state_dict()[k] for k in theirs.state_dict()} == theirs.state_dict()
    assert into_ours.state_dict()["_hysteresis_tracker"] == 2  # starts full when torch's dict has none

    # Loaded before the first scale() and after it (device state already created).
    fresh = GradScaler("cpu")
    fresh.scale(torch.ones(()))
    fresh.load_state_dict(ours.state_dict())
    assert fresh.state_dict() == ours.state_dict()


def test_state_dict_carries_hysteresis_and_counters():
    ours = _trained_scaler(GradScaler, hysteresis=3, min_scale=2.0, max_scale=2.0**20)
    state = ours.state_dict()
    assert state["hysteresis"] == 3 and state["min_scale"] == 2.0 and state["max_scale"] == 2.0**20
    assert state["_num_steps"] == 5 and state["_skipped_steps"] == 2
    # Steps 1 and 3 overflowed, with a clean step between: the tracker was refilled to 3, then used once.
    assert state["_hysteresis_tracker"] == 3 and state["scale"] == 2.0**12
    restored = GradScaler("cpu")
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.get_hysteresis() == 3 and restored.get_min_scale() == 2.0 and restored.get_max_scale() == 2.0**20


def test_pickle_round_trip_keeps_the_device_state():
    ours = _trained_scaler(GradScaler, hysteresis=2)
    clone = pickle.loads(pickle.dumps(ours))
    assert clone.state_dict() == ours.state_dict()
    assert clone._scale is None  # recreated lazily, as PyTorch does
    clone.scale(torch.ones(()))
    assert clone.state_dict() == ours.state_dict()


# ---- beyond PyTorch: fp16/bf16 grads ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_grads_are_unscaled(dtype):
    model = make_model(0, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(loss_of(model, 0)).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.unscale_(opt)
    for g, s in zip((p.grad for p in model.parameters()), scaled):
        assert g.dtype == dtype
        assert torch.equal(g, (s.float() * 2.0**-8).to(dtype))
    if dtype == torch.float16:
        with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
            theirs = torch.amp.GradScaler("cpu")
            theirs.scale(loss_of(model, 0))
            theirs.unscale_(opt)


def test_mixed_dtype_grads_with_an_overflow_in_the_bf16_one_skip_the_step():
    model = make_model()
    model[2].to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu")
    x, y = batch(0)
    loss = ((model[2](model[1](model[0](x)).bfloat16()).float() - y) ** 2).mean()
    scaler.scale(loss).backward()
    inject(model, "nan", 3, True)
    before = params_of(model)
    scaler.step(opt)
    scaler.update()
    assert scaler.last_step_skipped()
    assert_same_tensors(params_of(model), before)


def test_sparse_grads_match_torch():
    def run(scaler_cls):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 4, sparse=True)
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        scaler = scaler_cls("cpu", init_scale=2.0**4)
        for step in range(3):
            opt.zero_grad()
            scaler.scale(emb(torch.tensor([1, 2, 2, 7])).sum()).backward()
            scaler.step(opt)
            scaler.update()
        return emb.weight.detach().clone()

    assert torch.equal(run(GradScaler), run(torch.amp.GradScaler))


# ---- beyond PyTorch: clip_grad_norm_ ----------------------------------------------------------------


def _clipped_run(optimizer_name, fused_clip: bool, max_norm=0.05, steps=4, overflow_at=(2,)):
    model = make_model()
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    scaler = GradScaler("cpu", init_scale=2.0**10) if fused_clip else torch.amp.GradScaler("cpu", init_scale=2.0**10)
    norms = []
    for step in range(steps):
        opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        if step in overflow_at:
            inject(model, "inf", 1, True)
        if fused_clip:
            norm = scaler.clip_grad_norm_(opt, max_norm)
        else:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        norms.append(norm)
        scaler.step(opt)
        scaler.update()
    return norms, params_of(model), opt


@pytest.mark.parametrize("optimizer_name", ["sgd_momentum_foreach", "adamw_foreach", "adamw_fused", "sgd_fused", "adam_fused"])
def test_clip_grad_norm_matches_unscale_plus_torch_clip(optimizer_name):
    norms_f, params_f, opt_f = _clipped_run(optimizer_name, True)
    norms_t, params_t, opt_t = _clipped_run(optimizer_name, False)
    for step, (a, b) in enumerate(zip(norms_f, norms_t)):
        assert a.dtype == torch.float32 and a.dim() == 0
        if step == 2:
            assert not torch.isfinite(a) and not torch.isfinite(b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for a, b in zip(params_f, params_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The overflowing step was skipped by both: same number of optimizer steps.
    step_key = "step" if "sgd" not in optimizer_name else None
    if step_key:
        assert opt_f.state_dict()["state"][0]["step"] == opt_t.state_dict()["state"][0]["step"] == 3


def test_clip_grad_norm_returns_the_unscaled_norm_and_clips_to_max_norm():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model, 0)).backward()
    unscaled = [p.grad.double() / 2.0**10 for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in unscaled]))
    norm = scaler.clip_grad_norm_(opt, 0.01)
    torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(0.01, dtype=torch.float64), rtol=1e-5, atol=0)
    # A max_norm above the norm leaves the unscaled grads as they are.
    model2 = make_model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    scaler2 = GradScaler("cpu", init_scale=2.0**10)
    scaler2.scale(loss_of(model2, 0)).backward()
    scaled = [p.grad.clone() for p in model2.parameters()]
    scaler2.clip_grad_norm_(opt2, 1e6)
    for p, s in zip(model2.parameters(), scaled):
        torch.testing.assert_close(p.grad, s * 2.0**-10, rtol=1e-6, atol=0)


def test_clip_with_a_fused_optimizer_leaves_the_grads_to_the_optimizer():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model, 0)).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.clip_grad_norm_(opt, 0.05)
    assert_same_tensors([p.grad for p in model.parameters()], scaled)  # not rewritten
    before = params_of(model)
    scaler.step(opt)
    scaler.update()
    assert not any(torch.equal(a, b) for a, b in zip(params_of(model), before))


def test_clip_over_several_optimizers_uses_one_norm_and_one_flag():
    model = make_model()
    opt_a = torch.optim.SGD(list(model[0].parameters()), lr=0.1)
    opt_b = torch.optim.AdamW(list(model[2].parameters()), lr=1e-2, fused=True)
    scaler = GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model, 0)).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() / 2.0**10 for p in model.parameters()]))
    norm = scaler.clip_grad_norm_([opt_a, opt_b], 0.05)
    torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt_a)
    # An overflow in opt_b's grads skips opt_a too: the shared norm is not finite.
    scaler.step(opt_a)
    scaler.step(opt_b)
    scaler.update()
    opt_a.zero_grad()
    opt_b.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    inject(model, "nan", 2, False)
    before = params_of(model)
    state_b = copy.deepcopy(opt_b.state_dict())
    scaler.clip_grad_norm_([opt_a, opt_b], 0.05)
    scaler.step(opt_a)
    scaler.step(opt_b)
    scaler.update()
    assert_same_tensors(params_of(model), before)
    after_b = opt_b.state_dict()["state"]
    for k in after_b:
        for name in after_b[k]:
            assert torch.equal(after_b[k][name], state_b["state"][k][name])


def test_clip_grad_norm_misuse_and_options():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model, 0)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.clip_grad_norm_(opt, 1.0)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.clip_grad_norm_(opt, 1.0)
    scaler.update()

    # norm_type other than 2 falls back to unscale_ + PyTorch's clip.
    opt.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    unscaled = [p.grad.double() / scaler.get_scale() for p in model.parameters()]
    norm = scaler.clip_grad_norm_(opt, 1e6, norm_type=math.inf)
    torch.testing.assert_close(norm.double(), max(g.abs().max() for g in unscaled), rtol=1e-6, atol=0)
    scaler.step(opt)
    scaler.update()

    # error_if_nonfinite raises as PyTorch's clip does.
    opt.zero_grad()
    scaler.scale(loss_of(model, 2)).backward()
    inject(model, "inf", 0, False)
    with pytest.raises(RuntimeError, match="non-finite"):
        scaler.clip_grad_norm_(opt, 1.0, error_if_nonfinite=True)


def test_clip_grad_norm_on_a_disabled_scaler_is_plain_fused_clipping():
    model, reference = make_model(), make_model()
    scaler = GradScaler("cpu", enabled=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_of(model, 0).backward()
    loss_of(reference, 0).backward()
    norm = scaler.clip_grad_norm_(opt, 0.01)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)


# ---- beyond PyTorch: hysteresis, bounds, visibility -------------------------------------------------


def _scale_sequence(overflows, **kwargs):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = GradScaler("cpu", **kwargs)
    scales = []
    for step, overflow in enumerate(overflows):
        opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        if overflow:
            inject(model, "inf", 0, False)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, scaler


def test_hysteresis_min_and_max_scale_follow_the_documented_rules():
    # hysteresis=2: the second consecutive overflow backs off, and every one after it; a clean step refills.
    scales, _ = _scale_sequence([1, 1, 1, 0, 1, 1], init_scale=64.0, hysteresis=2, growth_interval=100)
    assert scales == [64.0, 32.0, 16.0, 16.0, 16.0, 8.0]
    scales, _ = _scale_sequence([1, 1, 1, 1], init_scale=64.0, min_scale=20.0)
    assert scales == [32.0, 20.0, 20.0, 20.0]
    scales, _ = _scale_sequence([0, 0, 0, 0], init_scale=64.0, growth_interval=1, max_scale=300.0)
    assert scales == [128.0, 256.0, 300.0, 300.0]


def test_found_inf_counters_and_overflow_report():
    scales, scaler = _scale_sequence([0, 1, 0, 0, 1], init_scale=2.0**10)
    assert scaler.num_steps == 5
    assert scaler.step_counts() == {"steps": 5, "taken": 3, "skipped": 2, "overflows": 2, "spikes": 0}
    assert int(scaler.skipped_steps) == 2
    assert scaler.last_step_skipped() and float(scaler.found_inf) == 1.0


def test_overflow_report_names_the_parameter_and_counts():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu")
    scaler.scale(loss_of(model, 0)).backward()
    model[2].bias.grad[0] = math.nan
    model[2].bias.grad[2] = -math.inf
    model[0].weight.grad[1, 1] = math.inf
    scaler.step(opt)
    assert scaler.found_inf is not None and scaler.last_step_skipped()
    report = scaler.overflow_report(model)
    assert [(r.name, r.nan, r.posinf, r.neginf) for r in report] == [("0.weight", 0, 1, 0), ("2.bias", 1, 0, 1)]
    scaler.update()
    opt.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    scaler.step(opt)
    scaler.update()
    assert not scaler.last_step_skipped() and scaler.overflow_report(dict(model.named_parameters())) == []


# ---- a skipped step leaves everything bit-identical -------------------------------------------------


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("path", ["step", "unscale", "clip"])
def test_skipped_step_leaves_params_and_optimizer_state_bit_identical(optimizer_name, path):
    model = make_model()
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    scaler = GradScaler("cpu", init_scale=2.0**10)
    for step in range(2):  # real state first: Adam's step counter and moments are non-zero
        opt.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        scaler.step(opt)
        scaler.update()
    params = params_of(model)
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    scaler.scale(loss_of(model, 5)).backward()
    inject(model, "nan", 3, True)
    if path == "unscale":
        scaler.unscale_(opt)
    elif path == "clip":
        scaler.clip_grad_norm_(opt, 0.1)
    assert scaler.step(opt) is None
    scaler.update()
    assert_same_tensors(params_of(model), params)
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for k, entries in state["state"].items():
        for name, value in entries.items():
            assert torch.equal(after["state"][k][name], value), (k, name)


# ---- host syncs -------------------------------------------------------------------------------------


def _count_host_reads(scaler_cls, optimizer_names, clip: str) -> int:
    models = [make_model(i) for i in range(len(optimizer_names))]
    opts = [OPTIMIZERS[name](m.parameters()) for name, m in zip(optimizer_names, models)]
    scaler = scaler_cls("cpu", init_scale=2.0**10)
    counter = HostReads()
    for opt in opts:
        counter.exclude(opt)
    with counter:
        for step in range(3):
            loss = sum(loss_of(m, step) for m in models)
            scaler.scale(loss).backward()
            if clip == "fastamp":
                scaler.clip_grad_norm_(opts, 1.0)
            elif clip == "torch":
                for opt in opts:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for m in models for p in m.parameters()], 1.0)
            for opt in opts:
                scaler.step(opt)
            scaler.update()
            for opt in opts:
                opt.zero_grad()
    return counter.count


def test_host_reads_per_step():
    # The counting mode works: PyTorch reads once per optimizer per step (plus clip's checks: none here).
    assert _count_host_reads(torch.amp.GradScaler, ["sgd", "adam"], "none") == 3 * 2
    # fastamp: fused optimizers never read; others read once per step for all optimizers unscaled together.
    assert _count_host_reads(GradScaler, ["adamw_fused", "sgd_fused"], "none") == 0
    assert _count_host_reads(GradScaler, ["adamw_fused", "sgd_fused"], "fastamp") == 0
    assert _count_host_reads(GradScaler, ["sgd", "adam"], "fastamp") == 3
    assert _count_host_reads(GradScaler, ["sgd", "adam"], "torch") == 3
    assert _count_host_reads(GradScaler, ["sgd"], "none") == 3


def test_exported_from_the_package():
    assert fastamp.GradScaler is GradScaler and "GradScaler" in fastamp.__all__


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_a_scaler_pinned_at_one_is_the_nonfinite_guard_of_a_bf16_loop_in_one_read(fused, clip):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None, foreach=None if fused else True)
    guard = GradScaler("cpu", init_scale=1.0, min_scale=1.0, max_scale=1.0)
    x = torch.randn(8, 16)
    for step in range(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        guard.scale(loss).backward()
        if step == 2:
            model[2].weight.grad[0, 0] = math.nan
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.state_dict()["state"])
        counter = FastampOpCalls()
        with counter:
            if clip:
                guard.clip_grad_norm_(opt, 0.5)
            guard.step(opt)
            guard.update()
        # One pass over the gradients to decide (the clip's norm with its coefficient and factor, or the
        # check), and one write only where a clip rescales a non-fused optimizer's gradients (fused ones
        # take the factor in their step). No separate clip_coef: the norm's op computes it.
        passes = [c for c in counter.calls if c in ("grad_norm", "clip_norm", "clip_coef", "unscale_check_",
                                                    "unscale_check_norm_", "scale_")]
        if clip:
            assert passes == (["clip_norm"] if fused else ["clip_norm", "scale_"]), passes
        else:
            assert len(passes) == 1 and passes[0] in ("grad_norm", "unscale_check_"), passes
        if step == 2:
            for a, b in zip(model.parameters(), before):
                assert torch.equal(a, b)
            after = opt.state_dict()["state"]
            for k in state:
                for name, value in state[k].items():
                    assert torch.equal(after[k][name], value)
    assert guard.get_scale() == 1.0 and guard.step_counts()["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("new_scale", [3, "2.0", torch.tensor([1.0, 2.0]), torch.tensor(2.0, requires_grad=True)])
def test_update_with_a_new_scale_raises_what_torch_raises(new_scale):
    """update(new_scale) is torch's own branch: the same inputs fail the same way (an int included)."""
    errors = []
    for cls in (torch.amp.GradScaler, GradScaler):
        scaler = cls("cpu", init_scale=4.0)
        scaler.scale(torch.ones(()))
        with pytest.raises(Exception) as info:
            scaler.update(new_scale)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


@pytest.mark.slow
def test_clip_grad_norm_compiles_whole_and_matches_eager():
    """torch.compile(fullgraph=True) of the fused clip (torch skips tracing torch/amp; fastamp's scaler
    keeps the few helpers it calls in its own file). The optimizer's step itself still graph-breaks:
    torch.optim wraps every step in torch._dynamo.graph_break() calls."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        scaler = GradScaler("cpu", init_scale=4.0)
        scaler.scale(model(torch.randn(2, 8)).sum()).backward()
        clip = lambda: scaler.clip_grad_norm_(opt, 1.0)  # noqa: E731
        results.append(torch.compile(clip, fullgraph=True)() if compiled else clip())
    assert torch.equal(results[0], results[1])
