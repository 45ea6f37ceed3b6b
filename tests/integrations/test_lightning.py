"""fastamp.integrations.lightning on CPU: the plugin against Lightning's own MixedPrecision plugin, checkpoints both
ways, manual optimization, and the AMPMonitor callback on an injected overflow."""

from __future__ import annotations

import math

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from fastamp import GradScaler  # noqa: E402
from fastamp.integrations.lightning import AMPMonitor, FusedMixedPrecision  # noqa: E402


class Regression(L.LightningModule):
    def __init__(self, fused: bool = False, inject_at=(), manual: bool = False, lr: float = 0.05):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.fused, self.inject_at, self.lr = fused, set(inject_at), lr
        self.automatic_optimization = not manual
        self.losses = []
        self.net[2].weight.register_hook(self._maybe_inject)

    def _maybe_inject(self, grad):
        if self.global_step in self.inject_at:
            grad = grad.clone()
            grad.view(-1)[0] = math.inf
        return grad

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        self.losses.append(loss.detach())
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.1, gradient_clip_algorithm="norm")
        opt.step()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=self.fused or None)


def data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def fit(module, plugin, max_steps=12, accumulate=1, clip=0.5, callbacks=(), ckpt_path=None, root=None):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, plugins=[plugin], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=clip if module.automatic_optimization else None,
                        accumulate_grad_batches=accumulate, callbacks=list(callbacks), default_root_dir=root)
    trainer.fit(module, data(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_trains_with_clipping_and_accumulation_and_matches_the_stock_plugin(precision):
    ours = Regression()
    fit(ours, FusedMixedPrecision(precision, "cpu"), max_steps=16, accumulate=2)
    assert torch.stack(ours.losses[-4:]).mean() < 0.5 * torch.stack(ours.losses[:4]).mean()
    stock = Regression()
    fit(stock, MixedPrecision(precision, "cpu"), max_steps=16, accumulate=2)
    tol = 1e-3 if precision == "16-mixed" else 2e-2
    torch.testing.assert_close(torch.stack(ours.losses), torch.stack(stock.losses), rtol=tol, atol=tol)
    for p, q in zip(ours.parameters(), stock.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def test_clipping_with_a_fused_optimizer_which_the_stock_plugin_refuses():
    with pytest.raises(RuntimeError, match="fused"):
        fit(Regression(fused=True), MixedPrecision("16-mixed", "cpu"), max_steps=2)
    ours, reference = Regression(fused=True), Regression(fused=False)
    plugin = FusedMixedPrecision("16-mixed", "cpu")
    fit(ours, plugin, max_steps=10)
    fit(reference, MixedPrecision("16-mixed", "cpu"), max_steps=10)
    assert isinstance(plugin.scaler, GradScaler) and plugin.last_grad_norm is not None
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_checkpoints_resume_across_the_stock_and_fastamp_plugins(tmp_path):
    for first, second in [(MixedPrecision, FusedMixedPrecision), (FusedMixedPrecision, MixedPrecision)]:
        module = Regression(inject_at={1, 3})
        plugin = first("16-mixed", "cpu", GradScaler("cpu", init_scale=2.0**10) if first is FusedMixedPrecision
                       else torch.amp.GradScaler("cpu", init_scale=2.0**10))
        trainer = fit(module, plugin, max_steps=5)
        saved_scale = plugin.scaler.get_scale()
        assert saved_scale == 2.0**8  # two overflows backed it off twice
        path = str(tmp_path / f"{first.__name__}.ckpt")
        trainer.save_checkpoint(path)
        resumed_plugin = second("16-mixed", "cpu")
        loaded = {}

        class Capture(L.Callback):
            def on_train_start(self, trainer, pl_module):
                loaded["scale"] = trainer.precision_plugin.scaler.get_scale()

        fit(Regression(), resumed_plugin, max_steps=6, callbacks=[Capture()], ckpt_path=path)
        assert loaded["scale"] == saved_scale, (first.__name__, second.__name__)


def test_manual_optimization_clips_unscaled_gradients():
    module = Regression(manual=True, lr=0.0)
    plugin = FusedMixedPrecision("16-mixed", "cpu", init_scale=2.0**12)
    seen = []

    class GradNorms(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in pl_module.parameters()])))

    fit(module, plugin, max_steps=3, callbacks=[GradNorms()])
    # The clip saw unscaled grads (norm of order 1, not 4096x that) and cut them to 0.1.
    assert 1e-3 < float(plugin.last_grad_norm) < 100
    for norm in seen:
        assert float(norm) == pytest.approx(0.1, rel=1e-4)


def test_amp_monitor_logs_and_names_the_overflowing_parameter():
    module = Regression(inject_at={3})
    monitor = AMPMonitor(log_every_n_steps=2)
    plugin = FusedMixedPrecision("16-mixed", "cpu", init_scale=2.0**10)
    fit(module, plugin, max_steps=8, callbacks=[monitor])
    assert [step for step, _ in monitor.overflow_reports] == [4]  # global_step after the skipped step 3
    (record,) = monitor.overflow_reports[0][1]
    assert record.name == "net.2.weight" and record.posinf == 1
    by_step = {int(v["step"]): v for v in monitor.logged}
    assert sorted(by_step) == [2, 4, 6, 8]
    assert by_step[2]["amp/scale"] == 2.0**10 and by_step[4]["amp/scale"] == 2.0**9
    assert by_step[2]["amp/skipped_steps"] == 0 and by_step[8]["amp/skipped_steps"] == 1
    assert all(v["amp/optimizer_ms"] > 0 and v["amp/memory_mb"] > 0 and v["amp/grad_norm"] > 0 for v in monitor.logged)


def test_plugin_arguments():
    assert FusedMixedPrecision("bf16-mixed", "cpu").scaler is None
    plugin = FusedMixedPrecision("16-mixed", "cpu", hysteresis=2, min_scale=8.0)
    assert plugin.scaler.get_hysteresis() == 2 and plugin.scaler.get_min_scale() == 8.0
    with pytest.raises(ValueError, match="also takes '32-true'"):
        FusedMixedPrecision("fp8", "cpu")
    assert FusedMixedPrecision("32-true", "cpu").scaler is None  # a drop-in: no guard unless asked
    guard = FusedMixedPrecision("bf16-mixed", "cpu", skip_nonfinite=True)
    assert guard.scaler.get_scale() == 1.0 and guard.scaler.get_max_scale() == 1.0


def test_another_scaler_with_a_fused_optimizer_refuses_to_clip_scaled_gradients():
    """It used to clip the still-scaled grads (an effective clip of clip_val / scale), silently."""
    plugin = FusedMixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024))
    with pytest.raises(RuntimeError, match="folds the clip into the optimizer's step"):
        fit(Regression(fused=True), plugin, max_steps=1, clip=0.01)


def test_errors_carry_lightnings_own_texts():
    """Lightning's tests of its MixedPrecision (test_amp_precision_plugin_parameter_validation,
    test_optimizer_amp_scaling_support_in_step_method) match these patterns; so do users'."""
    stock_text = r"Passed `MixedPrecision\(precision='16'\)`. Precision must be '16-mixed' or 'bf16-mixed'"
    with pytest.raises(ValueError, match=stock_text):
        FusedMixedPrecision("16", "cpu")
    plugin = FusedMixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024))
    with pytest.raises(RuntimeError, match="The current optimizer.*does not allow for gradient clipping"):
        fit(Regression(fused=True), plugin, max_steps=1, clip=0.01)


def test_subclasses_overriding_lightnings_clip_hooks_are_honoured():
    calls = []

    class Custom(FusedMixedPrecision):
        def clip_grad_by_norm(self, optimizer, clip_val):
            calls.append(("norm", clip_val))
            super().clip_grad_by_norm(optimizer, clip_val)

        def clip_grad_by_value(self, optimizer, clip_val):
            calls.append(("value", clip_val))
            super().clip_grad_by_value(optimizer, clip_val)

    plugin = Custom("16-mixed", "cpu")
    fit(Regression(), plugin, max_steps=2, clip=0.5)
    assert calls == [("norm", 0.5)] * 2 and plugin.last_grad_norm is not None
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, plugins=[Custom("16-mixed", "cpu")], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=0.05, gradient_clip_algorithm="value")
    trainer.fit(Regression(), data())
    assert calls[-2:] == [("value", 0.05)] * 2
    assert all(bool((p.grad.abs() <= 0.05).all()) for p in trainer.lightning_module.parameters() if p.grad is not None)


def test_checkpoints_carry_the_scaler_state_once(tmp_path):
    trainer = fit(Regression(), FusedMixedPrecision("16-mixed", "cpu"), max_steps=2)
    path = tmp_path / "one.ckpt"
    trainer.save_checkpoint(str(path))
    checkpoint = torch.load(path, weights_only=False)
    assert "MixedPrecision" in checkpoint and "FusedMixedPrecision" not in checkpoint
    assert checkpoint["MixedPrecision"]["scale"] == trainer.precision_plugin.scaler.get_scale()


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("fused", [False, True])
def test_the_nonfinite_guard_skips_without_a_loss_scaler(precision, fused):
    guarded = Regression(fused=fused, inject_at={3})
    plugin = FusedMixedPrecision(precision, "cpu", skip_nonfinite=True)
    fit(guarded, plugin, max_steps=8)
    assert all(torch.isfinite(p).all() for p in guarded.parameters())
    counts = plugin.scaler.step_counts()
    assert (counts["steps"], counts["skipped"]) == (8, 1)
    stock = Regression(fused=fused, inject_at={3})
    fit(stock, FusedMixedPrecision(precision, "cpu"), max_steps=8)
    assert not all(torch.isfinite(p).all() for p in stock.parameters())


def test_32_true_runs_without_autocast():
    module = Regression()
    seen = []
    module.net[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    fit(module, FusedMixedPrecision("32-true", "cpu", skip_nonfinite=True), max_steps=2)
    assert seen == [torch.float32, torch.float32]


def _regression_loss(module, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(module.net(x).float(), y)


def test_amp_monitor_diagnoses_the_skipped_batch_and_warns_when_stuck():
    module = Regression()
    # The culprit follows the data: the 4th batch carries a marker that makes net.0 amplify its output.
    module.net[0].register_forward_hook(lambda m, inputs, out: out * 1e5 if inputs[0].abs().max() > 100 else None)
    loader = data()
    x, y = loader.dataset.tensors
    x[3 * 8, 0] = 1e3
    monitor = AMPMonitor(log_every_n_steps=100, loss_fn=_regression_loss)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, plugins=[FusedMixedPrecision("16-mixed", "cpu")],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[monitor])
    trainer.fit(module, loader)
    (report,) = monitor.overflow_diagnoses
    assert report.found and report.step == 3 and (report.phase, report.module) == ("forward", "net.0")

    from fastamp import TrainingStuckWarning

    stuck = Regression(inject_at=range(100))
    with pytest.warns(TrainingStuckWarning, match="3 consecutive"):
        fit(stuck, FusedMixedPrecision("16-mixed", "cpu"), max_steps=5, callbacks=[AMPMonitor(stuck_after=3)])


@pytest.mark.slow
def test_model_parallel_strategy_fsdp_x_tp_clips_with_the_global_norm(tmp_path):
    """Lightning's FSDP2 home (ModelParallelStrategy, 2 x 2 on 4 gloo ranks, launched by torchrun): the
    plugin, told nothing of the layout, clips with the fp64 global norm on every rank, and a NaN in one
    rank's batch is skipped on all (bf16-mixed with the guard)."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "result.json"
    job = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightning_model_parallel_job.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--rdzv-backend",
                          "c10d", "--rdzv-endpoint", "127.0.0.1:0", job, str(out)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-6000:]
    seen = json.loads(out.read_text())
    assert seen["skipped"] == [False, False, False, True, False]
    for step, (oracle, plugin) in enumerate(zip(seen["oracle"], seen["plugin"])):
        if step == 3:
            assert math.isnan(plugin)
            continue
        assert abs(plugin - oracle) <= 1e-6 * oracle, step
    first = [repr(v) for v in seen["every_rank"][0]]  # repr: NaN compares equal to itself there
    assert all([repr(v) for v in ranks] == first for ranks in seen["every_rank"])


class SpikyRegression(Regression):
    """A finite spike: the gradients of step 9 are a thousand times their size."""

    def _maybe_inject(self, grad):
        return grad * 1000 if self.global_step == 9 else grad


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_the_spike_guard_skips_a_spike_and_the_monitor_logs_per_parameter_norms(precision):
    from fastamp import SpikeGuard

    module = SpikyRegression(fused=True)
    guard = SpikeGuard(window=8, warmup=4)
    plugin = FusedMixedPrecision(precision, "cpu", spike_guard=guard)
    monitor = AMPMonitor(log_every_n_steps=4, log_grad_norms=True)
    fit(module, plugin, max_steps=12, clip=1e9, callbacks=[monitor])
    counts = plugin.scaler.step_counts()
    assert counts["spikes"] == 1 and counts["skipped"] == 1 + counts["overflows"]
    logged = monitor.logged[-1]
    names = {n for n, _ in module.named_parameters()}
    assert {k.split("/", 1)[1] for k in logged if k.startswith("grad_norm/")} == names
    norms = plugin.grad_norms(module)
    assert set(norms) == names and all(v > 0 for v in norms.values())


class ScheduledRegression(Regression):
    """StepLR(gamma=0.9) stepped by Lightning every optimizer step; a NaN gradient at step 4."""

    def _maybe_inject(self, grad):
        return grad * math.nan if self.global_step == 4 else grad

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.1, fused=self.fused or None, foreach=None if self.fused else True)
        self.scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_step_does_not_advance_lightnings_schedule(fused):
    module = ScheduledRegression(fused=fused)
    plugin = FusedMixedPrecision("bf16-mixed", "cpu", skip_nonfinite=True)
    fit(module, plugin, max_steps=10, clip=1.0)
    assert plugin.scaler.step_counts()["skipped"] == 1
    assert module.scheduler.last_epoch == 9
    assert float(module.scheduler.optimizer.param_groups[0]["lr"]) == pytest.approx(0.1 * 0.9**9, rel=1e-6)
