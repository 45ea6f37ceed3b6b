"""The operator library itself: schemas and fake kernels (opcheck on every device), torch.compile, build facts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastamp
from fastamp import ops


def _grads(device):
    return [torch.randn(70000, device=device), torch.randn(3, 5, device=device).half(), torch.randn(0, device=device),
            torch.randn(9, device=device).bfloat16()]


def _one(device, value=0.0, dtype=torch.float32):
    return torch.full((1,), value, dtype=dtype, device=device)


OPCHECK_CASES = {
    "unscale_check_": lambda d: (_grads(d), _one(d), _one(d, 0.5)),
    "grad_norm": lambda d: (_grads(d), _one(d, 0.5), _one(d), True),
    "grad_norm:no-optionals": lambda d: (_grads(d), None, None, False),
    "grad_norm:empty": lambda d: ([], _one(d, 0.5), _one(d), True),
    "unscale_check_norm_": lambda d: (_grads(d), _one(d), _one(d, 0.5), True),
    "unscale_check_norm_:empty": lambda d: ([], _one(d), _one(d, 0.5), False),
    "clip_coef": lambda d: (torch.tensor(3.0, device=d), 1.0, 1e-6),
    "clip_norm": lambda d: (_grads(d), 1.0, _one(d, 0.5), _one(d), True, 1e-6),
    "clip_norm:no-optionals": lambda d: (_grads(d), 0.5, None, None, False, 1e-6),
    "clip_norm:empty": lambda d: ([], 1.0, _one(d, 0.5), _one(d), False, 1e-6),
    "scale_": lambda d: (_grads(d), _one(d, 0.5), _one(d)),
    "update_scale_": lambda d: (_one(d, 1024.0), _one(d, 0, torch.int32), _one(d, 1.0), 2.0, 0.5, 3, 2,
                                _one(d, 2, torch.int32), 1.0, 65536.0),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case, device):
    """Schemas, fake kernels and the kernels registered on `device` agree (mutations, aliasing, shapes)."""
    op = getattr(torch.ops.fastamp, case.split(":")[0]).default
    torch.library.opcheck(op, OPCHECK_CASES[case](device))


def test_grad_norm_of_an_empty_list_naming_no_device_runs_anywhere():
    # No tensor names a device: the CompositeExplicitAutograd kernel answers, on CPU, like the wrapper.
    total, per = torch.ops.fastamp.grad_norm([], None, None, True)
    assert total.item() == 0.0 and per.shape == (0,) and total.device.type == "cpu"
    torch.library.opcheck(torch.ops.fastamp.grad_norm.default, ([], None, None, False))


def clipped_step(grads, scale, growth_tracker, found_inf):
    inv_scale = scale.double().reciprocal().float()
    total, _ = ops.grad_norm(grads, inv_scale, found_inf)
    coef = ops.clip_coef(total, 1.0)
    ops.scale_(grads, inv_scale * coef, found_inf)
    ops.update_scale_(scale, growth_tracker, found_inf, 2.0, 0.5, 2)
    return total


def test_compile_fullgraph_matches_eager_and_does_not_recompile_on_new_scale():
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(clipped_step, backend=counter, fullgraph=True)
    base = [torch.randn(1000) * 512, torch.randn(33) * 512]
    for scale_value in (1024.0, 512.0, 2.0**16):
        eager_grads, compiled_grads = [g.clone() for g in base], [g.clone() for g in base]
        eager_state = (torch.tensor([scale_value]), torch.zeros(1, dtype=torch.int32), torch.zeros(1))
        compiled_state = (torch.tensor([scale_value]), torch.zeros(1, dtype=torch.int32), torch.zeros(1))
        expected = clipped_step(eager_grads, *eager_state)
        actual = compiled(compiled_grads, *compiled_state)
        assert torch.equal(actual, expected)
        for a, e in zip(compiled_grads, eager_grads):
            assert torch.equal(a, e)
        for a, e in zip(compiled_state, eager_state):
            assert torch.equal(a, e)
    assert counter.frame_count == 1


def test_compile_overflow_step_leaves_grads_untouched():
    compiled = torch.compile(clipped_step, backend="aot_eager", fullgraph=True)
    grads = [torch.randn(100), torch.randn(10)]
    grads[1][3] = float("inf")
    before = [g.clone() for g in grads]
    scale, tracker, found = torch.tensor([1024.0]), torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    compiled(grads, scale, tracker, found)
    assert found.item() == 1.0 and scale.item() == 512.0
    for g, b in zip(grads, before):
        assert torch.equal(g, b)


def test_build_info_reports_the_build():
    info = fastamp.build_info()
    for key in ("extension_loaded", "extension_error", "cpu_kernels", "cuda_kernels", "cuda_archs", "torch_version"):
        assert key in info
    assert info["torch_version"] == torch.__version__
    if info["extension_loaded"]:
        assert info["extension_error"] is None and info["compiled_torch_version"] == torch.__version__
    else:
        assert info["extension_error"]
    assert fastamp.has_cuda_kernels() == info["cuda_kernels"]


@pytest.mark.skipif(os.environ.get("FASTAMP_EXPECT_EXTENSION") != "1", reason="set by `make test`")
def test_cpu_kernels_were_built_and_load():
    info = fastamp.build_info()
    assert info["extension_loaded"], info["extension_error"]
    assert info["cpu_kernels"] and info["openmp"]
    assert "CPU" not in info["reference_fallback"]


@pytest.mark.skipif(os.environ.get("FASTAMP_EXPECT_CUDA_KERNELS") != "1",
                    reason="set when torch is a CUDA build and nvcc is found")
def test_cuda_kernels_were_built_and_registered():
    # Registration for the CUDA dispatch key is visible without a GPU.
    info = fastamp.build_info()
    assert info["cuda_kernels"], info
    assert "CUDA" not in info["reference_fallback"]
    assert {"8.0", "8.6", "8.9"} <= {a.replace("+PTX", "") for a in info["cuda_archs"]}
    assert any(a.endswith("+PTX") for a in info["cuda_archs"])


def test_disabled_extension_falls_back_to_reference():
    code = (
        "import torch, fastamp; from fastamp import ops; info = fastamp.build_info();"
        "assert not info['extension_loaded'] and 'FASTAMP_DISABLE_EXTENSION' in info['extension_error'];"
        "assert 'grad_norm' in info['reference_fallback']['CPU'];"
        "g = [torch.ones(4)]; f = torch.zeros(1); ops.unscale_check_(g, f, torch.tensor([0.5]));"
        "assert g[0].tolist() == [0.5] * 4; print('ok')"
    )
    env = dict(os.environ, FASTAMP_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "fastamp.cli", "info", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"extension_loaded"' in out.stdout


def test_portable_cpu_loops_match_torch():
    """The SIMD loops run as AVX2 where the CPU has it; FASTAMP_CPU_PORTABLE=1 covers the portable build."""
    code = """
import math, torch
from fastamp import ops
torch.manual_seed(0)
grads = [torch.randn(n) * 100 for n in (0, 1, 17, 65537, 200000)]
grads[3][-1] = math.nan
ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
f1, f2 = torch.zeros(1), torch.zeros(1)
ops.unscale_check_(ours, f1, torch.tensor([0.37]))
torch._amp_foreach_non_finite_check_and_unscale_(theirs, f2, torch.tensor([0.37]))
assert f1.item() == f2.item() == 1.0
assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(ours, theirs))
clean = [torch.randn(n).to(torch.bfloat16) for n in (3, 70000)]
total, _ = ops.grad_norm(clean, torch.tensor([0.5]))
expected = torch.linalg.vector_norm(torch.cat([c.double() for c in clean]) * 0.5)
assert abs(total.item() - expected.item()) <= 2e-6 * expected.item()
scaled = [c.clone() for c in clean]
ops.scale_(scaled, torch.tensor([0.3]))
assert all(torch.equal(s, (c.float() * 0.3).to(torch.bfloat16)) for s, c in zip(scaled, clean))
print("ok")
"""
    env = dict(os.environ, FASTAMP_CPU_PORTABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
