"""fastamp.integrations.apply_fastamp with the real Accelerate and Transformers, on CPU: against the
stock libraries' own runs, with the skip detection, save/load and DDP of Accelerate itself."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

from fastamp import GradScaler  # noqa: E402
from fastamp.integrations import apply_fastamp  # noqa: E402
from fastamp.testing import FastampOpCalls  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    # Accelerate keeps one process-wide state; each test builds its own accelerator (as transformers'
    # hyper-parameter search does between trials).
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def data(n=10):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)) for _ in range(n)]


def accelerate_loop(mixed_precision, fused, fastamp, steps=10, inject_at=(), skip_nonfinite=False, fp16_scaler=None):
    """The loop of Accelerate's docs. fp16_scaler: on CPU, Accelerate builds no scaler (its native AMP
    is off there), so the test gives the accelerator the stock scaler it builds on a GPU."""
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    if fp16_scaler is not None:
        accelerator.scaler, accelerator.native_amp = fp16_scaler, True
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None, foreach=None if fused else True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    if fastamp:
        apply_fastamp(accelerator, skip_nonfinite=skip_nonfinite)
    hook_calls = {"n": 0}

    def inject(grad):
        hook_calls["n"] += 1
        if hook_calls["n"] - 1 in inject_at:
            grad = grad.clone()
            grad.view(-1)[0] = math.inf if mixed_precision == "fp16" else math.nan
        return grad

    model[2].weight.register_hook(inject)
    norms, skipped, lrs = [], [], []
    for x, y in data(steps):
        opt.zero_grad()
        with accelerator.autocast():
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        accelerator.backward(loss)
        norms.append(accelerator.clip_grad_norm_(model.parameters(), 0.5))
        opt.step()
        sched.step()
        skipped.append(accelerator.optimizer_step_was_skipped)
        lrs.append(sched.get_last_lr()[0])
    return accelerator, model, opt, [float(n) for n in norms], skipped, lrs


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
@pytest.mark.parametrize("fused", [False, True])
def test_accelerate_loop_matches_stock(mixed_precision, fused):
    _, stock_model, _, stock_norms, _, _ = accelerate_loop(mixed_precision, fused, fastamp=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    counter = FastampOpCalls()
    with counter:
        accelerator, model, _, norms, _, _ = accelerate_loop(mixed_precision, fused, fastamp=True)
    assert counter.calls.count("clip_norm") == 10  # the clip went through fastamp, once per step
    tol = 1e-6 if mixed_precision == "no" else 1e-2  # the norm's summation order differs
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(stock_norms), rtol=tol, atol=0)
    for p, q in zip(model.parameters(), stock_model.parameters()):
        torch.testing.assert_close(p, q, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_guard_skips_a_nan_step_the_stock_loop_writes_into_the_weights(fused):
    _, stock_model, *_ = accelerate_loop("bf16", fused, fastamp=False, inject_at={3})
    assert not all(torch.isfinite(p).all() for p in stock_model.parameters())
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, model, opt, norms, skipped, _ = accelerate_loop("bf16", fused, fastamp=True, inject_at={3},
                                                                 skip_nonfinite=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isnan(norms[3]) and all(math.isfinite(n) for i, n in enumerate(norms) if i != 3)
    assert opt.scaler.step_counts()["skipped"] == 1 and opt.scaler.get_scale() == 1.0
    # Accelerate notices a skip when the scaler did not call the optimizer's step (a non-fused one);
    # for a fused one, which skips on the device, apply_fastamp reports the device decision.
    assert skipped == [i == 3 for i in range(10)]


def test_fp16_scaler_becomes_fastamps_with_the_same_settings_and_state():
    stock = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=7)
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.scaler, accelerator.native_amp = stock, True
    net = mlp()
    model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    apply_fastamp(accelerator, hysteresis=2)
    scaler = accelerator.scaler
    assert isinstance(scaler, GradScaler) and opt.scaler is scaler
    assert (scaler.get_scale(), scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval(),
            scaler.get_hysteresis()) == (1024.0, 3.0, 0.25, 7, 2)
    assert apply_fastamp(accelerator) is accelerator and accelerator.scaler is scaler  # applying twice changes nothing


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_through_acceleratedoptimizer_skips_like_stock(fused):
    def run(fastamp):
        AcceleratorState._reset_state(reset_partial_state=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        return accelerate_loop("fp16", fused, fastamp=fastamp, inject_at={2, 6}, fp16_scaler=scaler)

    stock_acc, stock_model, stock_opt, stock_norms, stock_skipped, stock_lrs = run(False)
    accelerator, model, opt, norms, skipped, lrs = run(True)
    assert isinstance(opt.scaler, GradScaler) and opt.scaler is accelerator.scaler
    # Both tell the skipped steps, and the LR scheduler reacts to them; stock cannot tell a fused
    # optimizer's (it skips on the device), so stock's schedule advances there and fastamp's does not.
    assert [i for i, s in enumerate(skipped) if s] == [2, 6]
    if not fused:
        assert skipped == stock_skipped and lrs == stock_lrs
    else:
        assert not any(stock_skipped) and lrs != stock_lrs
    assert accelerator.scaler.get_scale() == stock_acc.scaler.get_scale() == 2.0**8
    if not fused:  # (fused: the learning rates differ after the first skip, by design)
        for p, q in zip(model.parameters(), stock_model.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-3)


def test_save_state_and_load_state_both_ways(tmp_path):
    def accelerator_with_scale(fastamp, scale):
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True, mixed_precision="fp16", project_dir=str(tmp_path))
        accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=scale), True
        net = mlp()
        model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
        if fastamp:
            apply_fastamp(accelerator)
        accelerator.scaler.scale(torch.ones(()))  # the scale tensor exists, as after a first backward
        return accelerator

    for save_with, load_with in [(True, False), (False, True), (True, True)]:
        saved = accelerator_with_scale(save_with, 512.0)
        saved.save_state(str(tmp_path / f"ckpt-{save_with}-{load_with}"))
        loaded = accelerator_with_scale(load_with, 4.0)
        loaded.load_state(str(tmp_path / f"ckpt-{save_with}-{load_with}"))
        assert loaded.scaler.get_scale() == 512.0, (save_with, load_with)
        assert isinstance(loaded.scaler, GradScaler) == load_with


def test_other_norm_types_and_parameter_subsets_use_accelerates_own_clip():
    accelerator = Accelerator(cpu=True)
    net = mlp()
    model, opt = accelerator.prepare(net, torch.optim.AdamW(net.parameters()))
    apply_fastamp(accelerator)
    x, y = data(1)[0]
    accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
    expected_inf = max(p.grad.abs().max() for p in model.parameters())
    expected_subset = torch.linalg.vector_norm(model[2].weight.grad)
    counter = FastampOpCalls()
    with counter:
        norm_inf = accelerator.clip_grad_norm_(model.parameters(), 1e9, norm_type=math.inf)
        norm_subset = accelerator.clip_grad_norm_([model[2].weight], 1e9)  # not the optimizer's whole set
    assert counter.calls == []
    assert torch.equal(norm_inf, expected_inf)
    torch.testing.assert_close(norm_subset, expected_subset)


def test_clip_grad_value_and_unscale_gradients_stay_correct():
    def grads_after(fastamp, clip):
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True, mixed_precision="fp16")
        accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=256.0), True
        net = mlp()
        model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
        if fastamp:
            apply_fastamp(accelerator)
        x, y = data(1)[0]
        with accelerator.autocast():
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        accelerator.backward(loss)
        clip(accelerator, model)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert not opt.step_was_skipped
        return grads

    for clip in (lambda a, m: a.clip_grad_value_(m.parameters(), 0.01),  # unscales first, then clips by value
                 lambda a, m: a.unscale_gradients()):
        # fp32 grads: fastamp's unscale is bit-identical to torch's.
        for ours, theirs in zip(grads_after(True, clip), grads_after(False, clip)):
            assert torch.equal(ours, theirs)


def test_apply_fastamp_refuses_other_objects():
    with pytest.raises(TypeError, match="accelerate.Accelerator or a transformers.Trainer"):
        apply_fastamp(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fp16 loss scaler"):
        apply_fastamp(Accelerator(cpu=True), hysteresis=2)


# ---- the Transformers Trainer -------------------------------------------------------------------------


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=240, seq=16, vocab=64):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(seq)) % vocab  # learnable: each token is the previous one plus one

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def run_trainer(tmp_path, fastamp, precision="bf16", inject_at=None, skip_nonfinite=False, steps=30, fused=False):
    model = tiny_gpt2()
    if inject_at is not None:
        calls = {"n": 0}

        def inject(grad):
            calls["n"] += 1
            if calls["n"] - 1 == inject_at:
                grad = grad.clone()
                grad.view(-1)[0] = math.nan
            return grad

        model.transformer.h[0].mlp.c_fc.weight.register_hook(inject)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
        max_grad_norm=1.0, use_cpu=True, bf16=precision == "bf16", logging_steps=1, report_to=[],
        save_strategy="no", disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
        optim="adamw_torch_fused" if fused else "adamw_torch", logging_nan_inf_filter=False,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
    if fastamp:
        apply_fastamp(trainer, skip_nonfinite=skip_nonfinite)
    counter = FastampOpCalls()
    with counter:
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [h["loss"] for h in logs], [h.get("grad_norm") for h in logs], counter.calls, model


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_transformers_trainer_matches_stock_and_clips_through_fastamp(tmp_path, precision):
    stock_losses, stock_norms, stock_calls, _ = run_trainer(tmp_path / "stock", False, precision)
    AcceleratorState._reset_state(reset_partial_state=True)
    losses, norms, calls, _ = run_trainer(tmp_path / "fastamp", True, precision)
    assert stock_calls == [] and calls.count("clip_norm") == 30  # every step's clip went through fastamp
    tol = 2e-2 if precision == "bf16" else 1e-4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stock_losses), rtol=tol, atol=tol)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(stock_norms), rtol=tol, atol=tol)
    assert losses[-1] < 0.85 * losses[0]  # it trains


@pytest.mark.slow
def test_transformers_trainer_guard_skips_an_injected_nan(tmp_path):
    stock_losses, *_ = run_trainer(tmp_path / "stock", False, inject_at=10, steps=16)
    assert all(math.isnan(v) for v in stock_losses[11:])  # stock: NaN from the next step on
    AcceleratorState._reset_state(reset_partial_state=True)
    losses, norms, _, model = run_trainer(tmp_path / "fastamp", True, inject_at=10, skip_nonfinite=True, steps=16)
    assert all(math.isfinite(v) for v in losses) and math.isnan(norms[10])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- DDP through Accelerate: 2 processes on gloo ---------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, fastamp, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    if fastamp:
        apply_fastamp(accelerator, skip_nonfinite=True)
    norms = []
    step = {"i": 0}

    def nan_on_rank_1_at_step_3(grad):
        # Before DDP's all-reduce (a tensor hook runs before the reducer's): the reduced grads carry it to
        # both ranks, which then take the same decision without any further collective.
        if rank == 1 and step["i"] == 3:
            grad = grad.clone()
            grad.view(-1)[0] = math.nan
        return grad

    accelerator.unwrap_model(model)[2].weight.register_hook(nan_on_rank_1_at_step_3)
    for i, (x, y) in enumerate(data(6)):
        step["i"] = i
        x, y = x[rank::world], y[rank::world]  # each rank its half of the batch
        opt.zero_grad()
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        norms.append(float(accelerator.clip_grad_norm_(model.parameters(), 0.5)))
        opt.step()
    torch.save({"params": [p.detach() for p in accelerator.unwrap_model(model).parameters()], "norms": norms},
               f"{out}-{rank}.pt")
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_through_accelerate_on_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    results = {}
    for fastamp in (False, True):
        out = str(tmp_path / f"ddp-{fastamp}")
        mp.spawn(_ddp_worker, args=(2, _free_port(), fastamp, out), nprocs=2, join=True)
        results[fastamp] = [torch.load(f"{out}-{r}.pt") for r in range(2)]
    ours = results[True]
    for a, b in zip(ours[0]["params"], ours[1]["params"]):
        assert torch.equal(a, b)  # the ranks agree, the skip included
    assert all(torch.isfinite(p).all() for p in ours[0]["params"])
    assert math.isnan(ours[0]["norms"][3]) and math.isnan(ours[1]["norms"][3])
    stock = results[False]
    assert not all(torch.isfinite(p).all() for p in stock[0]["params"])  # stock wrote the NaN in
    # Before the NaN, the two runs are the same training within fp32 rounding.
    torch.testing.assert_close(torch.tensor(ours[0]["norms"][:3]), torch.tensor(stock[0]["norms"][:3]),
                               rtol=1e-6, atol=0)


def test_applied_before_prepare_the_optimizers_prepared_later_get_fastamp():
    # fp16: the accelerator's scaler is replaced, and prepare hands it to the optimizers it wraps.
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=64.0), True
    apply_fastamp(accelerator)
    net = mlp()
    _, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert isinstance(opt.scaler, GradScaler) and opt.scaler is accelerator.scaler and opt.scaler.get_scale() == 64.0
    # bf16 with the guard: Accelerate gives later optimizers no scaler; apply_fastamp gives them the guard.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    apply_fastamp(accelerator, skip_nonfinite=True)
    net = mlp()
    model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert isinstance(opt.scaler, GradScaler) and opt.scaler.get_scale() == 1.0 and accelerator.scaler is None
    x, y = data(1)[0]
    with accelerator.autocast():
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    accelerator.backward(loss)
    net[0].weight.grad.view(-1)[0] = math.inf
    before = [p.detach().clone() for p in net.parameters()]
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    assert opt.step_was_skipped and all(torch.equal(a, b) for a, b in zip(net.parameters(), before))


@pytest.mark.parametrize("fused", [False, True])
def test_spike_guard_and_per_parameter_norms_through_accelerate(fused):
    from fastamp import SpikeGuard
    from fastamp.integrations import grad_norms

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None, foreach=None if fused else True)
    model, opt = accelerator.prepare(model, opt)
    apply_fastamp(accelerator, spike_guard=SpikeGuard(window=8, warmup=4), log_grad_norms=True)
    calls = {"n": 0}

    def spike(grad):
        calls["n"] += 1
        return grad * 1000 if calls["n"] == 9 else grad

    model[2].weight.register_hook(spike)
    skipped = []
    for x, y in data(12):
        opt.zero_grad()
        with accelerator.autocast():
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1e9)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        skipped.append(all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
    assert skipped == [False] * 8 + [True] + [False] * 3
    norms = grad_norms(accelerator, model)
    assert set(norms) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert norms[name] == pytest.approx(float(torch.linalg.vector_norm(p.grad.double())), rel=1e-5)


@pytest.mark.slow
def test_transformers_trainer_logs_per_parameter_norms(tmp_path):
    model = tiny_gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=3e-3, max_grad_norm=1.0,
        use_cpu=True, bf16=True, logging_steps=2, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
    apply_fastamp(trainer, log_grad_norms=True)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    names = {n for n, _ in model.named_parameters() if n != "lm_head.weight"}  # tied to the embedding
    assert len(logs) == 2 and all(names <= {k.split("/", 1)[1] for k in e if k.startswith("grad_norm/")} for e in logs)


@pytest.mark.slow
def test_transformers_trainer_fused_skip_does_not_advance_the_schedule(tmp_path):
    """optim="adamw_torch_fused", bf16, skip_nonfinite: the fused optimizer skips on the device, and the
    Trainer's optimizer_step_was_skipped now says so, so the LR schedule does not advance; stock (whose
    fused step is always "called") advances it on the bad step."""
    last_epochs = {}
    for fastamp in (False, True):
        AcceleratorState._reset_state(reset_partial_state=True)
        model = tiny_gpt2()
        calls = {"n": 0}

        def inject(grad):
            calls["n"] += 1
            return grad * math.nan if calls["n"] - 1 == 5 else grad

        model.transformer.h[0].mlp.c_fc.weight.register_hook(inject)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(fastamp)), max_steps=10, per_device_train_batch_size=8, learning_rate=3e-3,
            max_grad_norm=1.0, use_cpu=True, bf16=True, logging_steps=1, report_to=[], save_strategy="no",
            disable_tqdm=True, seed=0, optim="adamw_torch_fused", logging_nan_inf_filter=False)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
        if fastamp:
            apply_fastamp(trainer, skip_nonfinite=True)
        trainer.train()
        last_epochs[fastamp] = trainer.lr_scheduler.last_epoch
    assert last_epochs == {False: 10, True: 9}
