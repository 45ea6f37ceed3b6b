"""FusedMixedPrecisionTrainer on CPU, against the hand-written stock AMP loop (fastamp.testing.stock_loop,
written with torch alone)."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch

from fastamp import GradScaler
from fastamp._plots import plot_dashboard
from fastamp._precision import normalize_precision
from fastamp.testing import HostReads
from fastamp.testing.models import build_model, synthetic_batches
from fastamp.testing.stock_loop import stock_amp_run
from fastamp.trainer import FusedMixedPrecisionTrainer, StepResult

PRECISIONS = ["fp32", "fp16", "bf16"]


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("tiny", num_layers=1, d_model=32, num_heads=2, vocab_size=128, seq_len=16)


def batches(model, count: int, batch_size: int = 8, seed: int = 0):
    return list(itertools.islice(synthetic_batches(model.config, batch_size, seed=seed, num_tokens=64), count))


def adamw(model, fused: bool = True, lr: float = 3e-3):
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, foreach=None if fused else True)


def through_a_file(state):
    """``state`` after torch.save and torch.load, as a checkpoint is."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


class InfInjector:
    """A gradient hook that writes inf into one element of a parameter's grad on chosen calls."""

    def __init__(self, param: torch.Tensor, on_calls) -> None:
        self.calls = 0
        self.on_calls = set(on_calls)
        param.register_hook(self)

    def __call__(self, grad):
        call, self.calls = self.calls, self.calls + 1
        if call in self.on_calls:
            grad = grad.clone()
            grad.view(-1)[-1] = math.inf
        return grad


def test_precision_spellings():
    for spelling, canonical in [("32-true", "fp32"), ("16-mixed", "fp16"), ("bf16-mixed", "bf16"), ("fp16", "fp16")]:
        assert normalize_precision(spelling) == canonical
    with pytest.raises(ValueError, match="unknown precision"):
        normalize_precision("fp8")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_loss_decreases_on_the_synthetic_task(precision):
    model = tiny_model()
    trainer = FusedMixedPrecisionTrainer(model, adamw(model, lr=1e-2), precision=precision)
    stats = trainer.fit(batches(model, 40), max_steps=40, progress=False)
    assert stats["total_steps"] == 40
    first, last = sum(stats["loss_values"][:5]) / 5, sum(stats["loss_values"][-5:]) / 5
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("fused", [False, True])
def test_fp32_matches_the_stock_loop_exactly(fused):
    # With the clip inactive the numerics are the same operations: bit-identical parameters.
    model = tiny_model()
    reference = copy.deepcopy(model)
    data = batches(model, 6)
    trainer = FusedMixedPrecisionTrainer(model, adamw(model, fused), precision="fp32", max_grad_norm=1e9)
    stats = trainer.fit(data, 6, progress=False)
    stock = stock_amp_run(reference, adamw(reference, fused), data, "fp32", max_grad_norm=1e9)
    assert stats["loss_values"] == stock["loss_values"]
    for a, b in zip(params_of(model), params_of(reference)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("fused", [False, True])
def test_agrees_with_the_stock_loop_with_an_active_clip(precision, fused):
    model = tiny_model()
    reference = copy.deepcopy(model)
    data = batches(model, 8)
    trainer = FusedMixedPrecisionTrainer(model, adamw(model, fused), precision=precision, max_grad_norm=0.1)
    stats = trainer.fit(data, 8, progress=False)
    stock = stock_amp_run(reference, adamw(reference, fused), data, precision, max_grad_norm=0.1)
    tol = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}[precision]
    torch.testing.assert_close(torch.tensor(stats["loss_values"]), torch.tensor(stock["loss_values"]), rtol=tol, atol=tol)
    assert stats["overflow_step_indices"] == stock["overflow_step_indices"]
    norms = [n for n in stats["gradient_norms"] if n is not None]
    stock_norms = [n for n in stock["gradient_norms"] if n is not None]
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(stock_norms), rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("fused", [False, True])
def test_injected_inf_is_skipped_and_reported_by_name(fused):
    model = tiny_model()
    target = "layers.0.feedforward.0.weight"
    InfInjector(dict(model.named_parameters())[target], on_calls={3})
    trainer = FusedMixedPrecisionTrainer(model, adamw(model, fused), precision="fp16", init_scale=2.0**8)
    data = batches(model, 6)
    for step, batch in enumerate(data):
        before = params_of(model)
        state = copy.deepcopy(trainer.optimizer.state_dict())
        result = trainer.train_step(batch)
        if step == 3:
            assert result["skipped"] is True
            report = trainer.overflow_report()
            assert [(r.name, r.posinf) for r in report] == [(target, 1)]
            for a, b in zip(params_of(model), before):
                assert torch.equal(a, b)
            after = trainer.optimizer.state_dict()["state"]
            for k, entries in state["state"].items():
                for name, value in entries.items():
                    assert torch.equal(after[k][name], value)
        else:
            assert result["skipped"] is False and trainer.overflow_report() == []
    stats = trainer.get_training_statistics()
    assert stats["overflow_step_indices"] == [3] and stats["overflow_steps"] == 1 and stats["successful_steps"] == 5
    assert stats["gradient_norms"][3] is None
    assert stats["scale_updates"] == [2.0**8, 2.0**7]  # backed off once, at step 3
    assert stats["scale_values"] == [2.0**8] * 3 + [2.0**7] * 3


def test_gradient_accumulation_equals_one_big_batch():
    model = tiny_model()
    reference = copy.deepcopy(model)
    big = batches(model, 3, batch_size=8)
    small = [{k: v[i : i + 2] for k, v in b.items()} for b in big for i in range(0, 8, 2)]
    # SGD: the update is linear in the gradient (Adam would magnify rounding in near-zero gradients).
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)  # noqa: E731
    accumulated = FusedMixedPrecisionTrainer(model, sgd(model), precision="fp32", accumulation_steps=4, max_grad_norm=0.5)
    results = [accumulated.train_step(b) for b in small]
    assert [r.tensors["stepped"] for r in results] == [False, False, False, True] * 3
    one_batch = FusedMixedPrecisionTrainer(reference, sgd(reference), precision="fp32", max_grad_norm=0.5)
    for b in big:
        one_batch.train_step(b)
    for a, b in zip(params_of(model), params_of(reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a_stats, b_stats = accumulated.get_training_statistics(), one_batch.get_training_statistics()
    assert a_stats["total_steps"] == b_stats["total_steps"] == 3
    torch.testing.assert_close(torch.tensor(a_stats["loss_values"]), torch.tensor(b_stats["loss_values"]), rtol=1e-5, atol=0)
    assert a_stats["tokens"] == b_stats["tokens"] == [8 * 16] * 3


@pytest.mark.parametrize("precision,fused", [("fp16", True), ("fp16", False), ("bf16", True)])
def test_resumed_run_continues_bit_identically(precision, fused):
    data = batches(tiny_model(), 8)

    def make(seed=0):
        model = tiny_model(seed)
        # Overflows exercise the scaler state; bf16 has no scaler to skip them.
        injector = InfInjector(model.embedding.weight, on_calls={2, 6} if precision == "fp16" else ())
        # The injector counts its calls, and a diagnosis replay calls it too: diagnoses are tested elsewhere.
        trainer = FusedMixedPrecisionTrainer(model, adamw(model, fused), precision=precision, init_scale=2.0**10,
                                             growth_interval=3, hysteresis=2, diagnose_overflows=False)
        return trainer, injector

    straight, _ = make()
    for b in data:
        straight.train_step(b)

    first, _ = make()
    for b in data[:4]:
        first.train_step(b)
    resumed, injector = make(seed=1)  # other initial weights: everything must come from the checkpoint
    injector.calls = 4  # the injected overflows follow the data, not the process
    resumed.load_state_dict(through_a_file(first.state_dict()))
    for b in data[4:]:
        resumed.train_step(b)

    for a, b in zip(params_of(straight.model), params_of(resumed.model)):
        assert torch.equal(a, b)
    s, r = straight.get_training_statistics(), resumed.get_training_statistics()
    for key in ["loss_values", "scale_values", "skipped", "gradient_norms", "overflow_step_indices"]:
        assert s[key] == r[key], key
    assert straight.scaler.state_dict() == resumed.scaler.state_dict()
    assert resumed.num_steps == 8


def test_load_refuses_another_precision():
    model = tiny_model()
    state = FusedMixedPrecisionTrainer(model, adamw(model), precision="fp16").state_dict()
    with pytest.raises(ValueError, match="precision"):
        FusedMixedPrecisionTrainer(model, adamw(model), precision="bf16").load_state_dict(state)


def test_no_host_reads_per_step_with_a_fused_optimizer():
    for fused, precision, expected in [(True, "fp16", 0), (True, "bf16", 0), (False, "fp16", 4)]:
        model = tiny_model()
        opt = adamw(model, fused)
        trainer = FusedMixedPrecisionTrainer(model, opt, precision=precision)
        counter = HostReads()
        counter.exclude(opt)
        data = batches(model, 4)
        with counter:
            results = [trainer.train_step(b) for b in data]
        assert counter.count == expected, (fused, precision)
        assert all(isinstance(r.tensors["loss"], torch.Tensor) for r in results)
        assert isinstance(results[0]["loss"], float) and isinstance(results[0], StepResult)


def test_loss_scaling_options():
    model = tiny_model()
    for precision in ("bf16", "32-true"):
        # No loss scaling; the non-finite guard is a scaler pinned at 1 unless switched off.
        guarded = FusedMixedPrecisionTrainer(model, adamw(model), precision=precision)
        assert guarded.loss_scaling == "none" and guarded.skip_nonfinite and guarded.scaler.get_scale() == 1.0
        assert (guarded.scaler.get_min_scale(), guarded.scaler.get_max_scale()) == (1.0, 1.0)
        stock = FusedMixedPrecisionTrainer(model, adamw(model), precision=precision, skip_nonfinite=False)
        assert not stock.scaler.is_enabled() and not stock.skip_nonfinite
    assert FusedMixedPrecisionTrainer(model, adamw(model), precision="bf16", scale_loss=True).scaler.is_enabled()
    unscaled = FusedMixedPrecisionTrainer(model, adamw(model), precision="fp16", loss_scaling=None)
    assert unscaled.loss_scaling == "none" and unscaled.scaler.get_scale() == 1.0  # the guard still skips inf/nan
    with pytest.raises(ValueError, match="loss_scaling"):
        FusedMixedPrecisionTrainer(model, adamw(model), loss_scaling="sometimes")
    with pytest.raises(ValueError, match="accumulation_steps"):
        FusedMixedPrecisionTrainer(model, adamw(model), accumulation_steps=0)

    # A static scale stays put, even across an overflow (which is still skipped).
    for loss_scaling, expected in [(512.0, 512.0), ("static", 2.0**16)]:
        model = tiny_model()
        InfInjector(model.embedding.weight, on_calls={1})
        trainer = FusedMixedPrecisionTrainer(model, adamw(model), precision="fp16", loss_scaling=loss_scaling,
                                             growth_interval=1)
        stats = trainer.fit(batches(model, 4), 4, progress=False)
        assert stats["scale_values"] == [expected] * 4 and stats["overflow_step_indices"] == [1]
        assert trainer.loss_scaling == "static"


def test_batch_forms_and_loss_fn():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, y):
            return torch.nn.functional.mse_loss(self.net(x), y)

    model = Regression()
    trainer = FusedMixedPrecisionTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp32")
    first = trainer.train_step((x, y))["loss"]
    trainer.train_step({"x": x, "y": y})
    with_fn = FusedMixedPrecisionTrainer(net, torch.optim.SGD(net.parameters(), lr=0.1), precision="bf16",
                                         loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]).float(), b[1]))
    for _ in range(5):
        last = with_fn.train_step((x, y))["loss"]
    assert last < first
    lm = tiny_model()
    no_labels = FusedMixedPrecisionTrainer(lm, adamw(lm), precision="fp32")
    with pytest.raises(TypeError, match="loss_fn"):
        no_labels.train_step(batches(lm, 1)[0]["input_ids"])  # {"logits"} only: no loss to train on
    with pytest.raises(ValueError, match="scalar"):
        FusedMixedPrecisionTrainer(net, torch.optim.SGD(net.parameters(), lr=0.1), precision="fp32",
                                   loss_fn=lambda m, b: m(b)).train_step(x)


def test_fit_logs_and_stops_when_a_one_shot_iterator_ends():
    model = tiny_model()
    trainer = FusedMixedPrecisionTrainer(model, adamw(model), precision="fp32")
    lines = []
    stats = trainer.fit(iter(batches(model, 5)), max_steps=10, log_every=2, progress=False, log=lines.append)
    assert stats["total_steps"] == 5 and trainer.num_steps == 5
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4"]
    # A list is started again until max_steps.
    stats = trainer.fit(batches(model, 3), max_steps=7, progress=False)
    assert stats["total_steps"] == 12


def test_statistics_cover_the_reference_trainers_and_more():
    model = tiny_model()
    trainer = FusedMixedPrecisionTrainer(model, adamw(model), precision="fp16")
    stats = trainer.fit(batches(model, 5), 5, progress=False)
    reference_keys = {"total_steps", "successful_steps", "overflow_steps", "scale_updates", "gradient_norms",
                      "loss_values", "step_times", "memory_usage", "success_rate", "overflow_rate", "avg_step_time",
                      "avg_loss", "avg_gradient_norm", "max_memory_mb"}
    assert reference_keys <= set(stats)
    assert {"avg_optimizer_time", "tokens_per_second", "optimizer_times"} <= set(stats)
    assert stats["success_rate"] == 1.0 and stats["tokens_per_second"] > 0 and stats["max_memory_mb"] > 0
    assert all(0 < o <= s for o, s in zip(stats["optimizer_times"], stats["step_times"]))
    norms = [n for n in stats["gradient_norms"]]
    assert stats["avg_gradient_norm"] == pytest.approx(sum(norms) / len(norms))


def test_dashboard_is_a_png_with_or_without_a_comparison(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_model()
    InfInjector(model.embedding.weight, on_calls={1})
    trainer = FusedMixedPrecisionTrainer(model, adamw(model), precision="fp16")
    trainer.fit(batches(model, 4), 4, progress=False)
    alone = trainer.plot_dashboard(str(tmp_path / "alone.png"))
    other_model = tiny_model()
    other = FusedMixedPrecisionTrainer(other_model, adamw(other_model), precision="bf16")
    both = plot_dashboard(str(tmp_path / "both.png"),
                          {"fp16": trainer.get_training_statistics(), "bf16": other.fit(batches(model, 4), 4, progress=False)})
    for path in (alone, both):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_trainer_uses_fastamps_scaler():
    model = tiny_model()
    trainer = FusedMixedPrecisionTrainer(model, adamw(model), precision="fp16", hysteresis=3, min_scale=4.0)
    assert isinstance(trainer.scaler, GradScaler)
    assert trainer.scaler.get_hysteresis() == 3 and trainer.scaler.get_min_scale() == 4.0


class NaNInjector(InfInjector):
    """Writes NaN into one element of a parameter's grad on chosen calls."""

    def __call__(self, grad):
        call, self.calls = self.calls, self.calls + 1
        if call in self.on_calls:
            grad = grad.clone()
            grad.view(-1)[0] = math.nan
        return grad


def _optimizer_state(trainer):
    return copy.deepcopy(trainer.optimizer.state_dict()["state"])


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for name, value in a[k].items():
            assert torch.equal(b[k][name], value), (k, name)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_guard_skips_a_nan_step_without_a_scaler(precision, fused):
    model = tiny_model()
    target = "layers.0.feedforward.0.weight"
    NaNInjector(dict(model.named_parameters())[target], on_calls={2})
    trainer = FusedMixedPrecisionTrainer(model, adamw(model, fused), precision=precision)
    data = batches(model, 5)
    for step, batch in enumerate(data):
        before, state = params_of(model), _optimizer_state(trainer)
        result = trainer.train_step(batch)
        assert result["skipped"] is (step == 2)
        if step == 2:
            for a, b in zip(params_of(model), before):
                assert torch.equal(a, b)
            _assert_states_equal(state, _optimizer_state(trainer))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    stats = trainer.get_training_statistics()
    assert stats["overflow_step_indices"] == [2] and stats["skip_nonfinite"] and stats["scale_values"] == [1.0] * 5
    (diagnosis,) = trainer.overflow_diagnoses
    # The injector fires in the replay too (call 3 is not in on_calls): the replay is clean, and says so.
    assert diagnosis.step == 2 and stats["overflow_diagnoses"][0]["step"] == 2


def test_without_the_guard_one_nan_gradient_ruins_the_weights():
    model = tiny_model()
    NaNInjector(model.embedding.weight, on_calls={1})
    trainer = FusedMixedPrecisionTrainer(model, adamw(model), precision="bf16", skip_nonfinite=False)
    stats = trainer.fit(batches(model, 4), 4, progress=False)
    assert not torch.isfinite(model.embedding.weight).all()
    assert stats["overflow_steps"] == 0 and math.isnan(stats["loss_values"][-1])


@pytest.mark.parametrize("fused", [False, True])
def test_skipped_steps_are_diagnosed_by_module(fused):
    model = tiny_model()
    name = "layers.0.feedforward.0"
    module = dict(model.named_modules())[name]
    # The culprit follows the data (batch 3 is marked), as a real one does, so that a later replay sees it.
    data = batches(model, 6)
    for i, b in enumerate(data):
        b["input_ids"][0, 0] = 7 if i == 3 else 8
    model.register_forward_pre_hook(
        lambda m, args, kwargs: setattr(module, "amplify", bool(kwargs["input_ids"][0, 0] == 7)), with_kwargs=True)
    module.register_forward_hook(lambda m, i, out: out * 1e6 if m.amplify else None)
    trainer = FusedMixedPrecisionTrainer(model, adamw(model, fused), precision="fp16", init_scale=2.0**8)
    host_reads_at_step = []
    for batch in data:
        trainer.train_step(batch)
        host_reads_at_step.append(len(trainer.overflow_diagnoses))
    # Non-fused: the step read the flag and was diagnosed at once; fused: only when the flags are read.
    assert host_reads_at_step[3] == (0 if fused else 1)
    stats = trainer.get_training_statistics()
    assert stats["overflow_step_indices"] == [3]
    (diagnosis,) = trainer.overflow_diagnoses
    assert diagnosis.found and diagnosis.step == 3 and diagnosis.phase == "forward"
    assert diagnosis.module == name and diagnosis.replayed_at_step == (6 if fused else 4)


def test_no_overflow_no_diagnosis_and_no_host_reads():
    model = tiny_model()
    opt = adamw(model, True)
    trainer = FusedMixedPrecisionTrainer(model, opt, precision="fp16")
    counter = HostReads()
    counter.exclude(opt)
    with counter:
        for b in batches(model, 4):
            trainer.train_step(b)
    assert counter.count == 0 and trainer.overflow_diagnoses == []


def test_a_stuck_run_warns_once():
    from fastamp import TrainingStuckWarning

    model = tiny_model()
    InfInjector(model.embedding.weight, on_calls=range(100))  # every backward, replays included
    trainer = FusedMixedPrecisionTrainer(model, adamw(model, False), precision="fp16", stuck_after=3)
    with pytest.warns(TrainingStuckWarning, match="3 consecutive"):
        trainer.fit(batches(model, 5), 5, progress=False)


def test_a_checkpoint_between_micro_batches_resumes_bit_identically():
    data = batches(tiny_model(), 20, batch_size=4)

    def make(seed=0):
        model = tiny_model(seed)
        return FusedMixedPrecisionTrainer(model, adamw(model), precision="fp16", accumulation_steps=2)

    straight = make()
    for b in data:
        straight.train_step(b)
    first = make()
    for b in data[:11]:  # half-way through window 6
        first.train_step(b)
    resumed = make(seed=1)
    resumed.load_state_dict(through_a_file(first.state_dict()))
    for b in data[11:]:
        resumed.train_step(b)
    for a, b in zip(params_of(straight.model), params_of(resumed.model)):
        assert torch.equal(a, b)
    s, r = straight.get_training_statistics(), resumed.get_training_statistics()
    for key in ["loss_values", "scale_values", "skipped", "gradient_norms", "tokens"]:
        assert s[key] == r[key], key


def test_a_checkpoint_without_the_window_is_refused_before_anything_changes():
    model = tiny_model()
    trainer = FusedMixedPrecisionTrainer(model, adamw(model), precision="fp16", accumulation_steps=2)
    trainer.train_step(batches(model, 1)[0])
    state = trainer.state_dict()
    state["window"] = None
    fresh_model = tiny_model(seed=1)
    fresh = FusedMixedPrecisionTrainer(fresh_model, adamw(fresh_model), precision="fp16", accumulation_steps=2)
    before = params_of(fresh_model)
    with pytest.raises(ValueError, match="accumulation window"):
        fresh.load_state_dict(state)
    for a, b in zip(params_of(fresh_model), before):
        assert torch.equal(a, b)


def test_a_replay_that_raises_is_reported_and_training_goes_on():
    model = tiny_model()
    InfInjector(model.embedding.weight, on_calls={1})
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the replay of step 1's batch (the 3rd call) fails
            raise RuntimeError("replay refused")
        return m(**batch)["loss"]

    trainer = FusedMixedPrecisionTrainer(model, adamw(model, False), precision="fp16", loss_fn=loss_fn)
    stats = trainer.fit(batches(model, 4), 4, progress=False)
    assert stats["total_steps"] == 4 and stats["overflow_step_indices"] == [1]
    (report,) = trainer.overflow_diagnoses
    assert not report.found and "replay refused" in report.notes[0]


@pytest.mark.parametrize("precision,loss_scaling,scale_loss,skip_nonfinite,expected", [
    ("fp16", "dynamic", None, True, ("dynamic", True)),
    ("fp16", 128.0, None, True, ("static", True)),
    ("fp16", None, None, True, ("none", True)),
    ("fp16", "dynamic", False, False, ("none", False)),
    ("bf16", "dynamic", None, True, ("none", True)),
    ("bf16", "dynamic", None, False, ("none", False)),
    ("bf16", "dynamic", True, False, ("dynamic", True)),
    ("fp32", "static", True, False, ("static", True)),
])
def test_the_three_scaling_knobs_resolve_in_one_place(precision, loss_scaling, scale_loss, skip_nonfinite, expected):
    """Hand-written table of what the knobs mean; the trainer built from them agrees."""
    model = torch.nn.Linear(4, 2)
    trainer = FusedMixedPrecisionTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), precision=precision,
                                         loss_scaling=loss_scaling, scale_loss=scale_loss, skip_nonfinite=skip_nonfinite,
                                         device="cpu")
    assert (trainer.loss_scaling, trainer.scaler.is_enabled()) == expected
    if trainer.loss_scaling == "static":
        assert trainer.scaler.get_min_scale() == trainer.scaler.get_max_scale() == trainer.scaler.get_scale()
    if trainer.loss_scaling == "none" and trainer.scaler.is_enabled():
        assert trainer.scaler.get_scale() == 1.0 == trainer.scaler.get_max_scale()
    with pytest.warns(DeprecationWarning):
        assert trainer.step == trainer.num_steps == 0
