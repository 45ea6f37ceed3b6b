"""`fastamp check`: it passes on the kernels built here, and fails, naming the op, when a kernel is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fastamp
from fastamp.cli import check

# Each replaces one CPU kernel, in a fresh process, with a subtly wrong one.
BROKEN_KERNELS = {
    "scale_": "def broken(tensors, factor, found_inf):\n"
              "    reference.scale_(tensors, factor * 1.0001, found_inf)\n",
    "grad_norm": "def broken(grads, inv_scale, found_inf, per_tensor):\n"
                 "    wrong = None if inv_scale is None else inv_scale * 1.00001\n"
                 "    return reference.grad_norm(grads, wrong, found_inf, per_tensor)\n",
    "unscale_check_": "def broken(grads, found_inf, inv_scale):  # never flags non-finite values\n"
                      "    reference.unscale_check_(grads, torch.zeros_like(found_inf), inv_scale)\n",
    "update_scale_": "def broken(scale, tracker, found_inf, growth, backoff, interval, hysteresis, htracker, lo, hi):\n"
                     "    reference.update_scale_(scale, tracker, found_inf, growth, backoff, interval + 1,\n"
                     "                                hysteresis, htracker, lo, hi)\n",
}


def _kernels_here():
    if not fastamp.build_info()["cpu_kernels"]:
        pytest.skip(f"no CPU kernels here: {fastamp.build_info()['extension_error']}")


def test_check_passes_on_this_machine_and_reports_every_check(tmp_path):
    _kernels_here()
    lines = []
    report = check.run_checks(["cpu"], progress=lambda r: lines.append(check.format_result(r)))
    assert not report.failed, "\n".join(lines)
    names = {r.name for r in report.results}
    assert {"compiled kernels in use", "unscale_check_", "grad_norm", "grad_norm repeatable", "unscale_check_norm_",
            "scale_", "clip_coef", "update_scale_", "skipped step leaves params and state"} <= names
    assert any("GradScaler" in n for n in names)
    assert len(lines) == len(report.results) and all(line.startswith("PASS") for line in lines)
    assert check.main_exit_code(report) == 0


def test_cli_exit_codes_and_json(tmp_path):
    _kernels_here()
    out = subprocess.run([sys.executable, "-m", "fastamp.cli", "check", "--device", "all", "--json", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=300)
    import torch

    assert out.returncode == (0 if torch.cuda.is_available() else 2), out.stdout + out.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["failed"] == 0 and data["passed"] >= 10
    assert data["missing_devices"] == ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("op", sorted(BROKEN_KERNELS))
def test_check_fails_when_a_kernel_is_wrong(op):
    _kernels_here()
    code = (
        "import sys, warnings, torch\nimport fastamp\nfrom fastamp import ops\nfrom fastamp.cli import main\n"
        "from fastamp.testing import reference\n"
        + BROKEN_KERNELS[op]
        + "lib = torch.library.Library('fastamp', 'IMPL')\n"
        "with warnings.catch_warnings():\n    warnings.simplefilter('ignore')\n"
        f"    lib.impl({op!r}, broken, 'CPU')\n"
        "sys.exit(main(['check', '--device', 'cpu']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    failed = [line for line in out.stdout.splitlines() if line.startswith("FAIL")]
    assert any(f" {op} " in line + " " for line in failed), out.stdout


def test_reference_in_place_of_kernels_is_a_failure_not_a_pass():
    code = ("import sys; from fastamp.cli import main; sys.exit(main(['check', '--device', 'cpu']))")
    import os

    env = dict(os.environ, FASTAMP_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stdout
    assert "FAIL  cpu   compiled kernels in use" in out.stdout
    assert "SKIP  cpu   grad_norm" in out.stdout and "PASS  cpu   grad_norm " not in out.stdout
