"""The optimizer-side step compiled whole, as a user writes it: the scenario the CPU and CUDA tests and the
benchmark share.

``optimizer_side_step`` is the function a user hands to ``torch.compile(fullgraph=True)``: the fused
clip, the step of a fused optimizer (which skips on the device), the scale update, with a spike guard in
the scaler; the learning rate comes from a table indexed by the scaler's device count of taken steps,
so the schedule does not advance on a skipped step. :func:`run` trains a small model for a number of steps
with an overflow planted at one step and a finite gradient spike at another, eagerly or through a
compiled (or CUDA-graphed) step, and returns everything the step touched, for a bitwise comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..grad_scaler import GradScaler
from ..spike_guard import SpikeGuard

__all__ = ["OPTIMIZERS", "Setup", "make_setup", "optimizer_side_step", "run", "snapshot"]

OPTIMIZERS = ("adamw", "adam_amsgrad", "sgd_nesterov")
MAX_NORM = 1.0


@dataclass
class Setup:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: GradScaler
    rates: Tensor  # the schedule: the learning rate after each number of taken steps


def make_setup(optimizer: str = "adamw", device: str = "cpu", *, capturable: bool = False, width: int = 32,
               layers: int = 2) -> Setup:
    """A small MLP (fp32 weights and one bf16 layer: mixed dtypes in one fused step), a fused optimizer
    with a tensor learning rate, and a scaler that grows and backs off within a dozen steps."""
    torch.manual_seed(0)
    blocks: List[torch.nn.Module] = [torch.nn.Linear(16, width)]
    for _ in range(layers - 1):
        blocks += [torch.nn.Tanh(), torch.nn.Linear(width, width)]
    blocks += [torch.nn.Tanh(), torch.nn.Linear(width, 4)]
    model = torch.nn.Sequential(*blocks).to(device)
    model[-1].to(torch.bfloat16)
    rates = torch.tensor([1e-2 * 0.9**k for k in range(1024)], dtype=torch.float32, device=device)
    lr = rates[0].clone()
    extra = {"capturable": True} if capturable else {}
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True, **extra)
    elif optimizer == "adam_amsgrad":
        opt = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True, weight_decay=0.01, fused=True, **extra)
    elif optimizer == "sgd_nesterov":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; one of {OPTIMIZERS}")
    scaler = GradScaler(device, init_scale=2.0**12, growth_interval=3, hysteresis=1,
                        spike_guard=SpikeGuard(threshold=4.0, window=8, warmup=3))
    return Setup(model, opt, scaler, rates)


def optimizer_side_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: GradScaler,
                        rates: Tensor) -> Tensor:
    """clip + step + update, with the learning rate of the taken steps so far: what a user compiles."""
    for group in optimizer.param_groups:
        group["lr"].copy_(rates.index_select(0, scaler.taken_steps().reshape(1)).reshape(()))
    norm = scaler.clip_grad_norm_(optimizer, MAX_NORM)
    scaler.step(optimizer)
    scaler.update()
    return norm


def _batches(steps: int, device: str) -> List[tuple]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g).to(device), torch.randn(8, 4, generator=g).to(device)) for _ in range(steps)]


def snapshot(setup: Setup) -> Dict[str, object]:
    """Everything the optimizer-side step touches: parameters, optimizer state, learning rate, and the
    scaler's state (scale, trackers, step counters, the spike guard's history): a host read."""
    out: Dict[str, object] = {}
    for name, p in setup.model.named_parameters():
        out[name] = p.detach().clone()
        for key, value in setup.optimizer.state[p].items():
            if isinstance(value, Tensor):
                out[f"{name}.{key}"] = value.detach().clone()
    out["lr"] = torch.as_tensor(setup.optimizer.param_groups[0]["lr"]).detach().clone()
    out["taken"] = int(setup.scaler.taken_steps())
    out["scaler"] = setup.scaler.state_dict()
    return out


def run(setup: Setup, steps: int, step_fn: Optional[Callable] = None, *, overflow_at: int = 5, spike_at: int = 9,
        before_step: Optional[Callable[[int], None]] = None, after_step: Optional[Callable[[int], None]] = None
        ) -> Dict[str, object]:
    """Train ``steps`` steps; the gradients of step ``overflow_at`` hold an inf, those of ``spike_at`` are
    multiplied by 1e4 (finite: a spike). ``step_fn`` (default: the eager step) runs the optimizer side;
    ``before_step(i)`` / ``after_step(i)`` are called around it. Returns the snapshot after every step and
    each step's norm."""
    step_fn = step_fn or optimizer_side_step
    device = setup.rates.device.type
    model, scaler = setup.model, setup.scaler
    history, norms = [], []
    for i, (x, y) in enumerate(_batches(steps, device)):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        with torch.no_grad():
            first = next(model.parameters())
            if i == overflow_at:
                first.grad.view(-1)[-1] = float("inf")
            if i == spike_at:
                for p in model.parameters():
                    p.grad.mul_(1e4)
        if before_step is not None:
            before_step(i)
        norms.append(step_fn(model, setup.optimizer, scaler, setup.rates).detach().clone())
        if after_step is not None:
            after_step(i)
        history.append(snapshot(setup))
        setup.optimizer.zero_grad(set_to_none=False)
    return {"history": history, "norms": torch.stack(norms)}
