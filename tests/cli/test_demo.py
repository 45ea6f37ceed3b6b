"""``fastamp demo`` end to end at a tiny size: both runs, the table, results.json and dashboard.png."""

from __future__ import annotations

import json

import pytest
import torch

from fastamp.cli import main
from fastamp.cli.demo import default_precision, run_demo


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


def test_demo_injects_a_nan_gradient_that_ruins_stock_bf16_and_fastamp_skips(tmp_path):
    lines = []
    results = run_demo(device="cpu", precision="bf16", steps=8, size="tiny", out=str(tmp_path), progress=False,
                       log=lines.append, inject_at=3)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["injected"]["step"] == 3 and saved["injected"]["value"] == "nan"
    # Stock: the nan goes through the clip into every weight; the loss never recovers.
    assert all(v is None for v in saved["stock"]["loss_values"][4:])  # NaN is written as null
    assert saved["summary"]["stock AMP"]["skipped_steps"] == 0
    # fastamp: that step is skipped, the others train, and the diagnosis names where the nan came from.
    assert saved["fastamp"]["overflow_step_indices"] == [3] and saved["summary"]["fastamp"]["skipped_steps"] == 1
    assert all(v is not None for v in saved["fastamp"]["loss_values"])
    (diagnosis,) = saved["overflow_diagnoses"]
    assert diagnosis["found"] and diagnosis["step"] == 3 and diagnosis["parameter"] == "layers.0.feedforward.0.weight"
    assert any("fastamp diagnosis" in line and "layers.0.feedforward.0" in line for line in lines)
    assert results["injected"]["parameter"] == "layers.0.feedforward.0.weight"


def test_demo_without_injection_skips_nothing(tmp_path, capsys):
    assert main(["demo", "--device", "cpu", "--steps", "3", "--size", "tiny", "--out", str(tmp_path),
                 "--no-progress", "--no-inject"]) == 0
    assert "injecting" not in capsys.readouterr().out
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["injected"] is None and saved["fastamp"]["overflow_step_indices"] == []
    with pytest.raises(ValueError, match="inject_at"):
        run_demo(device="cpu", steps=3, size="tiny", out=str(tmp_path), inject_at=3)


@pytest.mark.slow
def test_demo_plants_a_spike_that_fastamp_skips_and_stock_applies(tmp_path):
    results = run_demo(device="cpu", precision="bf16", steps=36, size="tiny", out=str(tmp_path), progress=False,
                       log=lambda line: None, inject_at=None, spike_at=30)
    assert results["spike_at"] == 30
    assert 30 in results["fastamp"]["overflow_step_indices"] and results["spikes_skipped"] >= 1
    assert results["stock"]["overflow_step_indices"] == []  # stock applies it
