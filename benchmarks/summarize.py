"""Renders benchmark result files as Markdown; the docs' benchmarks page (docs/benchmarks.md) comes from here.

    python benchmarks/summarize.py benchmarks/results/*.json            # print tables
    python benchmarks/summarize.py --readme docs/benchmarks.md benchmarks/results/fastamp-bench-*.json \
        benchmarks/results/guard-*.json benchmarks/results/hf-trainer-*.json \
        benchmarks/results/mesh-clip-*.json benchmarks/results/health-*.json         # update the page

Reads both formats: ``fastamp bench --json`` output ({"environment", "results"}) and pytest-benchmark
JSON. In the page, the block between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is
replaced: for each fastamp-bench file, the full table of the GPT-2-small fp32 workload and a matrix of
fastamp's speedup over stock for every workload and dtype. No number is copied by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any, Dict, List, Sequence

from fastamp.cli.bench import quantile as _quantile

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
DETAIL_WORKLOAD, DETAIL_DTYPE = "gpt2-124M", "fp32"


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def render_fastamp_bench(path: str, report: Dict[str, Any], detail_only: bool = False) -> str:
    env = report["environment"]
    rows = report["results"]
    lines = [
        f"`{path}`: {env['device_name']} ({env['device']}, {env['threads']} threads), torch {env['torch']}, "
        f"fastamp {env['fastamp']}, commit {(env.get('git_commit') or '?')[:10]}, {env.get('date', '')}",
        "",
        "| workload | dtype | op | case | median ms | p20–p80 ms | GB/s | % copy bw | % flat bw | vs stock |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if detail_only and (r["workload"], r["dtype"]) != (DETAIL_WORKLOAD, DETAIL_DTYPE):
            continue
        lines.append(
            f"| {r['workload']} | {r['dtype']} | {r['op']} | {r['impl']} | {r['median_s'] * 1e3:.2f} | "
            f"{r['p20_s'] * 1e3:.2f}–{r['p80_s'] * 1e3:.2f} | {_fmt(r['gbps'], '.1f')} | "
            f"{_fmt(r['pct_copy_bandwidth'], '.0f', '%')} | {_fmt(r.get('pct_flat_bandwidth'), '.0f', '%')} | "
            f"{_fmt(r['speedup_vs_stock'], '.2f', 'x')} |"
        )
    return "\n".join(lines)


def render_speedup_matrix(report: Dict[str, Any]) -> str:
    """fastamp's speedup over the stock baseline, one row per fastamp case, one column per workload/dtype."""
    rows = [r for r in report["results"] if r["role"] == "fastamp"]
    columns = list(dict.fromkeys((r["workload"], r["dtype"]) for r in report["results"]))
    cases = list(dict.fromkeys((r["op"], r["impl"]) for r in rows))
    cell = {(r["op"], r["impl"], r["workload"], r["dtype"]): r["speedup_vs_stock"] for r in rows}
    lines = [
        "| fastamp case (speedup over stock) | " + " | ".join(f"{w} {d}" for w, d in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for op, impl in cases:
        values = [cell.get((op, impl, w, d)) for w, d in columns]
        lines.append(f"| {op}: {impl} | " + " | ".join(_fmt(v, ".2f", "x") for v in values) + " |")
    return "\n".join(lines)


def render_pytest_benchmark(path: str, data: Dict[str, Any]) -> str:
    machine = data.get("machine_info", {})
    lines = [
        f"`{path}` (pytest-benchmark): {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
        f"commit {data.get('commit_info', {}).get('id', '?')[:10]}",
        "",
        "| group | case | median ms | p20–p80 ms | GB/s | vs baseline |",
        "|---|---|---:|---:|---:|---:|",
    ]
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    for group, benches in groups.items():
        medians = {b["name"]: statistics.median(b["stats"]["data"]) for b in benches}
        baseline = next((b for b in benches if b["extra_info"].get("baseline")), None)
        for b in benches:
            times = b["stats"]["data"]
            median = medians[b["name"]]
            moved = b["extra_info"].get("bytes", 0)
            ratio = medians[baseline["name"]] / median if baseline and b["extra_info"].get("role") != "reference" else None
            lines.append(
                f"| {group} | {b['extra_info'].get('impl', b['name'])} | {median * 1e3:.2f} | "
                f"{_quantile(times, 0.2) * 1e3:.2f}–{_quantile(times, 0.8) * 1e3:.2f} | "
                f"{_fmt(moved / median / 1e9 if moved else None, '.1f')} | {_fmt(ratio, '.2f', 'x')} |"
            )
    return "\n".join(lines)


def _load(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def render(paths: Sequence[str]) -> str:
    blocks = []
    for path in paths:
        data = _load(path)
        if "environment" in data:
            blocks.append(render_fastamp_bench(path, data))
        else:
            blocks.append(render_pytest_benchmark(path, data))
    return "\n\n".join(blocks)


def render_readme_block(paths: Sequence[str]) -> str:
    """What the README holds between the markers: for each fastamp-bench result file the GPT-2-small
    detail and the speedup matrix; pytest-benchmark files (the guard benchmark) in full."""
    blocks = []
    for path in paths:
        report = _load(path)
        if "environment" in report:
            blocks.append(render_fastamp_bench(path, report, detail_only=True))
            blocks.append(render_speedup_matrix(report))
        else:
            blocks.append(render_pytest_benchmark(path, report))
    return "\n\n".join(blocks)


def update_readme(readme: str, paths: Sequence[str]) -> None:
    with open(readme) as f:
        text = f.read()
    begin, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    text = text[:begin] + "\n" + render_readme_block(paths) + "\n" + text[end:]
    with open(readme, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    parser.add_argument("--readme", help="replace the results block of this README instead of printing")
    args = parser.parse_args(argv)
    if args.readme:
        update_readme(args.readme, args.json)
    else:
        print(render(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
