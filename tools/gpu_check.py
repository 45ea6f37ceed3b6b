#!/usr/bin/env python3
"""``make gpu-check OUT=dir``: the whole GPU verification of fastamp in one command.

For a machine with an NVIDIA GPU and torch already installed, no internet: no venv, no downloads;
it uses the interpreter that runs it and its torch as they are. Phases, each with a time budget, all
logs and results written into OUT with summary.json and summary.md:

  build      compile the kernels for the visible GPU's arch only (fastamp build, into a JIT cache)
  check      fastamp check --device cuda
  pytest     pytest tests/cuda tests/ops tests/test_library.py (the CUDA cases)
  pytest-compiled-step  tests/cuda/test_compiled_step_cuda.py (compiled, reduce-overhead, torch.cuda.graph)
  emu-vs-cuda  the CUDA emulator's cases (tests/emu) on the emulated and on the real kernels, side by side
  memcheck   compute-sanitizer --tool memcheck over a reduced CUDA workload (tools/sanitizer_workload.py)
  racecheck  compute-sanitizer --tool racecheck over the same workload
  bench      fastamp bench --device cuda --json
  compiled-step  the optimizer-side step eager / compiled / CUDA graphs vs stock (benchmarks/compiled_step.py)
  gemm       fastamp gemm --device cuda --json --plot
  demo       fastamp demo --device cuda --precision fp16
  bench-misaligned   64M fp16/fp32 at element offset 1 vs 0 (expected within ~1.2x)
  blocks-*   block-shape variants of the CUDA kernels, each compiled and timed (the default is 256x3)

``--only PHASE ...`` runs a subset (build always runs), to split the run over several calls.
The whole run keeps within --budget seconds (default 480): a phase gets the smaller of its budget and
what is left, and phases that no longer fit are skipped, saying so. Without a GPU it builds, says
there is no GPU and exits 2. Exit code 1 if any phase failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BLOCK_SHAPE_VARIANTS = ("512x1", "512x2", "128x6")


@dataclass
class Phase:
    name: str
    command: List[str]
    budget_s: int
    needs_gpu: bool = True
    env: Dict[str, str] = field(default_factory=dict)
    status: str = "pending"  # PASS, FAIL, TIMEOUT, SKIP
    returncode: Optional[int] = None
    seconds: float = 0.0
    log: str = ""
    note: str = ""


@dataclass
class Summary:
    started: str
    budget_s: int
    gpu: Optional[str]
    python: str
    phases: List[Phase] = field(default_factory=list)
    build_info: Dict[str, object] = field(default_factory=dict)


def _gpu_name(python: str, env: Dict[str, str]) -> Optional[str]:
    code = ("import torch; print(torch.cuda.get_device_name(0) + ' (sm_%d%d)' % torch.cuda.get_device_capability(0) "
            "if torch.cuda.is_available() else '')")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"fastamp gpu-check: {python} cannot import torch:\n{out.stderr[-2000:]}\n"
                         "set PYTHON= to an interpreter that has torch")
    name = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return name or None


def _phases(python: str, out: Path) -> List[Phase]:
    fastamp = [python, "-m", "fastamp.cli"]
    sanitizer = shutil.which("compute-sanitizer") or "compute-sanitizer"
    workload = [python, str(ROOT / "tools" / "sanitizer_workload.py")]
    return [
        Phase("build", fastamp + ["build"], 300, needs_gpu=False),
        Phase("check", fastamp + ["check", "--device", "cuda", "--json", str(out / "check.json")], 90),
        # tests/cuda, and the device-generic op tests, whose CUDA cases exist only where a GPU is.
        Phase("pytest", [python, "-m", "pytest", "tests/cuda", "tests/ops", "tests/test_library.py", "-q", "-ra",
                         "-p", "no:cacheprovider", "--ignore=tests/cuda/test_compiled_step_cuda.py",
                         f"--junitxml={out / 'pytest-cuda.xml'}"], 180),
        # The optimizer-side step compiled (inductor, reduce-overhead) and captured in CUDA graphs: its own
        # phase, so that compile times cannot starve the other CUDA tests.
        Phase("pytest-compiled-step", [python, "-m", "pytest", "tests/cuda/test_compiled_step_cuda.py", "-q", "-ra",
                                       "-p", "no:cacheprovider", f"--junitxml={out / 'pytest-compiled-step.xml'}"], 150),
        # The emulator's cases on the real kernels too (its `target` fixture runs each on both): what the
        # emulator says of the kernels is held against the GPU on the same inputs and oracle.
        Phase("emu-vs-cuda", [python, "-m", "pytest", "tests/emu", "-m", "not slow", "-q", "-ra", "-p", "no:cacheprovider",
                               f"--junitxml={out / 'pytest-emu-vs-cuda.xml'}"], 120),
        Phase("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "1"] + workload, 75),
        Phase("racecheck", [sanitizer, "--tool", "racecheck", "--error-exitcode", "1"] + workload, 75),
        Phase("bench", fastamp + ["bench", "--device", "cuda", "--workload", "gpt2-124M", "--workload", "gpt-1.3B",
                                  "--workload", "2000x4K", "--json", str(out / "fastamp-bench-cuda.json"),
                                  "--csv", str(out / "fastamp-bench-cuda.csv")], 120),
        # The optimizer-side step eager vs compiled vs CUDA graphs (reduce-overhead, torch.cuda.graph), vs stock.
        Phase("compiled-step", [python, str(ROOT / "benchmarks" / "compiled_step.py"), "--device", "cuda", "--rounds", "30",
                                "--out", str(out / "compiled-step-cuda.json")], 120),
        Phase("bench-misaligned", fastamp + ["bench", "--device", "cuda", "--workload", "64M-aligned", "--workload",
                                             "64M-offset1", "--json", str(out / "fastamp-bench-cuda-misaligned.json")], 60),
        Phase("gemm", fastamp + ["gemm", "--device", "cuda", "--json", str(out / "gemm-cuda.json"),
                                 "--plot", str(out / "gemm-cuda.png")], 60),
        Phase("demo", fastamp + ["demo", "--device", "cuda", "--precision", "fp16", "--no-progress",
                                 "--out", str(out / "demo")], 60),
        Phase("guard-overhead", [python, str(ROOT / "benchmarks" / "guard_overhead.py"), "--device", "cuda",
                                 "--rounds", "40", "--out", str(out / "guard-cuda.json")], 60),
    ] + [
        # Block-shape variants of the CUDA kernels (the default is 256x3): each compiles its own build
        # into the cache, then times the norm and the clipped step; compare with the bench phase.
        Phase(f"blocks-{shape}", fastamp + ["bench", "--device", "cuda", "--workload", "gpt2-124M", "--workload",
                                            "64M-offset1", "--op", "grad_norm", "--op", "clipped-step", "--dtype", "fp16",
                                            "--dtype", "fp32", "--json", str(out / f"fastamp-bench-cuda-blocks-{shape}.json")],
              100, env={"FASTAMP_CUDA_BLOCK_SHAPE": shape})
        for shape in BLOCK_SHAPE_VARIANTS
    ]


def _run(phase: Phase, env: Dict[str, str], out: Path, timeout: float) -> None:
    log_path = out / f"{phase.name}.log"
    phase.log = log_path.name
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(phase.command) + "\n")
        log.flush()
        try:
            process = subprocess.Popen(phase.command, stdout=log, stderr=subprocess.STDOUT, env={**env, **phase.env}, cwd=ROOT,
                                       start_new_session=True)
        except OSError as exc:
            phase.status, phase.note = "FAIL", f"could not start: {exc}"
            return
        try:
            phase.returncode = process.wait(timeout=timeout)
            phase.status = "PASS" if phase.returncode == 0 else "FAIL"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            phase.status, phase.note = "TIMEOUT", f"stopped after {timeout:.0f} s"
    phase.seconds = round(time.perf_counter() - started, 1)
    with open(log_path) as log:
        tail = log.read().strip().splitlines()[-1:] or [""]
    if not phase.note:
        phase.note = tail[0][:200]


def _write_summary(summary: Summary, out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1, default=str))
    lines = [f"# fastamp gpu-check, {summary.started}", "",
             f"GPU: {summary.gpu or 'none'}; python: {summary.python}; budget {summary.budget_s} s; kernels: "
             f"{summary.build_info.get('kernels')} ({summary.build_info.get('extension_path')})", "",
             "| phase | status | seconds | budget | log | note |", "|---|---|---|---|---|---|"]
    for p in summary.phases:
        lines.append(f"| {p.name} | {p.status} | {p.seconds} | {p.budget_s} | {p.log} | {p.note.replace('|', '/')} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check-results", help="folder for logs, JSON, PNG and the summary")
    parser.add_argument("--budget", type=int, default=480, help="seconds for the whole run (default 480)")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose torch to use")
    parser.add_argument("--only", nargs="+", metavar="PHASE",
                        help="run only these phases (build always runs): split a run over several calls")
    args = parser.parse_args(argv)
    names = [p.name for p in _phases(args.python, Path(args.out))]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; the phases are: {', '.join(names)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # Outside OUT: OUT travels back from remote machines, the compiled module need not.
    env.setdefault("FASTAMP_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastamp-gpu-check-cache"))
    env.update(FASTAMP_EXPECT_EXTENSION="1", FASTAMP_EXPECT_CUDA_KERNELS="1", PYTHONUNBUFFERED="1")
    gpu = _gpu_name(args.python, env)
    summary = Summary(time.strftime("%Y-%m-%d %H:%M:%S"), args.budget, gpu, args.python)
    print(f"fastamp gpu-check: GPU {gpu or 'none'}, results in {out}", flush=True)
    for phase in _phases(args.python, out):
        summary.phases.append(phase)
        left = deadline - time.perf_counter()
        if args.only and phase.name != "build" and phase.name not in args.only:
            phase.status, phase.note = "SKIP", "not asked for (--only)"
        elif phase.needs_gpu and gpu is None:
            phase.status, phase.note = "SKIP", "no GPU"
        elif left < 15:
            phase.status, phase.note = "SKIP", f"no time left ({left:.0f} s of the {args.budget} s budget)"
        else:
            _run(phase, env, out, min(phase.budget_s, left))
        print(f"  {phase.name:10} {phase.status:7} {phase.seconds:6.1f} s  {phase.note}", flush=True)
        _write_summary(summary, out)
        if phase.name == "build" and phase.status != "PASS":
            break
    info = subprocess.run([args.python, "-m", "fastamp.cli", "info", "--json"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    try:
        summary.build_info = {k: v for k, v in json.loads(info.stdout).items() if k != "hardware"}
    except json.JSONDecodeError:
        summary.build_info = {"error": info.stderr[-2000:]}
    _write_summary(summary, out)
    print(f"wrote {out / 'summary.md'}")
    if gpu is None:
        print("fastamp gpu-check: no GPU visible here; built the CPU kernels only", flush=True)
        return 2
    return 1 if any(p.status in ("FAIL", "TIMEOUT") for p in summary.phases) else 0


if __name__ == "__main__":
    sys.exit(main())
