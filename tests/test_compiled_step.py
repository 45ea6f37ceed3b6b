"""The optimizer-side step compiled whole: ``clip_grad_norm_`` + ``step`` of a fused optimizer + ``update``,
the spike guard and a device-side learning-rate schedule, under ``torch.compile(fullgraph=True)`` with
inductor. Twelve steps with an overflow and a spike planted: no recompilation once the optimizer state
exists (``error_on_recompile``) while the scale grows, backs off and steps are skipped, and every tensor the
step touches equal, bit for bit, to the eager run's (the compiled step calls the same fused kernels)."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from fastamp import GradScaler
from fastamp.testing.compiled_step import OPTIMIZERS, make_setup, optimizer_side_step, run

STEPS, OVERFLOW_AT, SPIKE_AT = 12, 5, 9


def assert_same(eager, compiled):
    assert eager.keys() == compiled.keys()
    for key, value in eager.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == compiled[key].dtype and torch.equal(value, compiled[key]), key
        else:
            assert value == compiled[key], key


def compiled_run(optimizer, backend="inductor"):
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(optimizer_side_step, backend=counter, fullgraph=True)
    torch._dynamo.reset()

    def guard_recompiles(i):
        # The first call makes the spike guard's history inside the graph, the second finds it; then none.
        torch._dynamo.config.error_on_recompile = i >= 2

    try:
        result = run(make_setup(optimizer), STEPS, step, overflow_at=OVERFLOW_AT, spike_at=SPIKE_AT,
                     before_step=guard_recompiles)
    finally:
        torch._dynamo.config.error_on_recompile = False
    return result, counter


# torch 2.13's CPU fused SGD miscomputes bf16 momentum (against SGD(foreach=False): off by up to 4e12 on 33
# elements; right in 2.14), so its eager step is no oracle there.
OLD_FUSED_SGD = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_compiled_step_equals_the_eager_step_bit_for_bit(optimizer):
    if optimizer == "sgd_nesterov" and OLD_FUSED_SGD:
        pytest.skip("torch < 2.14: the eager fused SGD's bf16 momentum is wrong on CPU (fixed in 2.14)")
    eager = run(make_setup(optimizer), STEPS, overflow_at=OVERFLOW_AT, spike_at=SPIKE_AT)
    compiled, counter = compiled_run(optimizer)
    assert counter.frame_count == 2  # no graph break; compiled twice (guard history made, then found), never again
    assert torch.equal(eager["norms"], compiled["norms"])
    for step, (e, c) in enumerate(zip(eager["history"], compiled["history"])):
        assert_same(e, c), step
    final = compiled["history"][-1]["scaler"]
    # The planted overflow and spike were skipped, the scale moved both ways, and the schedule advanced
    # only on taken steps.
    assert (final["_overflow_steps"], final["_spike_steps"], final["_num_steps"]) == (1, 1, STEPS)
    scales = [h["scaler"]["scale"] for h in compiled["history"]]
    assert any(b > a for a, b in zip(scales, scales[1:])) and any(b < a for a, b in zip(scales, scales[1:]))
    assert compiled["history"][-1]["taken"] == STEPS - 2
    assert float(compiled["history"][-1]["lr"]) == pytest.approx(1e-2 * 0.9 ** (STEPS - 3), rel=1e-6)


def test_a_skipped_compiled_step_leaves_parameters_and_state_bit_identical():
    compiled, _ = compiled_run("adamw")
    history = compiled["history"]
    for skipped in (OVERFLOW_AT, SPIKE_AT):
        before, after = history[skipped - 1], history[skipped]
        for key, value in before.items():
            if isinstance(value, torch.Tensor) and key != "lr":  # lr: set at the start of each step
                assert torch.equal(value, after[key]), (skipped, key)
        # The step after a skip runs at the skipped step's rate: the schedule did not advance.
        assert torch.equal(history[skipped]["lr"], history[skipped + 1]["lr"])
        assert not torch.equal(history[skipped - 1]["lr"], history[skipped]["lr"])


def test_host_step_counter_reads_the_device_after_compiled_updates():
    """A graph cannot move a host counter: after a compiled update() num_steps reads the device count."""
    setup = make_setup("adamw")
    step = torch.compile(optimizer_side_step, backend="eager", fullgraph=True)
    torch._dynamo.reset()
    run(setup, 3, step, overflow_at=1, spike_at=99)
    assert setup.scaler.num_steps == 3
    assert setup.scaler.step_counts() == {"steps": 3, "taken": 2, "skipped": 1, "overflows": 1, "spikes": 0}
    restored = GradScaler("cpu")
    restored.load_state_dict(setup.scaler.state_dict())
    assert restored.num_steps == 3
    unpickled = pickle.loads(pickle.dumps(setup.scaler))
    assert unpickled.num_steps == 3 and unpickled.step_counts() == setup.scaler.step_counts()


def _adam_args(amsgrad, lr_tensor, found):
    torch.manual_seed(0)
    shapes = [(7, 3), (1,), (0,), (130,)]
    lists = [[torch.randn(s) for s in shapes] for _ in range(2)] + [[torch.rand(s) for s in shapes] for _ in range(2)]
    maxes = [torch.rand(s) for s in shapes] if amsgrad else []
    steps = [torch.full((), 3.0) for _ in shapes]
    lr = torch.tensor(1e-3) if lr_tensor else None
    return (*lists, maxes, steps, 1e-3, lr, 0.9, 0.999, 0.01, 1e-8, amsgrad, False, True, torch.tensor(4.0),
            torch.tensor(found))


@pytest.mark.parametrize("amsgrad, lr_tensor, found", [(False, True, 0.0), (True, False, 0.0), (False, False, 1.0)])
def test_the_fused_adam_step_op_passes_opcheck_and_matches_torch(amsgrad, lr_tensor, found):
    args = _adam_args(amsgrad, lr_tensor, found)
    torch.library.opcheck(torch.ops.fastamp.fused_adam_step_.default, args)
    ours, theirs = _adam_args(amsgrad, lr_tensor, found), _adam_args(amsgrad, lr_tensor, found)
    torch.ops.fastamp.fused_adam_step_(*ours)
    torch._fused_adamw_(*theirs[:6], lr=theirs[7] if lr_tensor else theirs[6], beta1=0.9, beta2=0.999, weight_decay=0.01,
                        eps=1e-8, amsgrad=amsgrad, maximize=False, grad_scale=theirs[-2], found_inf=theirs[-1])
    for a, b in zip(ours[:5], theirs[:5]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    if found:  # a skip changes nothing
        assert all(torch.equal(x, y) for x, y in zip(ours[0], _adam_args(amsgrad, lr_tensor, found)[0]))


@pytest.mark.parametrize("momentum, first", [(0.9, True), (0.9, False), (0.0, False)])
def test_the_fused_sgd_step_op_passes_opcheck(momentum, first):
    torch.manual_seed(0)
    shapes = [(5, 2), (1,), (0,), (33,)]
    params, grads = [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]
    buffers = [torch.randn(s) for s in shapes] if momentum else []
    args = (params, grads, buffers, 0.1, None, 0.0, momentum, 0.0, momentum > 0, False, first, None, torch.tensor(0.0))
    torch.library.opcheck(torch.ops.fastamp.fused_sgd_step_.default, args)


def test_every_input_the_steady_compiled_step_mutates_is_static_for_cuda_graphs():
    """CUDA graphs (mode="reduce-overhead") refuse a graph that mutates an input whose address is not static.
    Checked here on CPU, at inductor's inner compile: the graph of the steady state (from the second call;
    the first makes the optimizer state and the spike guard's history) mutates only static inputs (the
    parameters and optimizer state, the scaler's and the guard's device state, the gradients, the lr)."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    graphs = []

    def inner(gm, example_inputs, **kwargs):
        compiled = compile_fx_inner(gm, example_inputs, **kwargs)
        shapes = [f"{tuple(t.shape)} {t.dtype}" for t in example_inputs]
        graphs.append((set(kwargs.get("static_input_idxs", ())), set(compiled.mutated_input_idxs), shapes))
        return compiled

    torch._dynamo.reset()
    step = torch.compile(optimizer_side_step, backend=lambda gm, inputs: compile_fx(gm, inputs, inner_compile=inner),
                         fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        run(make_setup("adamw"), 4, step, overflow_at=1, spike_at=99)
    assert len(graphs) == 2
    static, mutated, shapes = graphs[-1]
    assert len(mutated) > 20
    assert not mutated - static, [shapes[i] for i in sorted(mutated - static)]


def test_a_disabled_scaler_compiles_whole_too():
    """bf16 or fp32 with GradScaler(enabled=False): the same step, plain fused AdamW, no graph break."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2), fused=True)
        scaler = GradScaler("cpu", enabled=False)

        def step():
            norm = scaler.clip_grad_norm_(opt, 0.5)
            scaler.step(opt)
            scaler.update()
            return norm

        fn = torch.compile(step, fullgraph=True) if compiled else step
        for i in range(3):
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(i))).square().sum().backward()
            fn()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _two_optimizer_run(compiled, fused):
    torch.manual_seed(0)
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
    if fused:
        opt_a = torch.optim.AdamW(first.parameters(), lr=torch.tensor(1e-2), fused=True)
        opt_b = torch.optim.SGD(second.parameters(), lr=torch.tensor(1e-2), momentum=0.9, fused=True)
    else:
        opt_a = torch.optim.AdamW(first.parameters(), lr=1e-2, foreach=True)
        opt_b = torch.optim.SGD(second.parameters(), lr=1e-2, momentum=0.9, foreach=True)
    scaler = GradScaler("cpu", init_scale=256.0, growth_interval=2)

    def step():
        norm = scaler.clip_grad_norm_([opt_a, opt_b], 1.0)  # one norm, one skip decision for both
        scaler.step(opt_a)
        scaler.step(opt_b)
        scaler.update()
        return norm

    fn = torch.compile(step, fullgraph=fused) if compiled else step
    torch._dynamo.reset()
    for i in range(6):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
        scaler.scale(second(first(x)).square().sum()).backward()
        if i == 3:
            first.weight.grad[0, 0] = float("nan")
        fn()
        opt_a.zero_grad()
        opt_b.zero_grad()
    return [p.detach().clone() for p in (*first.parameters(), *second.parameters())], scaler.state_dict()


def test_two_fused_optimizers_clipped_together_compile_whole():
    eager, compiled = _two_optimizer_run(False, True), _two_optimizer_run(True, True)
    assert all(torch.equal(a, b) for a, b in zip(eager[0], compiled[0]))
    assert eager[1] == compiled[1] and compiled[1]["_overflow_steps"] == 1


def test_non_fused_optimizers_still_compile_with_graph_breaks():
    """Not fullgraph: the host reads the skip decision (a graph break) and torch.optim's step breaks the
    graph as it always does; torch compiles the foreach step itself (its own rounding: close, not equal)."""
    eager, compiled = _two_optimizer_run(False, False), _two_optimizer_run(True, False)
    for a, b in zip(eager[0], compiled[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert eager[1] == compiled[1] and compiled[1]["_overflow_steps"] == 1
