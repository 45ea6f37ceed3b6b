"""The emulated kernels under AddressSanitizer, UndefinedBehaviorSanitizer and ThreadSanitizer
(tests/emu/sanitized_cases.py in a fresh process preloaded with the sanitizer's runtime): no report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ENV = {
    "asan": {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=23"},
    "ubsan": {"UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=23"},
    # One OpenMP thread: the emulator's threads are the only ones TSan needs to watch.
    "tsan": {"TSAN_OPTIONS": "halt_on_error=1:exitcode=23", "OMP_NUM_THREADS": "1"},
}
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "WARNING: ThreadSanitizer")


def _runtime(sanitizer: str) -> str:
    path = subprocess.run(["g++", f"-print-file-name=lib{sanitizer}.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path):
        pytest.skip(f"g++ has no lib{sanitizer}.so here")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", sorted(ENV))
def test_sanitized_cases_are_clean(sanitizer):
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulator needs g++")
    env = {**os.environ, **ENV[sanitizer], "LD_PRELOAD": _runtime(sanitizer)}
    result = subprocess.run([sys.executable, str(HERE / "sanitized_cases.py"), "--sanitize", sanitizer], env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and not any(r in output for r in REPORTS), output[-6000:]
    assert f"sanitized cases clean under {sanitizer}" in output
