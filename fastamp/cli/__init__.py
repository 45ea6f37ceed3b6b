"""The ``fastamp`` command: ``info``, ``check``, ``build``, ``demo``, ``bench``, ``gemm``, ``analyze``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    import fastamp

    from ..analysis import hardware_report

    info = fastamp.build_info()
    hardware = hardware_report()
    if args.json:
        print(json.dumps({**info, "hardware": hardware}, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    print("fastamp build information")
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")
    print("hardware")
    for key, value in hardware.items():
        if key not in ("recommendations", "fastamp_kernels"):
            print(f"  {key:<{width}}  {value}")
    print("recommendations")
    for topic, advice in hardware["recommendations"].items():
        print(f"  {topic:<{width}}  {advice['value']}\n  {'':<{width}}  because {advice['reason']}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from . import check

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]

    def progress(result: "check.CheckResult") -> None:
        print(check.format_result(result), flush=True)

    report = check.run_checks(devices, progress=progress)
    print(check.format_report(report))
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return check.main_exit_code(report)


def _build_kernels(args: argparse.Namespace) -> int:
    import torch

    from .. import _build

    if args.cuda_arch:
        archs = _build.parse_arch_list(args.cuda_arch)
    elif args.cpu_only or torch.version.cuda is None:
        archs = []
    else:
        archs = _build.parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST", "")) or _build.visible_gpu_archs()
    cuda_home = _build.find_cuda_home() if archs else None
    if archs and torch.version.cuda is None:
        print(f"fastamp build: torch {torch.__version__} is a CPU-only build; it cannot run CUDA kernels", file=sys.stderr)
        return 2
    if archs and cuda_home is None:
        print("fastamp build: no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)", file=sys.stderr)
        return 2
    if not archs and torch.version.cuda is not None and not args.cpu_only:
        print("fastamp build: no GPU visible and no --cuda-arch: building the CPU kernels only", file=sys.stderr)
    block_shape = args.block_shape or os.environ.get("FASTAMP_CUDA_BLOCK_SHAPE", "")
    tools = _build.cuda_toolchain(torch.__version__, torch.version.cuda, cuda_home, archs, block_shape)
    try:
        built = _build.compile_into_cache(tools, force=args.force, verbose=args.verbose)
    except _build.BuildError as exc:
        print(f"fastamp build: {exc}", file=sys.stderr)
        return 1
    state = f"compiled in {built.seconds:.0f} s" if built.compiled_now else "already in the cache"
    print(f"fastamp kernels for torch {tools.torch_version}, {tools.describe()}: {state}\n  {built.path}")
    return 0


def _gemm(args: argparse.Namespace) -> int:
    import torch

    from .. import gemm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape:
        shapes = args.shape
    else:
        shapes = gemm.CPU_SHAPES if device == "cpu" and not args.full else gemm.DEFAULT_SHAPES
    dtypes = [d for group in args.dtype for d in group] if args.dtype else None

    def progress(line: str) -> None:
        sys.stderr.write(("\r\033[K" if sys.stderr.isatty() else "") + line + ("" if sys.stderr.isatty() else "\n"))
        sys.stderr.flush()

    results = gemm.benchmark_gemm(shapes, dtypes=dtypes, device=device, repeats=args.repeats, progress=progress)
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    print(gemm.format_gemm_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {gemm.plot_gemm(results, args.plot)}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import torch

    from ..analysis import PrecisionAnalyzer, analyze_gradients, plot_gradient_histogram
    from ..gemm import audit_model
    from ..testing.models import build_model, synthetic_batches

    torch.manual_seed(0)
    model = build_model(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = synthetic_batches(model.config, 4, seed=0)
    for _ in range(args.steps):
        optimizer.zero_grad()
        model(**next(batches))["loss"].backward()
        optimizer.step()
    report = {
        "model": args.model,
        "steps": args.steps,
        "formats": PrecisionAnalyzer(num_samples=2000).analyze(),
        "gradients": {str(scale): analyze_gradients(model, loss_scale=scale) for scale in (1.0, 2.0**16)},
        "alignment_audit": [e.as_dict() for e in audit_model(model, dtype="bf16")],
    }
    print(f"precision analysis of the {args.model} test transformer after {args.steps} steps")
    for name, facts in report["formats"].items():
        f = facts["facts"]
        u = facts["gradient_underflow"]
        print(f"  {name:5} max {f['max']:.3g}  smallest normal {f['smallest_normal']:.3g}  eps {f['eps']:.3g}  "
              f"digits {f['decimal_digits']}  sweep underflow {u['underflow_rate']:.1%}  "
              f"recommended scale {u['recommended_loss_scale']:g}")
    for scale, g in report["gradients"].items():
        for name, r in g["formats"].items():
            print(f"  grads x {float(scale):g} in {name}: underflow {r['underflow_fraction']:.2%}, subnormal "
                  f"{r['subnormal_fraction']:.2%}, overflow {r['overflow_fraction']:.2%}; best scale "
                  f"{r['best_power_of_two_scale']:g} keeps {r['normal_fraction_at_best_scale']:.2%} normal")
    for entry in report["alignment_audit"]:
        print(f"  unaligned {entry['kind']} {entry['name']}: pad {entry['misaligned']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_gradient_histogram(model, args.plot)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(device=args.device, precision=args.precision, steps=args.steps, size=args.size, out=args.out,
             optimizer=args.optimizer, seed=args.seed, progress=not args.no_progress,
             inject_at=None if args.no_inject else args.inject_at, spike_at=None if args.no_spike else args.spike_at)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    interactive = sys.stderr.isatty()

    def progress(line: str) -> None:
        if interactive:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    report = bench.run_bench(device=args.device, workloads=args.workload, dtypes=args.dtype, ops_=args.op,
                             repeats=args.repeats, progress=progress)
    if interactive:
        sys.stderr.write("\r\033[K")
    print(bench.format_table(report))
    if args.json:
        bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.csv:
        bench.write_csv(report, args.csv)
        print(f"wrote {args.csv}")
    return 0


def _shape(text: str) -> Tuple[int, int, int]:
    parts = text.lower().split("x")
    try:
        m, n, k = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MxNxK (e.g. 4096x4095x768)") from None
    if min(m, n, k) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: dimensions must be >= 1")
    return m, n, k


def _gemm_dtypes(text: str) -> List[str]:
    from ..gemm import ALIGNMENT

    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in ALIGNMENT]
    if unknown or not dtypes:
        raise argparse.ArgumentTypeError(f"unknown dtype {', '.join(unknown) or text!r}; "
                                         f"choose from {', '.join(sorted(ALIGNMENT))}")
    return dtypes


def _precision(text: str) -> str:
    from .._precision import normalize_precision

    try:
        return normalize_precision(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("fastamp: ")) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastamp`` console script."""
    parser = argparse.ArgumentParser(prog="fastamp", description="fused mixed-precision training kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="how fastamp was built: kernels, CUDA archs, fallbacks")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    check = sub.add_parser("check", help="check fastamp's kernels and scaler against PyTorch on this machine")
    check.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    check.add_argument("--json", default=None, help="write the results here")
    check.set_defaults(func=_check)
    build = sub.add_parser("build", help="compile the kernels into the cache ahead of time (Docker images, clusters)")
    build.add_argument("--cuda-arch", default=None,
                       help="archs to compile for, e.g. '8.0;9.0' (default: TORCH_CUDA_ARCH_LIST, else the visible GPUs)")
    build.add_argument("--cpu-only", action="store_true", help="compile the CPU kernels only")
    build.add_argument("--block-shape", default=None,
                       help="CUDA block-shape variant THREADSxMIN_BLOCKS, e.g. 512x1 (default: FASTAMP_CUDA_BLOCK_SHAPE, "
                            "else the built-in 256x3); loaded when FASTAMP_CUDA_BLOCK_SHAPE is set")
    build.add_argument("--force", action="store_true", help="compile even if the cache holds this build")
    build.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    build.set_defaults(func=_build_kernels)
    demo = sub.add_parser("demo", help="train the test transformer with stock AMP and with fastamp, side by side")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--precision", default=None, type=_precision,
                      help="fp32, fp16 or bf16 (or 32-true, 16-mixed, bf16-mixed); default fp16 on GPU, bf16 on CPU")
    demo.add_argument("--steps", type=_positive, default=60, help="optimizer steps per run (default 60)")
    demo.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="model size")
    demo.add_argument("--optimizer", default="fused", choices=["fused", "foreach"],
                      help="AdamW implementation, the same for both runs (default fused)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="fastamp-demo", help="directory for results.json and dashboard.png")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--inject-at", type=int, default=-1, metavar="STEP",
                      help="plant one bad gradient (nan in bf16/fp32, inf in fp16) at this step in both runs "
                           "(default: a third of the way in)")
    demo.add_argument("--no-inject", action="store_true", help="train without the planted gradient")
    demo.add_argument("--spike-at", type=int, default=-1, metavar="STEP",
                      help="plant a finite x1000 gradient spike at this step in both runs; fastamp's SpikeGuard "
                           "skips it (default: two thirds of the way in, with 30 steps or more)")
    demo.add_argument("--no-spike", action="store_true", help="train without the planted spike")
    demo.set_defaults(func=_demo)
    from .bench import DTYPES, OPS, WORKLOADS

    bench = sub.add_parser("bench", help="time fastamp's fused ops against stock PyTorch AMP on this machine")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                       help="repeatable; default: all that run on the device")
    bench.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default: all")
    bench.add_argument("--op", action="append", choices=list(OPS), help="repeatable; default: all")
    bench.add_argument("--repeats", type=_positive, default=None, help="timed repeats per case (default by size)")
    bench.add_argument("--json", default=None, help="write the full results (with raw times) here")
    bench.add_argument("--csv", default=None, help="write one row per case here")
    bench.set_defaults(func=_bench)
    gemm = sub.add_parser("gemm", help="GEMM TFLOP/s for original vs Tensor-Core-aligned shapes")
    gemm.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    gemm.add_argument("--dtype", "--dtypes", action="append", type=_gemm_dtypes,
                      help="fp32, tf32, fp16, bf16, fp8; repeatable or comma-separated (default: all the device supports)")
    gemm.add_argument("--shape", action="append", type=_shape,
                      help="MxNxK, repeatable (default: LM-head and off-by-one shapes; smaller ones on CPU)")
    gemm.add_argument("--full", action="store_true", help="on CPU too, the full-size default shapes (minutes)")
    gemm.add_argument("--repeats", type=_positive, default=None)
    gemm.add_argument("--json", default=None, help="write the results here")
    gemm.add_argument("--plot", default=None, help="write a bar chart PNG here")
    gemm.set_defaults(func=_gemm)
    analyze = sub.add_parser("analyze", help="precision analysis of the built-in transformer after a few steps")
    analyze.add_argument("--model", default="tiny", choices=["tiny", "small", "base"])
    analyze.add_argument("--steps", type=_positive, default=5)
    analyze.add_argument("--json", default=None)
    analyze.add_argument("--plot", default=None, help="write a gradient histogram PNG here")
    analyze.set_defaults(func=_analyze)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # what the arguments ask for cannot be done here (e.g. fp8 GEMMs on this device)
        sub.choices[args.command].error(str(e))

