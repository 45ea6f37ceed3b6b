"""fastamp's clip vs stock's (``ShardedGradScaler.unscale_`` + ``torch.nn.utils.clip_grad_norm_``) on
the DeviceMesh layouts where the difference is the number of collectives: FSDP x TP (2 x world/2,
LayerNorms as Replicate DTensors so that stock runs; and as plain modules, where stock raises) and HSDP,
on 4 and 8 gloo ranks (CPU), launched by torchrun. Both run on the same gradients, interleaved (the order
alternates each repeat); collectives are counted once per method from the backend's profiler events.

    python benchmarks/mesh_clip.py --out benchmarks/results/mesh-clip-cpu-gloo.json
    python benchmarks/summarize.py benchmarks/results/mesh-clip-cpu-gloo.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

from report import write_report

LAYOUTS = ["fsdp_tp", "fsdp_tp_plain_norms", "hsdp"]


def run(world: int, repeats: int) -> List[Dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--rdzv-backend",
                        "c10d", "--rdzv-endpoint", "127.0.0.1:0", "-m", "fastamp.testing.mesh_layouts", "--bench", *LAYOUTS,
                        "--repeats", str(repeats), "--out", out], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(os.path.join(out, f"bench-world{world}.json")) as f:
            return json.load(f)["results"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/mesh-clip-cpu-gloo.json")
    args = parser.parse_args()
    entries = []
    for world in args.worlds:
        for result in run(world, args.repeats):
            group = f"mesh-clip {result['layout']} {world} ranks"
            for method in ("fastamp", "stock"):
                if f"{method}_times_s" not in result:
                    continue
                entries.append({"group": group, "name": method, "stats": {"data": result[f"{method}_times_s"]},
                                "extra_info": {"collectives": result[f"{method}_collectives"], "world": world,
                                               "layout": result["layout"], "stock": result["stock"]}})
            fastamp_ms, stock_ms = result["fastamp_median_ms"], result.get("stock_median_ms")
            ratio = f"{stock_ms / fastamp_ms:.2f}x" if stock_ms else result["stock"]
            print(f"{group}: fastamp {fastamp_ms:.2f} ms ({result['fastamp_collectives']} collective), stock "
                  f"{'%.2f ms' % stock_ms if stock_ms else '-'} ({result.get('stock_collectives', '-')}): {ratio}")
    write_report(args.out, "cpu", entries)


if __name__ == "__main__":
    main()
