#!/usr/bin/env python3
"""``make emu-mutation``: does the CUDA emulator suite (tests/emu) catch real kernel bugs?

Plants one bug of each class in a copy of csrc/, one at a time, and runs against the mutant the
emulator's fast suite (stopping at the first failure) and, where the suite passes, the sanitized case
set (tests/emu/sanitized_cases.py under ASan, UBSan, TSan). A mutant the suite and every sanitizer
let through is a hole in the tests: the exit status is 1. Writes a table (--out) of each mutation and
what caught it. The unmutated tree must pass all of it (`make emu-test`, `make emu-sanitize`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """A bug to plant: in `path` (under csrc/), replace `old` (which must occur, `count` times) with `new`."""

    name: str
    path: str
    old: str
    new: str
    count: int = 1
    also: Tuple[Tuple[str, str, str], ...] = ()  # further (path, old, new) edits of the same bug, every occurrence


HARNESS = "cuda/multi_tensor_apply.cuh"
NORM = "cuda/grad_norm.cu"
BLOCK_SUM_SHUFFLE = ("  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);\n"
                     "  if (lane == 0) warp_sums[warp] = value;")

MUTATIONS: List[Mutation] = [
    Mutation("a skipped tail element", HARNESS, "for_each_peeled<kWrite>(data, head + vectors * V, count, f);",
             "for_each_peeled<kWrite>(data, head + vectors * V, count - 1, f);"),
    Mutation("a wrong ILP stride", HARNESS, "base += static_cast<int64_t>(blockDim.x) * kILP)",
             "base += static_cast<int64_t>(blockDim.x) * (kILP - 1))"),
    Mutation("first_block dropped", HARNESS, "const int64_t block = args.first_block + blockIdx.x;",
             "const int64_t block = blockIdx.x;"),
    Mutation("shuffles under a divergent if", HARNESS, BLOCK_SUM_SHUFFLE,
             BLOCK_SUM_SHUFFLE.replace("  for (int offset", "  if (lane < 16)\n    for (int offset")),
    Mutation("a per-thread early return before a warp op", NORM, "if (warp >= ranges.count) return;",
             "if (warp >= ranges.count || lane >= ranges.num_chunks[warp] + 20) return;"),
    Mutation("a head peeled one element short", HARNESS,
             "(V - misaligned < count ? V - misaligned : count)",
             "(V - misaligned - 1 < count ? V - misaligned - 1 : count)"),
    Mutation("a read one past the end", HARNESS, "for_each_peeled<kWrite>(data, head + vectors * V, count, f);",
             "for_each_peeled<kWrite>(data, head + vectors * V, count + 1, f);"),
    Mutation("a 2048-thread launch", NORM, "constexpr int kFinishThreads = 1024;", "constexpr int kFinishThreads = 2048;"),
    Mutation("32 KB of parameters on a 4 KB build", "cuda/launch.h", "#if FASTAMP_LARGE_KERNEL_PARAMS", "#if 1",
             also=((HARNESS, "#if FASTAMP_LARGE_KERNEL_PARAMS", "#if 1"), (NORM, "#if FASTAMP_LARGE_KERNEL_PARAMS", "#if 1"))),
    Mutation("the second __syncthreads of block_sum removed", HARNESS,
             "    if (lane == 0) warp_sums[0] = value;\n  }\n  __syncthreads();",
             "    if (lane == 0) warp_sums[0] = value;\n  }"),
]

SANITIZER_ENV = {
    "asan": {"ASAN_OPTIONS": "detect_leaks=0:exitcode=23"},
    "ubsan": {"UBSAN_OPTIONS": "halt_on_error=1:exitcode=23"},
    "tsan": {"TSAN_OPTIONS": "halt_on_error=1:exitcode=23", "OMP_NUM_THREADS": "1"},
}


def plant(mutation: Mutation, csrc: Path) -> None:
    """Applies the mutation to the copy of csrc/ at `csrc`; refuses one that no longer matches the source."""
    edits = [(mutation.path, mutation.old, mutation.new, mutation.count)] + [(p, o, n, 0) for p, o, n in mutation.also]
    for path, old, new, count in edits:
        file = csrc / path
        text = file.read_text()
        found = text.count(old)
        if found == 0 or (count and found != count):
            raise SystemExit(f"emu_mutation: '{mutation.name}' does not match {path} ({found} matches): update it")
        file.write_text(text.replace(old, new))


def _suite(env: dict, timeout: float) -> Tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "emu"), "-m", "not slow", "-x", "-q",
           "-p", "no:cacheprovider", "--no-header", "-rfE"]
    try:
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, f"the suite hung past {timeout:.0f} s"
    if result.returncode == 0:
        return False, ""
    if result.returncode < 0:
        return True, f"the test process died of signal {-result.returncode}"
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
    reason = re.findall(r"^E\s+(.*)$", result.stdout, re.M)
    if not failed:
        return True, (result.stdout + result.stderr).strip().splitlines()[-1][:160]
    return True, f"{failed[0].split('tests/emu/')[-1]}: {(reason[0] if reason else '').strip()[:160]}"


def _sanitizer(name: str, env: dict, timeout: float) -> Tuple[bool, str]:
    runtime = subprocess.run(["g++", f"-print-file-name=lib{name}.so"], capture_output=True, text=True).stdout.strip()
    env = {**env, **SANITIZER_ENV[name], "LD_PRELOAD": runtime}
    cmd = [sys.executable, str(ROOT / "tests" / "emu" / "sanitized_cases.py"), "--sanitize", name]
    try:
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, f"{name}: hung past {timeout:.0f} s"
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return False, ""
    line = next((ln for ln in output.splitlines() if re.search(r"ERROR: AddressSanitizer|runtime error:|"
                                                                r"WARNING: ThreadSanitizer|AssertionError|Error", ln)), "")
    return True, f"{name}: {line.strip()[:160]}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table (markdown) here")
    parser.add_argument("--only", action="append", help="run only mutations whose name contains this")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per suite or sanitizer run")
    args = parser.parse_args(argv)
    rows = []
    escaped = 0
    with tempfile.TemporaryDirectory(prefix="fastamp-mutants-") as tmp:
        for mutation in MUTATIONS:
            if args.only and not any(o in mutation.name for o in args.only):
                continue
            csrc = Path(tmp) / re.sub(r"\W+", "-", mutation.name) / "csrc"
            shutil.copytree(ROOT / "csrc", csrc)
            plant(mutation, csrc)
            env = {**os.environ, "FASTAMP_EMU_CSRC": str(csrc), "FASTAMP_EMU_BUILD_DIR": str(Path(tmp) / "build")}
            start = time.time()
            caught, how = _suite(env, args.timeout)
            caught_by = "emulator suite" if caught else ""
            for name in ("asan", "ubsan", "tsan"):
                if caught:
                    break
                caught, how = _sanitizer(name, env, args.timeout)
                caught_by = name if caught else ""
            escaped += not caught
            rows.append((mutation.name, caught_by or "NOT CAUGHT", how, time.time() - start))
            print(f"{mutation.name}: {caught_by or 'NOT CAUGHT'} ({time.time() - start:.0f} s) {how}", flush=True)
    table = ["| planted bug | caught by | first report | seconds |", "|---|---|---|---|"]
    table += [f"| {n} | {c} | {h.replace('|', '/')} | {s:.0f} |" for n, c, h, s in rows]
    text = "\n".join(table) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Mutation check of the CUDA emulator suite (tools/emu_mutation.py)\n\n" + text)
    print(text)
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
