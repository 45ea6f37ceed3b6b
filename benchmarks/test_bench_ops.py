"""fastamp vs stock PyTorch AMP, as pytest-benchmark suites (the cases of ``fastamp.cli.bench``).

Each group ``<op>/<workload>/<dtype>/<device>`` holds fastamp's case next to its stock PyTorch baseline
and, for the memory-bound ops, flat-buffer bandwidth references (``sum``, in-place ``mul_``, ``copy_``).
Run (the results land in benchmarks/results/, rendered by summarize.py):

    pytest benchmarks --benchmark-only --benchmark-json benchmarks/results/<name>.json
    python benchmarks/summarize.py benchmarks/results/<name>.json

``fastamp bench`` runs the same cases without pytest, interleaved, with GB/s and % of copy bandwidth.
"""

from __future__ import annotations

import pytest
import torch

from fastamp.cli.bench import CASES, DTYPES, WORKLOADS, BenchState

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_STATE = {}


def state_for(device: str, workload: str, dtype: str) -> BenchState:
    key = (device, workload, dtype)
    if key not in _STATE:
        _STATE.clear()  # one workload in memory at a time
        if device == "cuda":
            torch.cuda.empty_cache()
        _STATE[key] = BenchState(workload, DTYPES[dtype], device)
    return _STATE[key]


def _params():
    for device in DEVICES:
        for workload, spec in WORKLOADS.items():
            if spec.gpu_only and device != "cuda":
                continue
            for dtype in DTYPES:
                for case in CASES:
                    if dtype in case.dtypes:
                        yield pytest.param(device, workload, dtype, case,
                                           id=f"{device}-{workload}-{dtype}-{case.op}-{case.role}-{case.impl}")


@pytest.mark.parametrize("device,workload,dtype,case", list(_params()))
def test_case(benchmark, device, workload, dtype, case):
    state = state_for(device, workload, dtype)
    benchmark.group = f"{case.op}/{workload}/{dtype}/{device}"
    benchmark.extra_info.update(
        device=device, op=case.op, impl=case.impl, role=case.role, baseline=case.baseline, numel=state.numel,
        tensors=len(state.grads), bytes=(case.reads + case.writes) * state.grad_bytes,
        torch=torch.__version__, threads=torch.get_num_threads(),
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def setup():
        if case.restore:
            state.restore()
        sync()

    def timed():
        case.fn(state)
        sync()

    big = state.numel > 10**7
    rounds = (8 if case.op == "optimizer-step" else 15) if big else 100
    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=2, iterations=1)
    if case.op == "update_scale_":
        state.reset_scale()
