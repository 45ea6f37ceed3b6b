"""The emulator suite catches a planted bug of each class (tools/emu_mutation.py; the table of the last
run is benchmarks/results/emu-mutation.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_planted_bug_is_caught(tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulator needs g++")
    out = tmp_path / "emu-mutation.md"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "emu_mutation.py"), "--out", str(out)],
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    table = out.read_text()
    assert "NOT CAUGHT" not in table and table.count("\n| ") >= 11, table
