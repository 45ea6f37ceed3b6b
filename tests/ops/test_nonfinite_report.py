"""nonfinite_report: which tensors hold nan/+inf/-inf."""

from __future__ import annotations

import math

import torch

from fastamp import ops


def test_nonfinite_report_names_and_counts():
    a = torch.zeros(10)
    b = torch.tensor([math.nan, math.inf, -math.inf, -math.inf, 1.0], dtype=torch.float16)
    c = torch.tensor([math.nan, math.nan])
    report = ops.nonfinite_report({"layer.a": a, "layer.b": b, "no_grad": None, "layer.c": c})
    assert [r.name for r in report] == ["layer.b", "layer.c"]
    assert (report[0].nan, report[0].posinf, report[0].neginf, report[0].total) == (1, 1, 2, 4)
    assert report[0].dtype == torch.float16 and report[0].shape == (5,)
    assert (report[1].nan, report[1].total) == (2, 2)
    assert ops.nonfinite_report([("x", a)]) == []
