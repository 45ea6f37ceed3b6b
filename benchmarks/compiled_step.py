"""The optimizer-side step (clip to norm 1, fused AdamW step, scale update) eager vs compiled, against stock.

Variants, each with its own copy of the same parameters and gradients:

* stock eager: ``torch.amp.GradScaler`` + ``unscale_`` + ``clip_grad_norm_(foreach=True)`` + ``step`` + ``update``
  (the baseline: the ratios are against it);
* stock compiled: the same function under ``torch.compile`` (not fullgraph: torch/amp and torch.optim break
  the graph);
* fastamp eager: ``fastamp.GradScaler.clip_grad_norm_`` + ``step`` + ``update``;
* fastamp compiled: the same under ``torch.compile(fullgraph=True)`` (inductor);
* on CUDA also fastamp under ``mode="reduce-overhead"`` (CUDA graphs) and the eager step captured with
  ``torch.cuda.graph`` and replayed.

Rounds are interleaved (one step of each variant in turn, rotating which goes first) so that the machine's
drift hits all alike; the gradients are restored from a pristine copy outside the timed region. The first
call of each (compilation included) is reported apart, in ``extra_info.first_call_s``.

    python benchmarks/compiled_step.py --out benchmarks/results/compiled-step-cpu-2threads.json
    python benchmarks/summarize.py benchmarks/results/compiled-step-cpu-2threads.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, List

import torch
from report import write_report

import fastamp
from fastamp.cli.bench import WORKLOADS, make_grads, quantile

MAX_NORM = 1.0
SCALE = 2.0**12


def mlp_shapes(layers: int = 24, width: int = 512):
    """An MLP's weights and biases: 2 x layers tensors, layers x (width + 1) x width elements."""
    return [shape for _ in range(layers) for shape in ((width, width), (width,))]


SHAPES = {"mlp-24x512": mlp_shapes, **{name: w.shapes for name, w in WORKLOADS.items()}}


def stock_step(params: List[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scaler: Any) -> None:
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
    scaler.step(optimizer)
    scaler.update()


def fastamp_step(params: List[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scaler: Any) -> None:
    scaler.clip_grad_norm_(optimizer, MAX_NORM)
    scaler.step(optimizer)
    scaler.update()


class Variant:
    def __init__(self, name: str, stock: bool, device: str, shapes, grads, how: str) -> None:
        self.name, self.stock, self.how = name, stock, how
        self.params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.pristine = grads
        capturable = {"capturable": True} if device == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.params, lr=torch.tensor(1e-4, device=device), fused=True, **capturable)
        scaler_cls = torch.amp.GradScaler if stock else fastamp.GradScaler
        self.scaler = scaler_cls(device, init_scale=SCALE, growth_interval=10**9)
        self.scaler.scale(torch.ones((), device=device))
        fn = stock_step if stock else fastamp_step
        if how == "compiled":
            fn = torch.compile(fn, fullgraph=not stock)
        elif how == "reduce-overhead":
            fn = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
        self.fn: Callable = fn
        self.graph = None

    def restore(self) -> None:
        torch._foreach_copy_([p.grad for p in self.params], self.pristine)

    def __call__(self) -> None:
        if self.how == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        if self.how == "cuda-graph":
            if self.graph is None:  # warmed up by the first calls, on a side stream as torch asks
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self.restore()
                        fastamp_step(self.params, self.optimizer, self.scaler)
                torch.cuda.current_stream().wait_stream(side)
                self.restore()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    fastamp_step(self.params, self.optimizer, self.scaler)
            self.graph.replay()
            return
        self.fn(self.params, self.optimizer, self.scaler)


def measure(device: str, workload: str, rounds: int, warmup: int) -> List[Dict[str, Any]]:
    shapes = SHAPES[workload]()
    grads = [g * SCALE for g in make_grads(shapes, device=device)]
    hows = [("stock eager", True, "eager"), ("stock compiled", True, "compiled"), ("fastamp eager", False, "eager"),
            ("fastamp compiled (fullgraph)", False, "compiled")]
    if device == "cuda":
        hows += [("fastamp reduce-overhead (CUDA graphs)", False, "reduce-overhead"),
                 ("fastamp eager in torch.cuda.graph", False, "cuda-graph")]
    variants = [Variant(name, stock, device, shapes, grads, how) for name, stock, how in hows]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first_call: Dict[str, float] = {}
    times: Dict[str, List[float]] = {v.name: [] for v in variants}
    for r in range(warmup + rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            v.restore()
            sync()
            start = time.perf_counter()
            v()
            sync()
            elapsed = time.perf_counter() - start
            if r == 0:
                first_call[v.name] = elapsed
            if r >= warmup:
                times[v.name].append(elapsed)
    numel = sum(g.numel() for g in grads)
    group = f"optimizer-side-step/{workload}/fp32/{device}"
    return [{"group": group, "name": f"{group}/{v.name}", "stats": {"data": times[v.name]},
             "extra_info": {"impl": v.name, "role": "stock" if v.stock else "fastamp", "baseline": v.name == "stock eager",
                            "device": device, "workload": workload, "numel": numel, "tensors": len(shapes),
                            "first_call_s": round(first_call[v.name], 3), "torch": torch.__version__,
                            "threads": torch.get_num_threads()}}
            for v in variants]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workload", action="append", help=f"one of {sorted(SHAPES)}; repeatable")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    workloads = args.workload or (["mlp-24x512", "gpt2-124M"] if args.device == "cuda" else ["mlp-24x512"])
    benchmarks = []
    for workload in workloads:
        benchmarks += measure(args.device, workload, args.rounds, args.warmup)
    write_report(args.out, args.device, benchmarks)
    baseline = {}
    for b in benchmarks:
        median = quantile(b["stats"]["data"], 0.5)
        if b["extra_info"]["baseline"]:
            baseline[b["group"]] = median
        ratio = baseline.get(b["group"], median) / median
        print(f"{b['group']:45} {b['extra_info']['impl']:40} median {median * 1e3:8.3f} ms  x{ratio:5.2f} vs stock eager"
              f"  first call {b['extra_info']['first_call_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
