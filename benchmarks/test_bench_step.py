"""fastamp vs stock PyTorch AMP on the optimizer-side passes (pytest-benchmark).

Each group holds a fastamp case next to its stock baseline (and, where useful, a bandwidth reference:
one `sum` or one in-place `mul_` over a flat buffer of the same size). Run:

    pytest benchmarks --benchmark-only --benchmark-json benchmarks/results/<name>.json
    python benchmarks/summarize.py benchmarks/results/<name>.json

The clipped step runs as in training: loss scale 2**16 and a max_norm that clips. Before each timed
round the grads are restored from a pristine copy (untimed), so every round sees the same values.
"""

from __future__ import annotations

import pytest
import torch

from fastamp import ops
from workloads import gpt2_small_shapes, make_grads, small_tensor_shapes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
WORKLOADS = {"gpt2-124M": gpt2_small_shapes, "2000x4K": small_tensor_shapes}
MAX_NORM = 1.0  # GPT-2's grads here have norm ~1e4 * 2**16 before unscaling: the clip is active


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Case:
    def __init__(self, device, workload, dtype=torch.float32):
        self.device = device
        self.grads = [g * 2.0**16 for g in make_grads(WORKLOADS[workload](), dtype=dtype, device=device)]
        self.params = []
        for g in self.grads:
            p = torch.nn.Parameter(torch.empty_like(g))
            p.grad = g
            self.params.append(p)
        self.numel = sum(g.numel() for g in self.grads)
        self.bytes_per_pass = sum(g.numel() * g.element_size() for g in self.grads)
        self.found_inf = torch.zeros(1, device=device)
        self.inv_scale = torch.full((1,), 2.0**-16, device=device)
        self.pristine = [g.clone() for g in self.grads]
        self.flat = torch.randn(self.numel, device=device).to(dtype)


_CASES = {}


def case_for(device, workload, dtype=torch.float32):
    key = (device, workload, dtype)
    if key not in _CASES:
        _CASES.clear()  # one workload in memory at a time
        _CASES[key] = Case(device, workload, dtype)
    return _CASES[key]


def restore(case):
    torch._foreach_copy_(case.grads, case.pristine)
    case.found_inf.zero_()
    _sync(case.device)


def run(benchmark, case, fn, passes, restore_grads=False):
    benchmark.extra_info.update(
        device=case.device,
        numel=case.numel,
        tensors=len(case.grads),
        bytes=case.bytes_per_pass * passes,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )

    def timed():
        fn()
        _sync(case.device)

    setup = (lambda: restore(case)) if restore_grads else None
    benchmark.pedantic(timed, setup=setup, rounds=15 if case.numel > 10**7 else 200, warmup_rounds=2, iterations=1)


# ---- the clipped step: found_inf + norm + unscale and clip -------------------------------------------------


def stock_clipped_step(case):
    torch._amp_foreach_non_finite_check_and_unscale_(case.grads, case.found_inf, case.inv_scale)
    torch.nn.utils.clip_grad_norm_(case.params, MAX_NORM, foreach=True)


def fastamp_clipped_step(case):
    total, _ = ops.grad_norm(case.grads, case.inv_scale, case.found_inf)
    ops.scale_(case.grads, case.inv_scale * ops.clip_coef(total, MAX_NORM), case.found_inf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("impl", ["stock", "fastamp"])
def test_clipped_step(benchmark, device, workload, impl):
    case = case_for(device, workload)
    benchmark.group = f"clipped-step/{workload}/fp32/{device}"
    if impl == "stock":  # 3 reads + 2 writes
        run(benchmark, case, lambda: stock_clipped_step(case), passes=5, restore_grads=True)
    else:  # 2 reads + 1 write
        run(benchmark, case, lambda: fastamp_clipped_step(case), passes=3, restore_grads=True)


# ---- read-only norm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["sum-flat-reference", "stock-foreach-norm", "fastamp-grad-norm"])
def test_norm(benchmark, device, impl):
    case = case_for(device, "gpt2-124M")
    benchmark.group = f"grad-norm/gpt2-124M/fp32/{device}"
    fns = {
        "sum-flat-reference": lambda: case.flat.sum(),
        "stock-foreach-norm": lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(case.grads))),
        "fastamp-grad-norm": lambda: ops.grad_norm(case.grads, case.inv_scale, case.found_inf),
    }
    run(benchmark, case, fns[impl], passes=1)


# ---- unscale + check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["mul-flat-reference", "stock-unscale", "fastamp-unscale-check"])
def test_unscale(benchmark, device, impl):
    case = case_for(device, "gpt2-124M")
    benchmark.group = f"unscale/gpt2-124M/fp32/{device}"
    half = torch.full((1,), 0.5, device=device)
    fns = {
        # A factor other than 1 so that every byte is written; alternating keeps values stable.
        "mul-flat-reference": lambda: (case.flat.mul_(2.0), case.flat.mul_(0.5)),
        "stock-unscale": lambda: (
            torch._amp_foreach_non_finite_check_and_unscale_(case.grads, case.found_inf, half),
            torch._amp_foreach_non_finite_check_and_unscale_(case.grads, case.found_inf, half.reciprocal()),
        ),
        "fastamp-unscale-check": lambda: (
            ops.unscale_check_(case.grads, case.found_inf, half),
            ops.unscale_check_(case.grads, case.found_inf, half.reciprocal()),
        ),
    }
    run(benchmark, case, fns[impl], passes=4)
