"""fastamp._metrics and fastamp._plots: the step history, the timer, memory, and the matplotlib guard."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastamp._metrics import StepHistory, StepTimer, memory_mb, read_scalars, training_statistics


def test_history_reads_what_was_recorded_after_what_was_restored():
    history = StepHistory(StepTimer(torch.device("cpu")), restored={"loss_values": [9.0], "skipped": [False]})
    for i, skipped in enumerate([False, True, False]):
        history.record(loss=torch.tensor(float(i)), grad_norm=torch.tensor(2.0 * i), scale=torch.tensor(8.0),
                       found_inf=torch.tensor([float(skipped)]), step_time=0.5, optimizer_time=0.25, memory=10.0 + i,
                       tokens=4)
    read = history.read()
    assert read["loss_values"] == [9.0, 0.0, 1.0, 2.0] and read["skipped"] == [False, False, True, False]
    assert read["gradient_norms"] == [0.0, 2.0, 4.0] and read["tokens"] == [4, 4, 4]
    stats = training_statistics({k: v for k, v in read.items()} | {"loss_values": read["loss_values"][1:],
                                                                    "skipped": read["skipped"][1:]})
    assert stats["overflow_step_indices"] == [1] and stats["gradient_norms"] == [0.0, None, 4.0]
    assert stats["tokens_per_second"] == pytest.approx(12 / 1.5) and stats["max_memory_mb"] == 12.0


def test_read_scalars_and_memory():
    assert read_scalars([torch.tensor(1.5), torch.tensor([2.0])]) == [1.5, 2.0] and read_scalars([]) == []
    assert memory_mb(torch.device("cpu")) > 0


def test_fastamp_imports_and_measures_memory_without_the_unix_only_resource_module():
    code = ("import sys; sys.modules['resource'] = None\n"
            "import torch, fastamp, fastamp.trainer, fastamp.cli.demo\n"
            "from fastamp._metrics import memory_mb\n"
            "assert memory_mb(torch.device('cpu')) >= 0; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_the_plot_guard_names_what_needs_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fastamp._plots import pyplot\n"
            "try:\n    pyplot('plot_gemm')\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "plot_gemm needs matplotlib: pip install 'fastamp[plot]'" in out.stdout, out.stderr
