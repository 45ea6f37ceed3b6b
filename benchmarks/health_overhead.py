"""What training health costs on a clipped optimizer step: the spike guard, and per-parameter gradient
norms, on GPT-2 small's 148 gradient tensors (124M fp32 elements), timed interleaved (each repeat runs
every case once, the order rotating), so that the machine's drift hits all alike.

Cases (all: fastamp.GradScaler.clip_grad_norm_ + fused AdamW step + update):
- baseline: the clipped step, twice (two identical cases on their own tensors: the noise floor);
- spike guard: the same with a SpikeGuard (its decision joins found_inf on the device);
- per-param norms: ``per_param_norms=True`` (from the clip's own pass) and the norms read once;
- Lightning's ``grad_norm`` utility after the clipped step (one norm per parameter, each read);
- ``torch._foreach_norm`` + ``.tolist()`` after the clipped step.

    python benchmarks/health_overhead.py --out benchmarks/results/health-cpu-2threads.json
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import torch
from report import write_report

from fastamp import GradScaler, SpikeGuard
from fastamp.cli.bench import gpt2_small_shapes


def make_state(device: str, guard: bool):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, device=device) * 0.02) for shape in gpt2_small_shapes()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    module = torch.nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"p{i}", p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    scaler = GradScaler(device, init_scale=1.0, growth_interval=10**9,
                        spike_guard=SpikeGuard(window=128, warmup=2) if guard else None)
    scaler.scale(torch.ones((), device=device))
    return module, opt, scaler


def cases(device: str) -> Dict[str, Callable[[], None]]:
    from lightning.pytorch.utilities import grad_norm

    states = {name: make_state(device, guard=name == "spike guard") for name in
              ("baseline", "baseline (again)", "spike guard", "per-param norms", "lightning grad_norm",
               "foreach_norm + tolist")}

    def clipped(name: str, per_param: bool = False) -> Callable[[], None]:
        module, opt, scaler = states[name]

        def run() -> None:
            scaler.clip_grad_norm_(opt, 1.0, per_param_norms=per_param)
            scaler.step(opt)
            scaler.update()
            if per_param:
                scaler.grad_norms(module)
            elif name == "lightning grad_norm":
                {k: float(v) for k, v in grad_norm(module, norm_type=2).items()}
            elif name == "foreach_norm + tolist":
                torch.stack(torch._foreach_norm([p.grad for p in module.parameters()])).tolist()
        return run

    return {"baseline": clipped("baseline"), "baseline (again)": clipped("baseline (again)"),
            "spike guard": clipped("spike guard"),
            "per-param norms": clipped("per-param norms", per_param=True),
            "lightning grad_norm": clipped("lightning grad_norm"), "foreach_norm + tolist": clipped("foreach_norm + tolist")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/health-cpu-2threads.json")
    args = parser.parse_args()
    runs = cases(args.device)
    names = list(runs)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for i in range(args.repeats + 2):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            runs[name]()
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    base = sorted(times["baseline"])[len(times["baseline"]) // 2]
    entries = []
    for name in names:
        median = sorted(times[name])[len(times[name]) // 2]
        print(f"{name:24} median {median * 1e3:8.2f} ms   {100 * (median - base) / base:+6.1f}% vs the clipped step")
        entries.append({"group": f"health/gpt2-124M/{args.device}", "name": name, "stats": {"data": times[name]},
                        "extra_info": {"baseline": name == "baseline"}})
    write_report(args.out, args.device, entries)


if __name__ == "__main__":
    main()
