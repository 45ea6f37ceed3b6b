"""Where each dispatch key's kernel comes from, and kernel tests never comparing the reference with itself."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import fastamp
from fastamp import ops


def _registered_from(op: str, key: str) -> str:
    table = torch._C._dispatch_dump_table(f"fastamp::{op}")
    return next(line for line in table.splitlines() if line.startswith(key + ":")).replace("\\", "/")


def test_the_reference_is_registered_exactly_where_no_kernel_was_compiled():
    info = fastamp.build_info()
    for op in ops.OP_NAMES:
        for key in ("CPU", "CUDA"):
            line = _registered_from(op, key)
            compiled = f"csrc/{key.lower()}/ops.cpp" in line or f"_csrc/{key.lower()}/ops.cpp" in line
            runs_reference = op in info["reference_fallback"].get(key, [])
            assert compiled != runs_reference and (runs_reference == ("ops/_library.py" in line)), line
        assert info["cpu_kernels"] == ("csrc/cpu/ops.cpp" in _registered_from(op, "CPU")), op


def test_without_the_extension_every_key_runs_the_reference_and_kernel_tests_do_not_pass_on_it():
    code = (
        "import torch, fastamp; from fastamp import ops; info = fastamp.build_info()\n"
        "assert info['reference_fallback'] == {'CPU': list(ops.OP_NAMES), 'CUDA': list(ops.OP_NAMES)}, info\n"
        "t = torch._C._dispatch_dump_table('fastamp::scale_')\n"
        "assert 'ops/_library.py' in t and 'ops.cpp' not in t, t\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTAMP_EXPECT_EXTENSION"}
    env["FASTAMP_DISABLE_EXTENSION"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # The kernel-vs-reference tests are skipped there, saying why (see conftest.impl).
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          os.path.join(here, "test_unscale_check.py"), "-k", "unscale_check_matches_torch and kernel"],
                         env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(here)))
    summary = out.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "no compiled CPU kernels" in out.stdout, out.stdout[-3000:]
