"""A build with -ffast-math (or -Ofast) would silently remove the kernels' inf/nan checks (x - x folds
to 0): every kernel source includes csrc/functors.h, which refuses such a build with a clear error."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension as cpp_extension

from fastamp import _build

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a compiler run per case
SOURCES = ["cpu/grad_norm.cpp", "cpu/unscale_check.cpp", "cpu/scale.cpp"]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("flag", ["-ffast-math", "-Ofast", "-ffinite-math-only"])
@pytest.mark.parametrize("source", SOURCES)
def test_a_fast_math_build_fails_with_a_clear_message(flag, source, tmp_path):
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{ROOT / 'csrc'}"]
    run = subprocess.run(["c++", "-std=c++20", *_build.CXX_FLAGS, flag, "-fsyntax-only", *includes, str(ROOT / "csrc" / source)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode != 0
    assert "fastamp: built with -ffast-math or -Ofast" in run.stderr


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_without_it_the_same_source_compiles(tmp_path):
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{ROOT / 'csrc'}"]
    run = subprocess.run(["c++", "-std=c++20", *_build.CXX_FLAGS, "-fsyntax-only", *includes, str(ROOT / "csrc" / SOURCES[0])],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
