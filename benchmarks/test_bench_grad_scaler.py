"""The whole optimizer-side step: stock AMP vs fastamp.GradScaler (pytest-benchmark).

One group per device, GPT-2-small-shaped fp32 parameters (124M), AdamW, loss scale 2**16, a max_norm
that clips. Timed: everything between ``backward()`` and the next forward:

* ``stock-foreach``: torch.amp.GradScaler, ``unscale_`` + ``clip_grad_norm_(foreach=True)`` +
  ``step`` (AdamW foreach) + ``update``;
* ``stock-fused``: the same with AdamW(fused=True), the best stock PyTorch offers;
* ``fastamp-foreach``: fastamp.GradScaler, ``clip_grad_norm_`` + ``step`` (AdamW foreach) + ``update``;
* ``fastamp-fused``: the same with AdamW(fused=True): the unscale and clip are folded into the step.

Before each round the scaled grads are restored from a pristine copy (untimed).
"""

from __future__ import annotations

import pytest
import torch

import fastamp
from workloads import gpt2_small_shapes, make_grads

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MAX_NORM = 1.0
SCALE = 2.0**16


class StepCase:
    """Parameters with scaled grads, an AdamW, and a scaler: one optimizer-side step per call."""

    def __init__(self, device: str, impl: str) -> None:
        self.device = device
        self.stock = impl.startswith("stock")
        fused = impl.endswith("fused")
        grads = make_grads(gpt2_small_shapes(), device=device)
        self.params = []
        for g in grads:
            p = torch.nn.Parameter(torch.randn_like(g) * 0.02)
            p.grad = g * SCALE
            self.params.append(p)
        self.pristine = [p.grad.clone() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, fused=fused, foreach=None if fused else True)
        scaler_cls = torch.amp.GradScaler if self.stock else fastamp.GradScaler
        self.scaler = scaler_cls(device, init_scale=SCALE, growth_interval=10**9)
        self.scaler.scale(torch.ones((), device=device))  # creates the scale on the device
        self.numel = sum(g.numel() for g in grads)

    def restore(self) -> None:
        torch._foreach_copy_([p.grad for p in self.params], self.pristine)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step(self) -> None:
        if self.stock:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM, foreach=True)
        else:
            self.scaler.clip_grad_norm_(self.optimizer, MAX_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.device == "cuda":
            torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["stock-foreach", "stock-fused", "fastamp-foreach", "fastamp-fused"])
def test_optimizer_step(benchmark, device, impl):
    case = StepCase(device, impl)
    benchmark.group = f"optimizer-step/gpt2-124M/fp32/adamw/{device}"
    benchmark.extra_info.update(
        device=device, numel=case.numel, tensors=len(case.params), torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(case.step, setup=case.restore, rounds=8 if device == "cpu" else 30, warmup_rounds=1,
                       iterations=1)
    # Every timed step was a real step: the clip was active and nothing overflowed.
    assert case.scaler.get_scale() == SCALE
    assert int(case.optimizer.state[case.params[0]]["step"]) == (9 if device == "cpu" else 31)
