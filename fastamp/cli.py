"""The ``fastamp`` command: ``fastamp info`` (later: demo, bench, gemm, analyze)."""

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


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastamp`` console script."""
    parser = argparse.ArgumentParser(prog="fastamp", description="fused mixed-precision training kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="how fastamp was built: kernels, CUDA archs, fallbacks")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
