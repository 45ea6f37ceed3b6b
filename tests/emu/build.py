"""Builds fastamp's CUDA kernels (csrc/cuda) for the CUDA-semantics emulator, as a shared library.

The .cu sources are copied with each ``kernel<<<grid, block, shmem, stream>>>(args)`` rewritten to an
``emu::launch`` call (nothing else changes) and compiled as C++ by g++, with the emulator runtime
force-included, stand-ins for the CUDA runtime header and c10's launch check, and the real c10
``Half.h``/``BFloat16.h`` from the torch that runs the tests. Builds are cached by the hash of every
input and flag. ``python tests/emu/build.py [--variant NAME] [--sanitize asan|ubsan|tsan]`` prints the
library's path (what `make emu-sanitize` and tools/emu_mutation.py use).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["VARIANTS", "Variant", "build", "rewrite_launches"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNTIME = HERE / "runtime"


@dataclass(frozen=True)
class Variant:
    """One emulated build: the block shape and the kernel-parameter layout (as `make gpu-check` builds)."""

    name: str
    defines: Dict[str, str] = field(default_factory=dict)


def _block_shape(shape: str) -> Variant:
    threads, min_blocks = shape.split("x")
    return Variant(f"blocks-{shape}", {"FASTAMP_BLOCK_THREADS": threads, "FASTAMP_MIN_BLOCKS_PER_SM": min_blocks})


# The default build (256 threads x 3 blocks per SM, the classic 4 KB parameter layout), the 32 KB
# layout, the block shapes `make gpu-check` times (128x6, 512x1; 512x2 runs as 512x1 does here: the
# blocks-per-SM bound only caps registers), and the smallest and largest blocks the harness allows.
VARIANTS = {
    "default": Variant("default"),
    "large-params": Variant("large-params", {"FASTAMP_LARGE_KERNEL_PARAMS": "1", "EMU_MAX_PARAM_BYTES": "32764"}),
    **{f"blocks-{s}": _block_shape(s) for s in ("128x6", "512x1", "32x1", "1024x1")},
}

SANITIZERS = {
    "asan": ["-fsanitize=address", "-fno-omit-frame-pointer"],
    "ubsan": ["-fsanitize=undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-fsanitize=thread"],
}

_LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(?P<config>.*?)>>>\s*\((?P<args>.*?)\);", re.S)


def rewrite_launches(source: str) -> str:
    """``k<<<cfg>>>(args);`` -> ``emu::launch("k", __FILE__, __LINE__, cfg..., param bytes, [=] { k(args); });``"""

    def launch(m: re.Match) -> str:
        kernel, config, args = m["kernel"], " ".join(m["config"].split()), " ".join(m["args"].split())
        name = kernel.split("<")[0]
        return (f'::emu::launch("{name}", __FILE__, __LINE__, ::emu::LaunchConfig({config}).grid, '
                f"::emu::LaunchConfig({config}).block, ::emu::LaunchConfig({config}).shared_bytes, "
                f"::emu::param_bytes({args}), [=]() {{ {kernel}({args}); }});")

    out, count = _LAUNCH.subn(launch, source)
    if "<<<" in out:
        raise ValueError("a kernel launch the emulator's rewrite does not understand is left")
    return out


def _torch_dirs() -> tuple:
    import torch

    base = Path(torch.__file__).resolve().parent
    return str(base / "include"), str(base / "lib")


def _copy_sources(src: Path, dst: Path) -> List[Path]:
    """csrc/ into dst/csrc/, launches rewritten; returns the .cu files to compile."""
    units = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or rel.parts[0] in ("cpu", "tests"):
            continue
        target = dst / "csrc" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text()
        if path.suffix in (".cu", ".cuh"):
            text = rewrite_launches(text)
        target.write_text(text)
        if path.suffix == ".cu":
            units.append(target)
    return units


def _flags(variant: Variant, sanitize: Optional[str], torch_include: str) -> List[str]:
    flags = ["-std=c++17", "-g", "-O1" if sanitize else "-O2", "-fPIC", "-pthread", "-fno-fast-math",
             "-Wno-unknown-pragmas", "-include", str(RUNTIME / "emu_runtime.h"),
             f"-I{RUNTIME / 'include'}", f"-I{RUNTIME}", f"-I{torch_include}"]
    flags += [f"-D{k}={v}" for k, v in sorted(variant.defines.items())]
    flags += SANITIZERS.get(sanitize or "", [])
    return flags


def build(variant: str = "default", sanitize: Optional[str] = None, csrc: Optional[Path] = None,
          out_root: Optional[Path] = None, extra_sources: Sequence[Path] = ()) -> Path:
    """Builds (or finds cached) the emulated kernels; returns the shared library's path. ``extra_sources``:
    more .cu files compiled the same way (the runtime's own tests' faulty kernels)."""
    extra_sources = [Path(p).resolve() for p in extra_sources]
    # FASTAMP_EMU_CSRC: another csrc/ tree (tools/emu_mutation.py's mutants), for every build of the run.
    csrc = Path(csrc or os.environ.get("FASTAMP_EMU_CSRC") or ROOT / "csrc")
    v = VARIANTS[variant]
    torch_include, torch_lib = _torch_dirs()
    flags = _flags(v, sanitize, torch_include)
    digest = hashlib.sha256()
    for base in (csrc, RUNTIME):
        for path in sorted(p for p in base.rglob("*") if p.is_file() and "tests" not in p.relative_to(base).parts[:1]):
            digest.update(str(path.relative_to(base)).encode())
            digest.update(path.read_bytes())
    for path in extra_sources:
        digest.update(path.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(Path(__file__).read_bytes())
    out_root = Path(out_root or os.environ.get("FASTAMP_EMU_BUILD_DIR") or ROOT / "build" / "emu")
    tag = f"{variant}-{sanitize or 'plain'}{'-extra' if extra_sources else ''}-{digest.hexdigest()[:12]}"
    out = out_root / tag
    library = out / "libfastamp_emu.so"
    if library.exists():
        return library
    work = out_root / (tag + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    units = _copy_sources(csrc, work)
    sources = [*units, RUNTIME / "emu_runtime.cpp", RUNTIME / "entry.cpp"]
    for path in extra_sources:
        target = work / "extra" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(rewrite_launches(path.read_text()))
        sources.append(target)

    def compile_one(source: Path) -> Path:
        obj = work / "obj" / (source.name + ".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["g++", *flags, f"-I{work}", "-x", "c++", "-c", str(source), "-o", str(obj)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"emulated build of {source.name} failed:\n{' '.join(cmd)}\n{result.stderr}")
        return obj

    with ThreadPoolExecutor(max_workers=int(os.environ.get("MAX_JOBS", "2"))) as pool:
        objects = list(pool.map(compile_one, sources))
    link = ["g++", *SANITIZERS.get(sanitize or "", []), "-shared", "-pthread", "-o", str(work / library.name),
            *map(str, objects), f"-L{torch_lib}", "-lc10", f"-Wl,-rpath,{torch_lib}"]
    result = subprocess.run(link, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"emulated link failed:\n{' '.join(link)}\n{result.stderr}")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return library


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    parser.add_argument("--sanitize", choices=sorted(SANITIZERS))
    parser.add_argument("--csrc", type=Path, help="the csrc/ tree to build (default: the repository's)")
    parser.add_argument("--out", type=Path, help="build root (default: build/emu)")
    args = parser.parse_args(argv)
    print(build(args.variant, args.sanitize, args.csrc, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
