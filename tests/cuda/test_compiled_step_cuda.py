"""The optimizer-side step compiled whole on CUDA: inductor with ``fullgraph=True``, CUDA graphs through
``mode="reduce-overhead"`` and through ``torch.cuda.graph`` capture of the eager step; each replayed over
twelve steps with an overflow and a spike planted, equal bit for bit to the eager run, with no host sync.
Skipped without an NVIDIA GPU."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from fastamp.testing.compiled_step import OPTIMIZERS, make_setup, optimizer_side_step, run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

STEPS, OVERFLOW_AT, SPIKE_AT, WARMUP = 12, 5, 9, 3


def assert_same(eager, other):
    assert eager["norms"].equal(other["norms"]), (eager["norms"], other["norms"])
    for step, (e, o) in enumerate(zip(eager["history"], other["history"])):
        assert e.keys() == o.keys()
        for key, value in e.items():
            same = torch.equal(value, o[key]) if isinstance(value, torch.Tensor) else value == o[key]
            assert same, (step, key)


def eager_run(optimizer, **setup):
    return run(make_setup(optimizer, "cuda", **setup), STEPS, overflow_at=OVERFLOW_AT, spike_at=SPIKE_AT)


def recompiles_refused_after(first_calls):
    def before(i):
        torch._dynamo.config.error_on_recompile = i >= first_calls
    return before


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_compiled_step_on_cuda_equals_eager(optimizer):
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(optimizer_side_step, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    try:
        compiled = run(make_setup(optimizer, "cuda"), STEPS, step, overflow_at=OVERFLOW_AT, spike_at=SPIKE_AT,
                       before_step=recompiles_refused_after(2))
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counter.frame_count <= 2
    assert_same(eager_run(optimizer), compiled)
    assert compiled["history"][-1]["scaler"]["_overflow_steps"] == 1
    assert compiled["history"][-1]["scaler"]["_spike_steps"] == 1


def test_compiled_step_makes_no_host_sync():
    step = torch.compile(optimizer_side_step, fullgraph=True)
    torch._dynamo.reset()

    def strict(i):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if i >= 2 else 0)

    def relaxed(i):
        torch.cuda.set_sync_debug_mode(0)  # the test's own snapshot reads the state to the host

    try:
        run(make_setup("adamw", "cuda"), 6, step, overflow_at=3, spike_at=99, before_step=strict, after_step=relaxed)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_reduce_overhead_replays_the_step_in_cuda_graphs(optimizer):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    step = torch.compile(optimizer_side_step, mode="reduce-overhead", fullgraph=True)

    def before(i):
        # The first call's graph makes the optimizer state and the guard's history (it runs once, without
        # CUDA graphs); the steady state's graph, from the second call, must run in CUDA graphs.
        if i == 1:
            counters.clear()
        torch.compiler.cudagraph_mark_step_begin()

    graphed = run(make_setup(optimizer, "cuda"), STEPS, step, overflow_at=OVERFLOW_AT, spike_at=SPIKE_AT,
                  before_step=before)
    skips = dict(counters["inductor"])
    assert skips.get("cudagraph_skips", 0) == 0, skips
    from torch._inductor.cudagraph_trees import get_manager

    manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and any(manager.roots.values()), "no CUDA graph was recorded"
    assert_same(eager_run(optimizer), graphed)


@pytest.mark.parametrize("optimizer", ["adamw", "adam_amsgrad"])
def test_torch_cuda_graph_captures_the_eager_step(optimizer):
    """Warm up eagerly on a side stream, capture one optimizer-side step, then replay it for the rest: the
    gradients are written into the same .grad tensors by each eager backward."""
    setup = make_setup(optimizer, "cuda", capturable=True)
    graph = torch.cuda.CUDAGraph()
    captured = {}

    def step(model, opt, scaler, rates):
        i = captured.setdefault("calls", 0)
        captured["calls"] = i + 1
        if i < WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                norm = optimizer_side_step(model, opt, scaler, rates)
            torch.cuda.current_stream().wait_stream(side)
            return norm
        if i == WARMUP:
            with torch.cuda.graph(graph):
                captured["norm"] = optimizer_side_step(model, opt, scaler, rates)
        graph.replay()
        return captured["norm"]

    graphed = run(setup, STEPS, step, overflow_at=OVERFLOW_AT, spike_at=SPIKE_AT)
    eager = eager_run(optimizer, capturable=True)
    assert_same(eager, graphed)
    assert setup.scaler.num_steps == STEPS  # counted on the device by the replays
