"""FusedMixedPrecisionTrainer on CPU, against the hand-written stock AMP loop (fastamp.demo.stock_amp_loop)."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch

from fastamp import GradScaler
from fastamp.demo import stock_amp_loop
from fastamp.models import build_model, synthetic_batches
from fastamp.trainer import FusedMixedPrecisionTrainer, StepResult, normalize_precision, plot_dashboard

from .test_grad_scaler import HostReads

PRECISIONS = ["fp32", "fp16", "bf16"]


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("tiny", num_layers=1, d_model=32, num_heads=2, vocab_size=128, seq_len=16)


def batches(model, count: int, batch_size: int = 8, seed: int = 0):
    return list(itertools.islice(synthetic_batches(model.config, batch_size, seed=seed, num_tokens=64), count))


def adamw(model, fused: bool = True, lr: float = 3e-3):
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, foreach=None if fused else True)


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
    stock = stock_amp_loop(reference, adamw(reference, fused), data, "fp32", max_grad_norm=1e9)
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
    stock = stock_amp_loop(reference, adamw(reference, fused), data, precision, max_grad_norm=0.1)
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
        trainer = FusedMixedPrecisionTrainer(model, adamw(model, fused), precision=precision, init_scale=2.0**10,
                                             growth_interval=3, hysteresis=2)
        return trainer, injector

    straight, _ = make()
    for b in data:
        straight.train_step(b)

    first, _ = make()
    for b in data[:4]:
        first.train_step(b)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed, injector = make(seed=1)  # other initial weights: everything must come from the checkpoint
    injector.calls = 4  # the injected overflows follow the data, not the process
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    for b in data[4:]:
        resumed.train_step(b)

    for a, b in zip(params_of(straight.model), params_of(resumed.model)):
        assert torch.equal(a, b)
    s, r = straight.get_training_statistics(), resumed.get_training_statistics()
    for key in ["loss_values", "scale_values", "skipped", "gradient_norms", "overflow_step_indices"]:
        assert s[key] == r[key], key
    assert straight.scaler.state_dict() == resumed.scaler.state_dict()
    assert resumed.step == 8


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
    assert not FusedMixedPrecisionTrainer(model, adamw(model), precision="bf16").scaler.is_enabled()
    assert not FusedMixedPrecisionTrainer(model, adamw(model), precision="32-true").scaler.is_enabled()
    assert FusedMixedPrecisionTrainer(model, adamw(model), precision="bf16", scale_loss=True).scaler.is_enabled()
    assert not FusedMixedPrecisionTrainer(model, adamw(model), precision="fp16", loss_scaling=None).scaler.is_enabled()
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
    assert stats["total_steps"] == 5 and trainer.step == 5
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
    other = FusedMixedPrecisionTrainer(tiny_model(), adamw(tiny_model()), precision="bf16")
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
