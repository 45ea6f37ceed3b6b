"""Renders pytest-benchmark JSON files as a Markdown table: median, p20-p80, GB/s and speedup of each
case over the stock (or reference) case of its group. Used for the README's performance table."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import List


def quantile(values: List[float], q: float) -> float:
    values = sorted(values)
    index = q * (len(values) - 1)
    low = int(index)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (index - low)


def render(paths: List[str]) -> str:
    lines = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = data.get("machine_info", {})
        lines.append(f"**{path}** — {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
                     f"commit {data.get('commit_info', {}).get('id', '?')[:10]}")
        lines.append("")
        lines.append("| group | case | median ms | p20–p80 ms | GB/s | vs stock |")
        lines.append("|---|---|---:|---:|---:|---:|")
        groups = {}
        for bench in data["benchmarks"]:
            groups.setdefault(bench["group"], []).append(bench)
        for group, benches in groups.items():
            medians = {b["name"]: statistics.median(b["stats"]["data"]) for b in benches}
            baseline = next((b for b in benches if "stock" in b["name"]), None)
            for b in benches:
                data_points = b["stats"]["data"]
                median = medians[b["name"]]
                gbps = b["extra_info"].get("bytes", 0) / median / 1e9
                ratio = medians[baseline["name"]] / median if baseline else float("nan")
                lines.append(
                    f"| {group} | {b['name'].split('[')[-1].rstrip(']')} | {median * 1e3:.2f} | "
                    f"{quantile(data_points, 0.2) * 1e3:.2f}–{quantile(data_points, 0.8) * 1e3:.2f} | {gbps:.1f} | "
                    f"{ratio:.2f}x |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", nargs="+")
    args = parser.parse_args(argv)
    print(render(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
