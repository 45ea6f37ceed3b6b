"""fastamp.cli.bench and ``fastamp bench``: the runner's bookkeeping (not the speed), the result files and the
docs' benchmarks page results block, which must be the rendering of the committed results."""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os

import pytest
import torch

from fastamp.cli import bench, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_summarize():
    spec = importlib.util.spec_from_file_location("summarize", os.path.join(ROOT, "benchmarks", "summarize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workload_shapes():
    assert sum(torch.Size(s).numel() for s in bench.gpt2_small_shapes()) == 124_439_808
    assert len(bench.gpt2_small_shapes()) == 148
    assert 1.3e9 < sum(torch.Size(s).numel() for s in bench.gpt_1_3b_shapes()) < 1.35e9
    assert bench.WORKLOADS["gpt-1.3B"].gpu_only and not bench.WORKLOADS["gpt2-124M"].gpu_only


def test_every_group_has_a_stock_baseline_and_a_fastamp_case():
    for op in bench.OPS:
        cases = [c for c in bench.CASES if c.op == op]
        assert sum(c.baseline for c in cases) == 1, op
        assert any(c.role == "fastamp" for c in cases), op
        assert all(c.role == "stock" for c in cases if c.baseline), op


def test_cases_compute_what_they_claim():
    # fastamp's clipped step leaves the same grads as the stock one (so the timings compare like with like).
    a = bench.BenchState("2000x4K", torch.float32, "cpu")
    by_impl = {c.impl: c for c in bench.CASES}
    by_impl["stock unscale_ + clip_grad_norm_(foreach)"].fn(a)
    stock = [g.clone() for g in a.grads]
    a.restore()
    by_impl["fastamp grad_norm + clip_coef + scale_"].fn(a)
    for x, y in zip(a.grads, stock):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
    a.restore()
    assert all(torch.equal(g, p) for g, p in zip(a.grads, a.pristine))


def test_run_bench_rows_and_speedups():
    report = bench.run_bench("cpu", workloads=["2000x4K"], dtypes=["fp32", "bf16"],
                             ops_=["grad_norm", "clipped-step", "optimizer-step"], repeats=2, warmup=0)
    env = report["environment"]
    for key in ["device_name", "cpu_model", "threads", "torch", "cuda", "fastamp", "git_commit"]:
        assert key in env
    rows = report["results"]
    assert {r["dtype"] for r in rows if r["op"] == "optimizer-step"} == {"fp32"}  # stock refuses low-precision
    for r in rows:
        assert r["repeats"] == 2 and len(r["times_s"]) == 2 and r["p20_s"] <= r["median_s"] <= r["p80_s"]
        if r["role"] == "reference":
            assert r["speedup_vs_stock"] is None
        else:
            base = next(b for b in rows if b["baseline"] and (b["op"], b["dtype"]) == (r["op"], r["dtype"]))
            assert r["speedup_vs_stock"] == pytest.approx(base["median_s"] / r["median_s"])
        if r["bytes"]:
            assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
    norm = next(r for r in rows if r["impl"] == "fastamp grad_norm" and r["dtype"] == "fp32")
    assert norm["bytes"] == 2000 * 4096 * 4
    table = bench.format_table(report)
    assert "fastamp grad_norm" in table and "vs stock" in table


def test_run_bench_refuses_unknown_or_impossible_choices():
    with pytest.raises(ValueError, match="unknown workload"):
        bench.run_bench("cpu", workloads=["gpt-5"])
    with pytest.raises(ValueError, match="CUDA only"):
        bench.run_bench("cpu", workloads=["gpt-1.3B"])
    with pytest.raises(ValueError, match="unknown op"):
        bench.run_bench("cpu", workloads=["2000x4K"], ops_=["transpose"])


def test_cli_bench_writes_json_and_csv(tmp_path, capsys):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    assert main(["bench", "--workload", "2000x4K", "--dtype", "fp16", "--op", "unscale_check_", "--repeats", "2",
                 "--json", str(out_json), "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr()
    assert "fastamp unscale_check_" in printed.out and "[1-4/4]" in printed.err  # progress on stderr
    report = json.loads(out_json.read_text())
    assert len(report["results"]) == 4
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == [r["impl"] for r in report["results"]]


def test_summarize_renders_both_formats(tmp_path):
    summarize = load_summarize()
    report = bench.run_bench("cpu", workloads=["2000x4K"], dtypes=["fp32"], ops_=["grad_norm"], repeats=2, warmup=0)
    path = tmp_path / "fastamp.json"
    bench.write_json(report, str(path))
    text = summarize.render([str(path)])
    assert "fastamp grad_norm" in text and "% copy bw" in text
    matrix = summarize.render_speedup_matrix(report)
    assert "grad_norm: fastamp grad_norm" in matrix and "2000x4K fp32" in matrix
    pytest_json = {
        "machine_info": {"cpu": {"brand_raw": "X"}}, "commit_info": {"id": "abc"},
        "benchmarks": [
            {"group": "g", "name": "a", "stats": {"data": [2.0, 2.0]},
             "extra_info": {"baseline": True, "role": "stock", "impl": "stock", "bytes": 4e9}},
            {"group": "g", "name": "b", "stats": {"data": [1.0, 1.0]},
             "extra_info": {"role": "fastamp", "impl": "fast", "bytes": 4e9}},
        ],
    }
    other = tmp_path / "pb.json"
    other.write_text(json.dumps(pytest_json))
    text = summarize.render([str(other)])
    assert "| g | fast | 1000.00 |" in text and "2.00x" in text


def test_the_benchmarks_page_block_is_the_rendering_of_the_committed_results():
    summarize = load_summarize()
    paths = sorted(glob.glob(os.path.join("benchmarks", "results", "fastamp-bench-*.json"), root_dir=ROOT))
    for kind in ("guard", "hf-trainer", "mesh-clip", "health", "compiled-step"):
        paths += sorted(glob.glob(os.path.join("benchmarks", "results", f"{kind}-*.json"), root_dir=ROOT))
    assert paths, "no committed fastamp bench results"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        expected = summarize.render_readme_block(paths)
    finally:
        os.chdir(cwd)
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        readme = f.read()
    block = readme[readme.index(summarize.BEGIN) + len(summarize.BEGIN) : readme.index(summarize.END)]
    assert block.strip() == expected.strip(), "run: python benchmarks/summarize.py --readme docs/benchmarks.md " + " ".join(paths)
