"""Bad command-line input: a one-line usage error naming the argument, exit code 2, no traceback."""

from __future__ import annotations

import pytest

from fastamp.cli import main

CASES = [
    (["demo", "--precision", "fp8"], "argument --precision: unknown precision 'fp8'"),
    (["demo", "--steps", "0"], "argument --steps: must be >= 1"),
    (["gemm", "--dtype", "int7"], "argument --dtype/--dtypes: unknown dtype 'int7'"),
    (["gemm", "--shape", "3x4"], "argument --shape: '3x4' is not MxNxK"),
    (["gemm", "--device", "cpu", "--dtype", "tf32", "--shape", "8x8x8"], "tf32 is a CUDA Tensor Core mode"),
    (["bench", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["analyze", "--steps", "x"], "argument --steps: 'x' is not an integer"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"fastamp {argv[0]}: error: ")


def test_gemm_on_cpu_defaults_to_the_small_shapes(monkeypatch, capsys):
    from fastamp import gemm

    seen = {}

    def fake_benchmark(shapes, **kwargs):  # what the command asks for, not the timing
        seen["shapes"], seen["progress"] = shapes, kwargs.get("progress")
        return []

    monkeypatch.setattr(gemm, "benchmark_gemm", fake_benchmark)
    monkeypatch.setattr(gemm, "format_gemm_table", lambda results: "")
    assert main(["gemm", "--device", "cpu"]) == 0
    assert seen["shapes"] == gemm.CPU_SHAPES and seen["progress"] is not None
    assert main(["gemm", "--device", "cpu", "--full"]) == 0
    assert seen["shapes"] == gemm.DEFAULT_SHAPES
