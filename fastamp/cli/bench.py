"""fastamp vs stock PyTorch AMP: the benchmark cases, workloads and the ``fastamp bench`` runner.

The cases are defined once, here, and used both by ``fastamp bench`` (standalone, no pytest) and by
the pytest-benchmark suites in ``benchmarks/``. Each group (workload, dtype, op) holds the fastamp case
next to its stock PyTorch baseline and, where useful, a bandwidth reference over a flat buffer of the
same size (``sum`` for read-only passes, in-place ``mul_`` for read+write passes, and ``copy_``, the
device's practical copy bandwidth, against which every case is also reported).

In-place cases restore the gradients from a pristine copy before each repeat, outside the timed region.
On CUDA a repeat is timed with CUDA events and the device is synchronized only around the timed region;
on CPU with ``time.perf_counter`` (the thread count is recorded).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops

__all__ = [
    "CASES",
    "DTYPES",
    "OPS",
    "WORKLOADS",
    "BenchCase",
    "BenchState",
    "Workload",
    "environment",
    "format_table",
    "gpt2_small_shapes",
    "gpt_1_3b_shapes",
    "make_grads",
    "quantile",
    "run_bench",
    "time_cases",
    "write_csv",
    "write_json",
]

LOSS_SCALE = 2.0**16
MAX_NORM = 1.0  # the grads here have norm ~1e3-1e4 once unscaled: the clip is active


# ---- workloads ----------------------------------------------------------------------------------------


def _gpt_shapes(d: int, vocab: int, ctx: int, layers: int) -> List[Tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style decoder (tied embeddings): embeddings, per-layer LayerNorms,
    attention and MLP weights and biases, final LayerNorm."""
    shapes: List[Tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def gpt2_small_shapes() -> List[Tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124,439,808 parameters in 148 tensors, embeddings tied)."""
    return _gpt_shapes(d=768, vocab=50257, ctx=1024, layers=12)


def gpt_1_3b_shapes() -> List[Tuple[int, ...]]:
    """Parameter shapes of a GPT-3 XL / GPT-Neo 1.3B-style model (d=2048, 24 layers, 1.32B parameters)."""
    return _gpt_shapes(d=2048, vocab=50257, ctx=2048, layers=24)


def small_tensor_shapes(count: int = 2000, numel: int = 4096) -> List[Tuple[int, ...]]:
    """Many small tensors: where launch and per-tensor overhead dominate."""
    return [(numel,)] * count


def flat_64m_shapes() -> List[Tuple[int, ...]]:
    """One flat gradient buffer of 2**26 elements (a DDP bucket, a flat FSDP shard)."""
    return [(2**26,)]


def huge_tensor_shapes() -> List[Tuple[int, ...]]:
    """One tensor of 2**27 elements (512 MB in fp32)."""
    return [(2**27,)]


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: Callable[[], List[Tuple[int, ...]]]
    gpu_only: bool = False
    description: str = ""
    # Elements the tensors start past a 16-byte-aligned base: 1 makes every chunk misaligned, as views
    # into a flat buffer after an odd-sized tensor are.
    element_offset: int = 0


WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("gpt2-124M", gpt2_small_shapes, description="GPT-2 small: 148 tensors, 124M elements"),
        Workload("gpt-1.3B", gpt_1_3b_shapes, gpu_only=True, description="GPT-3 XL-shaped: 292 tensors, 1.32B"),
        Workload("2000x4K", small_tensor_shapes, description="2,000 tensors of 4,096 elements"),
        Workload("1x128M", huge_tensor_shapes, description="one tensor of 2**27 elements"),
        Workload("64M-aligned", flat_64m_shapes, gpu_only=True, description="one 2**26-element view at offset 0"),
        Workload("64M-offset1", flat_64m_shapes, gpu_only=True, element_offset=1,
                 description="the same view at element offset 1: every chunk misaligned"),
    ]
}
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_grads(shapes, dtype=torch.float32, device="cpu", seed: int = 0) -> List[Tensor]:
    """Standard-normal tensors of the given shapes (the same values for the same seed on any device)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes]


def _at_offset(grads: List[Tensor], offset: int) -> List[Tensor]:
    """The same values as views into one buffer, starting ``offset`` elements past its (aligned) base."""
    if offset == 0:
        return grads
    buffer = grads[0].new_empty(offset + sum(g.numel() for g in grads))
    views, start = [], offset
    for g in grads:
        view = buffer[start:start + g.numel()].view(g.shape)
        view.copy_(g)
        views.append(view)
        start += g.numel()
    return views


class BenchState:
    """One workload in memory: scaled grads, their pristine copy, flat reference buffers, AMP scalars."""

    def __init__(self, workload: str, dtype: torch.dtype, device: str) -> None:
        self.workload, self.dtype, self.device = workload, dtype, torch.device(device)
        # Scaled as in training (grads * 2**16); fp16 would overflow at that scale, so fp16 grads are
        # scaled values that fit: what a scaler that backed off to a working scale leaves.
        scale = LOSS_SCALE if dtype != torch.float16 else 2.0**4
        self.loss_scale = scale
        self.grads = _at_offset([(g * scale).to(dtype) for g in make_grads(WORKLOADS[workload].shapes(), device=device)],
                                WORKLOADS[workload].element_offset)
        self.pristine = [g.clone() for g in self.grads]
        self.numel = sum(g.numel() for g in self.grads)
        self.grad_bytes = sum(g.numel() * g.element_size() for g in self.grads)
        self.flat = torch.randn(self.numel, device=device).to(dtype)
        self.flat_dst = torch.empty_like(self.flat)
        self.found_inf = torch.zeros((), device=device)
        self.inv_scale = torch.full((), 1.0 / scale, device=device)
        self.one = torch.ones((), device=device)
        self.scale = torch.full((), scale, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self._params: Optional[List[torch.nn.Parameter]] = None
        self.optimizer_runs: Dict[Any, Any] = {}

    @property
    def params(self) -> List[torch.nn.Parameter]:
        """Parameters whose ``.grad`` are the grads (for ``clip_grad_norm_`` and optimizers)."""
        if self._params is None:
            self._params = []
            for g in self.grads:
                p = torch.nn.Parameter(torch.empty_like(g))
                p.grad = g
                self._params.append(p)
        return self._params

    def restore(self) -> None:
        torch._foreach_copy_(self.grads, self.pristine)
        self.found_inf.zero_()

    def reset_scale(self) -> None:
        self.scale.fill_(self.loss_scale)
        self.growth_tracker.zero_()


# ---- cases ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    """One timed function. ``role`` is "reference" (a flat-buffer bandwidth yardstick), "stock" (PyTorch;
    ``baseline`` marks the one speedups are measured against) or "fastamp". ``reads``/``writes`` count
    passes over the gradient bytes (bytes moved = (reads + writes) x gradient bytes)."""

    op: str
    impl: str
    role: str
    fn: Callable[[BenchState], Any]
    reads: int = 0
    writes: int = 0
    restore: bool = False
    baseline: bool = False
    description: str = ""
    dtypes: Tuple[str, ...] = ("fp32", "fp16", "bf16")


def _stock_clipped_step(s: BenchState) -> None:
    torch._amp_foreach_non_finite_check_and_unscale_(s.grads, s.found_inf, s.inv_scale)
    torch.nn.utils.clip_grad_norm_(s.params, MAX_NORM, foreach=True)


def _notebook_loop_step(s: BenchState) -> None:
    # The reference notebook's trainer: unscale_, then a per-parameter inf/nan check and norm with a
    # host read for each parameter, then clip_grad_norm_.
    torch._amp_foreach_non_finite_check_and_unscale_(s.grads, s.found_inf, s.inv_scale)
    bad = False
    for g in s.grads:
        if torch.isnan(g).any() or torch.isinf(g).any():
            bad = True
            break
    if not bad:
        total = 0.0
        for g in s.grads:
            total += g.norm(2).item() ** 2
        torch.nn.utils.clip_grad_norm_(s.params, MAX_NORM)


def _fastamp_clipped_step(s: BenchState) -> None:
    total, _ = ops.grad_norm(s.grads, s.inv_scale, s.found_inf)
    ops.scale_(s.grads, s.inv_scale * ops.clip_coef(total, MAX_NORM), s.found_inf)


def _stock_norm(s: BenchState) -> Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(s.grads)))


def _stock_unscale_then_norm(s: BenchState) -> Tensor:
    torch._amp_foreach_non_finite_check_and_unscale_(s.grads, s.found_inf, s.inv_scale)
    return _stock_norm(s)


class _OptimizerStep:
    """The whole optimizer-side step on the state's parameters: AdamW and a scaler of its own (stock:
    torch.amp.GradScaler + unscale_ + clip_grad_norm_(foreach); fastamp: fastamp.GradScaler.clip_grad_norm_),
    then step and update. The parameters are shared between the variants; each has its own AdamW state."""

    def __init__(self, stock: bool, fused: bool) -> None:
        self.stock, self.fused = stock, fused

    def __call__(self, s: BenchState) -> None:
        from ..grad_scaler import GradScaler

        key = (self.stock, self.fused)
        runner = s.optimizer_runs.get(key)
        if runner is None:
            optimizer = torch.optim.AdamW(s.params, lr=1e-6, fused=self.fused, foreach=None if self.fused else True)
            scaler_cls = torch.amp.GradScaler if self.stock else GradScaler
            scaler = scaler_cls(s.device.type, init_scale=s.loss_scale, growth_interval=10**9)
            scaler.scale(s.one)  # creates the scale on the device
            runner = s.optimizer_runs[key] = (optimizer, scaler)
        optimizer, scaler = runner
        if self.stock:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(s.params, MAX_NORM, foreach=True)
        else:
            scaler.clip_grad_norm_(optimizer, MAX_NORM)
        scaler.step(optimizer)
        scaler.update()


CASES: List[BenchCase] = [
    BenchCase("unscale_check_", "copy_ flat", "reference", lambda s: s.flat_dst.copy_(s.flat), 1, 1,
              description="device copy bandwidth (into a preallocated buffer)"),
    BenchCase("unscale_check_", "mul_ flat", "reference", lambda s: s.flat.mul_(1.0), 1, 1,
              description="in-place read+write bandwidth"),
    BenchCase("unscale_check_", "stock _amp_foreach_non_finite_check_and_unscale_", "stock",
              lambda s: torch._amp_foreach_non_finite_check_and_unscale_(s.grads, s.found_inf, s.inv_scale), 1, 1,
              restore=True, baseline=True),
    BenchCase("unscale_check_", "fastamp unscale_check_", "fastamp",
              lambda s: ops.unscale_check_(s.grads, s.found_inf, s.inv_scale), 1, 1, restore=True),
    BenchCase("grad_norm", "sum flat", "reference", lambda s: s.flat.sum(), 1, 0, description="read bandwidth"),
    BenchCase("grad_norm", "stock _foreach_norm", "stock", _stock_norm, 1, 0, baseline=True),
    BenchCase("grad_norm", "fastamp grad_norm", "fastamp", lambda s: ops.grad_norm(s.grads, s.inv_scale, s.found_inf), 1, 0),
    BenchCase("unscale_check_norm_", "stock _amp_foreach_non_finite_check_and_unscale_ + _foreach_norm", "stock",
              _stock_unscale_then_norm, 2, 1, restore=True, baseline=True),
    BenchCase("unscale_check_norm_", "fastamp unscale_check_norm_", "fastamp",
              lambda s: ops.unscale_check_norm_(s.grads, s.found_inf, s.inv_scale), 1, 1, restore=True),
    BenchCase("clipped-step", "stock unscale_ + clip_grad_norm_(foreach)", "stock", _stock_clipped_step, 3, 2,
              restore=True, baseline=True),
    BenchCase("clipped-step", "stock per-parameter loop (notebook)", "stock", _notebook_loop_step, 6, 2, restore=True),
    BenchCase("clipped-step", "fastamp grad_norm + clip_coef + scale_", "fastamp", _fastamp_clipped_step, 2, 1,
              restore=True),
    BenchCase("update_scale_", "stock _amp_update_scale_", "stock",
              lambda s: torch._amp_update_scale_(s.scale, s.growth_tracker, s.found_inf, 2.0, 0.5, 2000), baseline=True),
    BenchCase("update_scale_", "fastamp update_scale_", "fastamp",
              lambda s: ops.update_scale_(s.scale, s.growth_tracker, s.found_inf, 2.0, 0.5, 2000)),
    # AdamW reads param, grad, exp_avg, exp_avg_sq and writes three of them: 4R 3W on top of the clipped step.
    BenchCase("optimizer-step", "stock AdamW(foreach) + unscale_ + clip_grad_norm_", "stock",
              _OptimizerStep(stock=True, fused=False), 7, 5, restore=True, baseline=True, dtypes=("fp32",)),
    BenchCase("optimizer-step", "stock AdamW(fused) + unscale_ + clip_grad_norm_", "stock",
              _OptimizerStep(stock=True, fused=True), 7, 5, restore=True, dtypes=("fp32",)),
    BenchCase("optimizer-step", "fastamp AdamW(foreach) + clip_grad_norm_", "fastamp",
              _OptimizerStep(stock=False, fused=False), 6, 4, restore=True, dtypes=("fp32",)),
    BenchCase("optimizer-step", "fastamp AdamW(fused), clip folded into the step", "fastamp",
              _OptimizerStep(stock=False, fused=True), 5, 3, restore=True, dtypes=("fp32",)),
]
OPS: Tuple[str, ...] = tuple(dict.fromkeys(c.op for c in CASES))


# ---- timing -----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases: Sequence[BenchCase], state: BenchState, repeats: int, warmup: int = 2) -> List[List[float]]:
    """Seconds per repeat for each case. The cases run interleaved (repeat r of every case, then repeat
    r + 1), so drifts in the machine's memory bandwidth hit all of them alike and their ratios hold.
    CUDA events on a GPU, synchronizing only around each timed region; perf_counter on CPU. In-place cases
    get their grads restored before each repeat, untimed."""
    device = state.device
    cuda = device.type == "cuda"
    records: List[List[Any]] = [[] for _ in cases]
    for i in range(warmup + repeats):
        for case, record in zip(cases, records):
            if case.restore:
                state.restore()
            _sync(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                case.fn(state)
                end.record()
                _sync(device)
                value: Any = (start, end)
            else:
                t0 = time.perf_counter()
                case.fn(state)
                value = time.perf_counter() - t0
            if i >= warmup:
                record.append(value)
            if case.op == "update_scale_":
                state.reset_scale()
    if cuda:
        return [[s.elapsed_time(e) / 1e3 for s, e in record] for record in records]
    return records


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of ``values`` (q in [0, 1])."""
    values = sorted(values)
    index = q * (len(values) - 1)
    low = int(index)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (index - low)


def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> Dict[str, Any]:
    """Where a result was measured: device, CPU model and threads, versions, git commit."""
    from .. import __version__, build_info

    info = build_info()
    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastamp": __version__,
        "fastamp_kernels": {"cpu": info.get("cpu_kernels"), "cuda": info.get("cuda_kernels")},
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["device_memory_gb"] = round(props.total_memory / 2**30, 1)
    return env


def _default_repeats(device: str, numel: int) -> int:
    if device == "cuda":
        return 50 if numel > 10**8 else 200
    return 15 if numel > 10**7 else 100


def run_bench(
    device: str = "cpu",
    workloads: Optional[Iterable[str]] = None,
    dtypes: Optional[Iterable[str]] = None,
    ops_: Optional[Iterable[str]] = None,
    repeats: Optional[int] = None,
    warmup: int = 2,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Time every case for each workload and dtype on ``device``; returns ``{"environment", "results"}``.

    Each result row: workload, dtype, op, impl, role, median/p20/p80 seconds, bytes moved, GB/s,
    speedup over the group's stock baseline, % of the copy bandwidth measured in the same group, and
    (for ops with a flat-buffer yardstick, e.g. ``sum`` for grad_norm) % of that yardstick's bandwidth.
    GPU-only workloads are left out on CPU.
    """
    workloads = list(workloads or [w for w in WORKLOADS if device == "cuda" or not WORKLOADS[w].gpu_only])
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; choose from {sorted(WORKLOADS)}")
        if WORKLOADS[w].gpu_only and device != "cuda":
            raise ValueError(f"workload {w!r} runs on CUDA only")
    dtype_names = list(dtypes or DTYPES)
    for d in dtype_names:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    op_names = list(ops_ or OPS)
    for o in op_names:
        if o not in OPS:
            raise ValueError(f"unknown op {o!r}; choose from {list(OPS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("fastamp bench --device cuda: CUDA is not available")
    cases = [c for c in CASES if c.op in op_names]
    copy_case = next(c for c in CASES if c.impl == "copy_ flat")
    total = len(workloads) * sum(len([c for c in cases if d in c.dtypes]) for d in dtype_names)
    done = 0
    rows: List[Dict[str, Any]] = []
    for workload in workloads:
        for dtype_name in dtype_names:
            state = BenchState(workload, DTYPES[dtype_name], device)
            n = repeats or _default_repeats(device, state.numel)
            group_cases = [c for c in cases if dtype_name in c.dtypes]
            timed = [copy_case] + [c for c in group_cases if c is not copy_case]
            if progress:
                progress(f"[{done + 1}-{done + len(group_cases)}/{total}] {workload} {dtype_name}: "
                         f"{len(timed)} cases x {n} repeats, interleaved")
            all_times = dict(zip((c.impl for c in timed), time_cases(timed, state, n, warmup)))
            done += len(group_cases)
            copy_gbps = 2 * state.grad_bytes / statistics.median(all_times[copy_case.impl]) / 1e9
            group_rows: List[Dict[str, Any]] = []
            for case in group_cases:
                times = all_times[case.impl]
                median = statistics.median(times)
                moved = (case.reads + case.writes) * state.grad_bytes
                gbps = moved / median / 1e9 if moved else None
                group_rows.append({
                    "workload": workload, "dtype": dtype_name, "device": device, "op": case.op,
                    "impl": case.impl, "role": case.role, "baseline": case.baseline,
                    "numel": state.numel, "tensors": len(state.grads), "repeats": len(times),
                    "median_s": median, "p20_s": quantile(times, 0.2), "p80_s": quantile(times, 0.8),
                    "bytes": moved, "gbps": gbps,
                    "pct_copy_bandwidth": 100.0 * gbps / copy_gbps if gbps else None,
                    "times_s": times,
                })
            for op in dict.fromkeys(r["op"] for r in group_rows):
                in_op = [r for r in group_rows if r["op"] == op]
                base = next((r for r in in_op if r["baseline"]), None)
                # The same passes over one flat buffer (sum for a norm, mul_ for an in-place op): how much of
                # that bandwidth a multi-tensor op keeps on a list of many tensors.
                flat = next((r for r in in_op if r["role"] == "reference" and r["impl"] != copy_case.impl), None)
                for r in in_op:
                    r["speedup_vs_stock"] = base["median_s"] / r["median_s"] if base and r["role"] != "reference" else None
                    r["pct_flat_bandwidth"] = (100.0 * r["gbps"] / flat["gbps"]
                                               if flat and r["gbps"] and r["role"] != "reference" else None)
            rows.extend(group_rows)
            del state
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"environment": environment(device), "results": rows}


def format_table(report: Dict[str, Any]) -> str:
    """The results as an aligned text table, one block per (workload, dtype, op)."""
    env = report["environment"]
    lines = [
        f"fastamp bench on {env['device']} ({env['device_name']}), {env['threads']} threads, torch {env['torch']}, "
        f"CUDA {env['cuda']}, fastamp {env['fastamp']}, commit {(env['git_commit'] or '?')[:12]}",
        "",
        f"{'workload':10} {'dtype':5} {'op':19} {'case':50} {'median ms':>10} {'p20-p80 ms':>17} "
        f"{'MB moved':>9} {'GB/s':>7} {'% copy':>7} {'% flat':>7} {'vs stock':>9}",
    ]
    previous = None
    for r in report["results"]:
        key = (r["workload"], r["dtype"], r["op"])
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        spread = f"{r['p20_s'] * 1e3:.3f}-{r['p80_s'] * 1e3:.3f}"
        gbps = f"{r['gbps']:.1f}" if r["gbps"] else "-"
        pct = f"{r['pct_copy_bandwidth']:.0f}%" if r["pct_copy_bandwidth"] else "-"
        pct_flat = f"{r['pct_flat_bandwidth']:.0f}%" if r.get("pct_flat_bandwidth") else "-"
        speed = f"{r['speedup_vs_stock']:.2f}x" if r["speedup_vs_stock"] else "-"
        moved = f"{r['bytes'] / 1e6:.0f}" if r["bytes"] else "-"
        lines.append(
            f"{r['workload']:10} {r['dtype']:5} {r['op']:19} {r['impl'][:50]:50} {r['median_s'] * 1e3:10.3f} "
            f"{spread:>17} {moved:>9} {gbps:>7} {pct:>7} {pct_flat:>7} {speed:>9}"
        )
    return "\n".join(lines)


CSV_FIELDS = ["workload", "dtype", "device", "op", "impl", "role", "baseline", "numel", "tensors", "repeats",
              "median_s", "p20_s", "p80_s", "bytes", "gbps", "pct_copy_bandwidth", "pct_flat_bandwidth",
              "speedup_vs_stock"]


def write_csv(report: Dict[str, Any], path: str) -> None:
    """One row per case, without the raw times."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in report["results"]:
            writer.writerow(r)


def write_json(report: Dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
