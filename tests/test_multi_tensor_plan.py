"""Compiles and runs the C++ unit tests of csrc/multi_tensor_plan.h (host-side launch planning)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_multi_tensor_plan_cpp(tmp_path):
    binary = tmp_path / "test_multi_tensor_plan"
    source = ROOT / "csrc" / "tests" / "test_multi_tensor_plan.cpp"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Werror", "-o", str(binary), str(source)], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "all checks passed" in result.stdout
