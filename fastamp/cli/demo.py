"""``fastamp demo``: the test transformer trained twice, stock PyTorch AMP vs FusedMixedPrecisionTrainer.

Both runs start from the same weights and see the same batches. The stock loop is the one people write
by hand (:class:`fastamp.testing.stock_loop.StockAMPLoop`: autocast forward, ``torch.amp.GradScaler``
scaled backward, ``unscale_``, ``torch.nn.utils.clip_grad_norm_``, ``step``, ``update``). The fastamp run
is :class:`~fastamp.trainer.FusedMixedPrecisionTrainer` with the same optimizer settings. The two run
interleaved, in blocks of steps whose order alternates, so that load on the machine hits both alike;
the table shows the median step time and its spread.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import statistics
from typing import Any, Callable, Dict, Optional

import torch

from .._metrics import StepHistory, StepTimer, memory_mb, training_statistics
from .._plots import plot_dashboard
from .._precision import normalize_precision
from ..spike_guard import SpikeGuard
from ..testing.models import MODEL_SIZES, TransformerLM, build_model, synthetic_batches
from ..testing.stock_loop import StockAMPLoop
from ..trainer import FusedMixedPrecisionTrainer

__all__ = ["default_precision", "run_demo"]

# Few tokens per step and a large vocabulary: the optimizer-side phase is a visible share of the step.
DEMO_BATCH = {"tiny": (8, 32), "small": (4, 32), "base": (4, 64)}  # (batch size, sequence length)
DEMO_TOKENS = 256  # token ids the synthetic task uses: learnable within the demo's steps
MAX_GRAD_NORM = 1.0
SPIKE_WARMUP = 8  # taken steps before the demo's spike guard decides
INTERLEAVE = 5  # steps of one run before the other's turn
INJECT_PARAMETER = "layers.0.feedforward.0.weight"  # where the demo plants its bad gradient


class GradientInjector:
    """Plants one bad gradient: a nan (bf16, fp32: the value no scaler catches) or an inf (fp16: an
    overflow) in one element of a parameter's gradient, whenever the model runs on ``batch``. It follows
    the data, not a call count, so a replay of that batch (the trainer's diagnosis) meets it too."""

    def __init__(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor], value: float,
                 parameter: str = INJECT_PARAMETER) -> None:
        self.value, self.parameter, self.armed = value, parameter, False
        marker = batch["input_ids"]
        model.register_forward_pre_hook(
            lambda m, args, kwargs: setattr(self, "armed", kwargs.get("input_ids") is marker), with_kwargs=True)
        dict(model.named_parameters())[parameter].register_hook(self._inject)

    def _inject(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.armed:
            return grad
        if self.value == SPIKE:  # a finite spike: the whole gradient a thousand times its size
            return grad * 1000.0
        grad = grad.clone()
        grad.view(-1)[0] = self.value
        return grad


SPIKE = 1000.0  # GradientInjector's value for a spike rather than one bad element


def default_precision(device: torch.device) -> str:
    """fp16 on a GPU; bf16 on CPU, where PyTorch's fp16 matmuls are slow (measured ~30x slower than bf16
    at the demo's small size on a 2-core EPYC); ``--precision fp16`` runs there too."""
    return "fp16" if device.type == "cuda" else "bf16"


def _make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind not in ("fused", "foreach"):
        raise ValueError(f"optimizer must be 'fused' or 'foreach', got {kind!r}")
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=kind == "fused",
                             foreach=None if kind == "fused" else True)


def _summary(stats: Dict[str, Any], warmup: int, tokens_per_step: int) -> Dict[str, float]:
    timed_steps = stats["step_times"][warmup:] or stats["step_times"]
    timed_opt = stats["optimizer_times"][warmup:] or stats["optimizer_times"]
    quartiles = statistics.quantiles(timed_steps, n=4) if len(timed_steps) > 1 else [timed_steps[0]] * 3
    return {
        "steps_per_second": 1.0 / statistics.median(timed_steps),
        "step_ms_median": statistics.median(timed_steps) * 1e3,
        "step_ms_p25": quartiles[0] * 1e3,
        "step_ms_p75": quartiles[2] * 1e3,
        "optimizer_phase_ms_median": statistics.median(timed_opt) * 1e3,
        "skipped_steps": stats["overflow_steps"],
        "spikes_skipped": stats.get("spike_steps", 0),
        "final_loss": stats["loss_values"][-1],
        "tokens_per_second": tokens_per_step * len(timed_steps) / sum(timed_steps),
        "peak_memory_mb": stats.get("peak_memory_mb", stats["max_memory_mb"]),
    }


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_demo(
    device: Optional[str] = None,
    precision: Optional[str] = None,
    steps: int = 60,
    size: str = "small",
    out: str = "fastamp-demo",
    optimizer: str = "fused",
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    inject_at: Optional[int] = -1,
    spike_at: Optional[int] = -1,
) -> Dict[str, Any]:
    """Train the test transformer with stock AMP and with fastamp; print a side-by-side table and write
    ``results.json`` and ``dashboard.png`` (when matplotlib is installed) into ``out``. Returns the
    results dict. The first 3 steps of each run are left out of the timing (allocation, warm-up); peak
    memory is CUDA's peak allocation on a GPU and the process's resident memory on CPU.

    ``inject_at``: the step (from 0) whose batch plants one bad gradient in both runs (see
    :class:`GradientInjector`): in bf16/fp32 a nan, which the stock loop writes into its weights and
    fastamp's guard skips; in fp16 an inf, an overflow both skip. ``-1`` (default): a third of the way
    in; ``None``: no injection. ``spike_at``: the step whose batch plants a finite gradient spike (x1000)
    in both runs, which fastamp's spike guard skips and the stock loop applies; ``-1``: two thirds of the
    way in (when there are enough steps for the guard's warmup); ``None``: none."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = normalize_precision(precision or default_precision(dev))
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    initial: TransformerLM = build_model(size).to(dev)
    batch_size, seq_len = DEMO_BATCH[size]
    data = synthetic_batches(initial.config, batch_size, seq_len, seed=seed, device=dev,
                             num_tokens=DEMO_TOKENS)
    batches = [next(data) for _ in range(steps)]
    params = sum(p.numel() for p in initial.parameters())
    log(f"fastamp demo: {size} transformer ({params / 1e6:.1f}M parameters), {precision}, {steps} steps, "
        f"AdamW ({optimizer}), batch {batch_size}x{seq_len}, on {dev} ({_device_description(dev)})")
    if inject_at == -1:
        inject_at = steps // 3
    if inject_at is not None and not 0 <= inject_at < steps:
        raise ValueError(f"inject_at must be a step in [0, {steps}), got {inject_at}")
    if spike_at == -1:
        spike_at = 2 * steps // 3 if steps >= 30 else None
    if spike_at is not None and not (SPIKE_WARMUP < spike_at < steps) or (spike_at is not None and spike_at == inject_at):
        raise ValueError(f"spike_at must be a step in ({SPIKE_WARMUP}, {steps}) other than inject_at, got {spike_at}")
    injected = None
    if inject_at is not None:
        value = math.inf if precision == "fp16" else math.nan
        injected = {"step": inject_at, "parameter": INJECT_PARAMETER, "value": str(value)}
        log(f"injecting one {value} gradient into {INJECT_PARAMETER} at step {inject_at} in both runs "
            "(--no-inject to train without it)")

    if spike_at is not None:
        log(f"planting a x1000 gradient spike into {INJECT_PARAMETER} at step {spike_at} in both runs "
            "(fastamp runs with a SpikeGuard; --no-spike to train without it)")

    def fresh():
        model = copy.deepcopy(initial)
        if injected is not None:
            GradientInjector(model, batches[inject_at], value)
        if spike_at is not None:
            GradientInjector(model, batches[spike_at], SPIKE)
        return model, _make_optimizer(model, optimizer)

    stock_model, stock_opt = fresh()
    stock_loop = StockAMPLoop(stock_model, stock_opt, precision, MAX_GRAD_NORM)
    stock_history = StepHistory(StepTimer(dev))
    model, opt = fresh()
    guard = SpikeGuard(window=32, warmup=SPIKE_WARMUP) if spike_at is not None else None
    trainer = FusedMixedPrecisionTrainer(model, opt, precision=precision, max_grad_norm=MAX_GRAD_NORM, spike_guard=guard)
    peak = {"stock AMP": 0.0, "fastamp": 0.0}

    def stock_step(batch: Dict[str, torch.Tensor]) -> None:
        timer = stock_history.timer
        phase: Dict[str, Any] = {}

        @contextlib.contextmanager
        def optimizer_phase():
            phase["start"] = timer.start()
            yield
            phase["time"] = timer.stop(phase["start"])

        start = timer.start()
        record = stock_loop.step(batch, optimizer_phase)
        stock_history.record(loss=record["loss"], grad_norm=record["grad_norm"], scale=record["scale"],
                             found_inf=record["skipped"].float(), step_time=timer.stop(start),
                             optimizer_time=phase["time"], memory=memory_mb(dev), tokens=batch["input_ids"].numel())

    runs = {"stock AMP": stock_step, "fastamp": trainer.train_step}
    # Interleaved in blocks of INTERLEAVE steps, the order alternating from block to block, so that a busy
    # or drifting machine slows both runs alike.
    for block_start in range(0, steps, INTERLEAVE):
        order = list(runs) if (block_start // INTERLEAVE) % 2 == 0 else list(reversed(runs))
        for name in order:
            for step in range(block_start, min(steps, block_start + INTERLEAVE)):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                runs[name](batches[step])
                if dev.type == "cuda":
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated(dev) / 1e6)
        done = min(steps, block_start + INTERLEAVE)
        if progress and (done % max(1, steps // 5) < INTERLEAVE or done == steps):
            log(f"  {done}/{steps} steps of each run")
    stock = training_statistics(stock_history.read())
    fused = trainer.get_training_statistics()
    if dev.type == "cuda":  # both models live through both runs: the peaks include the other's weights
        stock["peak_memory_mb"], fused["peak_memory_mb"] = peak["stock AMP"], peak["fastamp"]

    warmup = min(3, steps - 1)
    tokens_per_step = batch_size * seq_len
    rows = {"stock AMP": _summary(stock, warmup, tokens_per_step), "fastamp": _summary(fused, warmup, tokens_per_step)}
    # Up to the injected step the two runs train the same model on the same data; after it, stock's is NaN.
    first_event = min([e for e in (inject_at, spike_at) if e is not None], default=None)
    compared = slice(0, first_event + 1 if first_event is not None else steps)
    max_loss_diff = max(abs(a - b) for a, b in zip(stock["loss_values"][compared], fused["loss_values"][compared]))
    table = _format_table(rows, max_loss_diff, "up to the injected step" if inject_at is not None else "")
    log(table)
    for diagnosis in trainer.overflow_diagnoses:
        log(f"fastamp diagnosis: {diagnosis}")

    results = {
        "config": {"device": str(dev), "device_name": _device_description(dev), "precision": precision,
                   "steps": steps, "size": size, "parameters": params, "batch_size": batch_size,
                   "seq_len": seq_len, "optimizer": f"AdamW({optimizer})", "max_grad_norm": MAX_GRAD_NORM,
                   "torch": torch.__version__, "timing_warmup_steps": warmup},
        "summary": rows,
        "injected": injected,
        "spike_at": spike_at,
        "spikes_skipped": fused.get("spike_steps", 0),
        "overflow_diagnoses": [d.to_dict() for d in trainer.overflow_diagnoses],
        "max_abs_loss_difference": max_loss_diff,
        "speedup_step": rows["fastamp"]["steps_per_second"] / rows["stock AMP"]["steps_per_second"],
        "speedup_optimizer_phase": rows["stock AMP"]["optimizer_phase_ms_median"]
        / rows["fastamp"]["optimizer_phase_ms_median"],
        "stock": stock,
        "fastamp": fused,
    }
    results_path = os.path.join(out, "results.json")
    with open(results_path, "w") as f:
        json.dump(_json_safe(results), f, indent=1)
    log(f"wrote {results_path}")
    try:
        dashboard = plot_dashboard(os.path.join(out, "dashboard.png"),
                                   {f"stock AMP {precision}": stock, f"fastamp {precision}": fused})
        results["dashboard"] = dashboard
        log(f"wrote {dashboard}")
    except ImportError as e:
        log(f"no dashboard: {e}")
    return results


def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become None, other objects their str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _spread(row: Dict[str, float]) -> str:
    return f"{row['step_ms_p25']:.1f}-{row['step_ms_p75']:.1f}"


def _format_table(rows: Dict[str, Dict[str, float]], max_loss_diff: float, compared: str = "") -> str:
    lines = [
        f"{'':30} {'stock AMP':>14} {'fastamp':>14}",
        f"{'steps/s (median)':30} {rows['stock AMP']['steps_per_second']:14.2f} {rows['fastamp']['steps_per_second']:14.2f}",
        f"{'step ms (p25-p75)':30} {_spread(rows['stock AMP']):>14} {_spread(rows['fastamp']):>14}",
        f"{'optimizer phase ms/step':30} {rows['stock AMP']['optimizer_phase_ms_median']:14.2f} "
        f"{rows['fastamp']['optimizer_phase_ms_median']:14.2f}",
        f"{'tokens/s':30} {rows['stock AMP']['tokens_per_second']:14.0f} {rows['fastamp']['tokens_per_second']:14.0f}",
        f"{'skipped steps':30} {rows['stock AMP']['skipped_steps']:14d} {rows['fastamp']['skipped_steps']:14d}",
        f"{'  of them spikes':30} {rows['stock AMP']['spikes_skipped']:14d} {rows['fastamp']['spikes_skipped']:14d}",
        f"{'final loss':30} {rows['stock AMP']['final_loss']:14.4f} {rows['fastamp']['final_loss']:14.4f}",
        f"{'peak memory MB':30} {rows['stock AMP']['peak_memory_mb']:14.1f} {rows['fastamp']['peak_memory_mb']:14.1f}",
        f"{'max |loss difference|':30} {max_loss_diff:14.3g}" + (f"  ({compared})" if compared else ""),
    ]
    return "\n".join(lines)
