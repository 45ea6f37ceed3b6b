"""What the non-finite guard and overflow diagnosis cost on steps that do not overflow: the trainer's
step (FusedMixedPrecisionTrainer.train_step on the test transformer) with both off (the baseline), the
guard alone, and both, timed interleaved (one step of each configuration in turn, rotating which goes
first), so that the machine's drift hits all three alike.

    python benchmarks/guard_overhead.py --out benchmarks/results/guard-cpu-2threads.json
    python benchmarks/summarize.py benchmarks/results/guard-cpu-2threads.json

The JSON has pytest-benchmark's shape (groups, per-round times, machine and commit), so summarize.py
renders it with the other results.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from typing import Any, Dict, List

import torch
from report import write_report

from fastamp import FusedMixedPrecisionTrainer
from fastamp.testing.models import build_model, synthetic_batches

CASES = {  # name: (skip_nonfinite, diagnose_overflows)
    "guard off, diagnosis off": (False, False),
    "guard on, diagnosis off": (True, False),
    "guard on, diagnosis on": (True, True),
}


def measure(device: str, precision: str, optimizer: str, rounds: int, warmup: int, size: str) -> List[Dict[str, Any]]:
    """Per-step times of each configuration, interleaved; one pytest-benchmark-shaped entry each."""
    torch.manual_seed(0)
    initial = build_model(size).to(device)
    cases = dict(CASES)
    if precision == "fp16":  # fp16's loss scaler skips non-finite steps anyway: only the diagnosis varies
        cases = {"loss scaler, diagnosis off": (True, False), "loss scaler, diagnosis on": (True, True)}
    trainers = {}
    for name, (skip_nonfinite, diagnose) in cases.items():
        model = copy.deepcopy(initial)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=optimizer == "fused",
                                foreach=None if optimizer == "fused" else True)
        trainers[name] = FusedMixedPrecisionTrainer(model, opt, precision=precision, skip_nonfinite=skip_nonfinite,
                                                    diagnose_overflows=diagnose)
    batches = list(itertools.islice(synthetic_batches(initial.config, 8, 32, seed=0, device=device, num_tokens=256), 8))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: Dict[str, List[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for r in range(warmup + rounds):
        batch = batches[r % len(batches)]
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            trainers[name].train_step(batch)
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    for trainer in trainers.values():
        assert trainer.get_training_statistics()["overflow_steps"] == 0
    group = f"trainer-step/{precision}/{optimizer}/{device}"
    return [{"group": group, "name": f"{group}/{name}", "stats": {"data": times[name]},
             "extra_info": {"impl": name, "role": "fastamp", "baseline": name == names[0], "device": device,
                            "size": size, "torch": torch.__version__, "threads": torch.get_num_threads()}}
            for name in trainers]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--size", default="tiny")
    args = parser.parse_args(argv)
    benchmarks = []
    for precision in ("bf16", "fp32", "fp16"):
        for optimizer in ("fused", "foreach"):
            benchmarks += measure(args.device, precision, optimizer, args.rounds, args.warmup, args.size)
    write_report(args.out, args.device, benchmarks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
