"""``fastamp demo`` end to end at a tiny size: both runs, the table, results.json and dashboard.png."""

from __future__ import annotations

import json

import pytest
import torch

from fastamp.cli import main
from fastamp.demo import default_precision, run_demo


def test_run_demo_writes_results_and_dashboard(tmp_path):
    pytest.importorskip("matplotlib")
    lines = []
    results = run_demo(device="cpu", precision="fp16", steps=5, size="tiny", out=str(tmp_path), progress=False,
                       log=lines.append)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)  # strict JSON: no NaN
    assert saved["config"]["precision"] == "fp16" and saved["config"]["steps"] == 5
    for run in ("stock", "fastamp"):
        assert len(saved[run]["loss_values"]) == 5
    # Same initial weights and data: the two runs' losses agree closely, and the first ones exactly.
    assert saved["stock"]["loss_values"][0] == saved["fastamp"]["loss_values"][0]
    assert results["max_abs_loss_difference"] < 1e-2
    for row in saved["summary"].values():
        assert row["steps_per_second"] > 0 and row["optimizer_phase_ms_median"] > 0
    table = "\n".join(lines)
    for label in ["steps/s", "optimizer phase ms/step", "skipped steps", "final loss", "max |loss difference|",
                  "peak memory MB"]:
        assert label in table
    with open(tmp_path / "dashboard.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_cli_demo(tmp_path, capsys):
    assert main(["demo", "--device", "cpu", "--precision", "bf16-mixed", "--steps", "3", "--size", "tiny",
                 "--optimizer", "foreach", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "stock AMP" in out and "fastamp" in out and "bf16" in out
    assert (tmp_path / "results.json").exists()


def test_defaults_and_errors(tmp_path):
    assert default_precision(torch.device("cuda")) == "fp16" and default_precision(torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="unknown size"):
        run_demo(device="cpu", size="huge", out=str(tmp_path))
    with pytest.raises(SystemExit):
        main(["demo", "--size", "huge"])
