"""The ``fastamp`` command: ``fastamp info``, ``fastamp demo``, ``fastamp bench`` (later: gemm, analyze)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    import fastamp

    info = fastamp.build_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    print("fastamp build information")
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(device=args.device, precision=args.precision, steps=args.steps, size=args.size, out=args.out,
             optimizer=args.optimizer, seed=args.seed, progress=not args.no_progress)
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


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastamp`` console script."""
    parser = argparse.ArgumentParser(prog="fastamp", description="fused mixed-precision training kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="how fastamp was built: kernels, CUDA archs, fallbacks")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    demo = sub.add_parser("demo", help="train the test transformer with stock AMP and with fastamp, side by side")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--precision", default=None,
                      help="fp32, fp16 or bf16 (or 32-true, 16-mixed, bf16-mixed); default fp16 on GPU, bf16 on CPU")
    demo.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    demo.add_argument("--size", default="small", choices=["tiny", "small", "base"], help="model size")
    demo.add_argument("--optimizer", default="fused", choices=["fused", "foreach"],
                      help="AdamW implementation, the same for both runs (default fused)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="fastamp-demo", help="directory for results.json and dashboard.png")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    from .bench import DTYPES, OPS, WORKLOADS

    bench = sub.add_parser("bench", help="time fastamp's fused ops against stock PyTorch AMP on this machine")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                       help="repeatable; default: all that run on the device")
    bench.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default: all")
    bench.add_argument("--op", action="append", choices=list(OPS), help="repeatable; default: all")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default by size)")
    bench.add_argument("--json", default=None, help="write the full results (with raw times) here")
    bench.add_argument("--csv", default=None, help="write one row per case here")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
