"""Builds ``fastamp._C``: ahead of time (``setup.py``) or on first use into a cache (the JIT path).

Both paths take their sources, flags and CUDA archs from here, so an ahead-of-time build and a JIT
build of the same sources are the same module. Like DeepSpeed's op builder, the JIT path compiles
with ``torch.utils.cpp_extension.load`` (ninja) into a per-configuration cache:

    <cache root>/<source hash>-torch<version>-<cpu|cuXY>-<python tag>/<variant>/

where the variant is ``cpu`` or the CUDA archs (``sm_90``). A process compiles under an exclusive
file lock, in a private staging folder that is renamed into place only when complete, so concurrent
cold imports (torchrun ranks) compile once and never load a half-written module. Each module carries
a build record (torch, CUDA and source versions) embedded in its binary; it is read before loading,
and a module built for another torch is never loaded.

This module imports torch only inside functions: ``setup.py`` loads it by file path in build
environments that may have no torch at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "BuildError",
    "CompiledModule",
    "DEFAULT_CUDA_ARCHS",
    "Toolchain",
    "build_record",
    "cache_root",
    "cache_slot",
    "cached_build",
    "compile_into_cache",
    "compiler_macros",
    "cuda_toolchain",
    "cuda_archs_cover",
    "extension_sources",
    "find_cached",
    "find_cuda_home",
    "nvcc_version",
    "parse_arch_list",
    "parse_block_shape",
    "source_dir",
    "source_hash",
    "visible_gpu_archs",
]

DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unused-function"]
# Without -fopenmp at link time at::parallel_for in extension code silently runs on one thread.
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
RECORD_MARKER = b"FASTAMP_BUILD_RECORD{"
# How long a failed compile is remembered, so that processes queued behind it do not repeat it.
FAILED_BUILD_MEMORY_S = 600
_SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh", ".inc")
# torch.utils.cpp_extension's names for arch families (TORCH_CUDA_ARCH_LIST accepts them).
_NAMED_ARCHS = {
    "Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
    "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
    "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
    "Blackwell+Tegra": "10.1", "Blackwell": "10.0;12.0+PTX",
}
_ARCH_RE = re.compile(r"^(\d+)\.(\d+)([a-z]?)(\+PTX)?$")


class BuildError(RuntimeError):
    """Compiling the kernels failed; the message holds the compiler's own output."""


# --------------------------------------------------------------------------------------------------
# Sources and flags (shared by setup.py and the JIT path)
# --------------------------------------------------------------------------------------------------


def source_dir() -> Optional[Path]:
    """The C++/CUDA sources: ``fastamp/_csrc`` in an installed package, ``csrc/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "module.cpp").is_file():
            return candidate
    return None


def extension_sources(root: Path, with_cuda: bool) -> List[Path]:
    """The translation units of ``fastamp._C`` (C++ tests under csrc/tests are not part of it)."""
    sources = sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))
    if with_cuda:
        sources += sorted((root / "cuda").glob("*.cpp")) + sorted((root / "cuda").glob("*.cu"))
    return sources


def source_hash(root: Path) -> str:
    """A digest of every source file and of this file (which holds the flags): the cache key's first part."""
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES and "tests" not in p.relative_to(root).parts)
    for path in files + [Path(__file__).resolve()]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def parse_arch_list(spec: str) -> List[str]:
    """TORCH_CUDA_ARCH_LIST as torch reads it: ``;``/space/comma separated, named families
    (``Hopper``), ``+PTX`` and arch-specific suffixes (``9.0a``, ``10.0a``). Returns normalized
    entries such as ``"9.0a"`` or ``"8.6+PTX"``; raises ValueError naming an entry it cannot read."""
    for name, archs in sorted(_NAMED_ARCHS.items(), key=lambda item: -len(item[0])):
        spec = spec.replace(name, archs)
    archs: List[str] = []
    for entry in re.split(r"[;\s,]+", spec.strip()):
        if not entry:
            continue
        if not _ARCH_RE.match(entry):
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not an arch such as 8.0, 9.0a, 9.0+PTX or Hopper")
        if entry not in archs:
            archs.append(entry)
    return archs


def _arch_number(arch: str) -> Tuple[int, int]:
    match = _ARCH_RE.match(arch)
    if match is None:
        raise ValueError(f"not a CUDA arch: {arch!r}")
    return int(match.group(1)), int(match.group(2))


def cuda_archs_cover(compiled: Sequence[str], needed: Sequence[str]) -> bool:
    """Whether code compiled for ``compiled`` runs on every arch in ``needed``: the same arch, or PTX
    of an older one that the driver can JIT."""
    def covered(need: str) -> bool:
        want = _arch_number(need)
        for arch in compiled:
            have = _arch_number(arch)
            if have == want or (arch.endswith("+PTX") and have <= want):
                return True
        return False

    return all(covered(n) for n in needed)


def _is_toolkit_root(path: str) -> bool:
    has_nvcc = os.path.isfile(os.path.join(path, "bin", "nvcc"))
    has_cudart = any(
        glob.glob(os.path.join(path, sub, "libcudart.so*")) for sub in ("lib64", "lib", "targets/x86_64-linux/lib")
    )
    return has_nvcc and has_cudart


def find_cuda_home() -> Optional[str]:
    """The real CUDA toolkit root (holding bin/nvcc and libcudart), or None.

    torch.utils.cpp_extension guesses from the nvcc on PATH, which may be a wrapper script
    (/usr/local/bin/nvcc -> "/usr/local"), and linking then fails; ask nvcc itself where it lives.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and _is_toolkit_root(path):
            return path
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
            match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if match:
                candidates.append(os.path.normpath(match.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_toolkit_root(path):
            return path
    return None


def nvcc_version(cuda_home: str) -> Tuple[int, int]:
    """(major, minor) of the toolkit's nvcc; (0, 0) if it cannot tell."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


@dataclass(frozen=True)
class Toolchain:
    """What one build compiles for: torch, and CUDA (toolkit root, nvcc version, archs) or CPU only."""

    torch_version: str
    torch_cuda: Optional[str]
    cuda_home: Optional[str] = None
    nvcc: Tuple[int, int] = (0, 0)
    cuda_archs: Tuple[str, ...] = ()
    # "THREADSxMIN_BLOCKS_PER_SM" (e.g. "512x1") builds a block-shape variant of the CUDA kernels, for
    # timing them against the default (csrc/cuda/multi_tensor_apply.cuh); "" is the default shape.
    block_shape: str = ""

    @property
    def with_cuda(self) -> bool:
        return bool(self.cuda_archs)

    @property
    def large_kernel_params(self) -> bool:
        # CUDA 12.1+ lets kernels on Volta and newer take 32 KB of parameters instead of 4 KB.
        return self.nvcc >= (12, 1) and min(_arch_number(a) for a in self.cuda_archs) >= (7, 0)

    @property
    def variant(self) -> str:
        """The cache variant: ``cpu`` or the archs, e.g. ``sm_80-sm_90a-sm_90+PTX``."""
        if not self.with_cuda:
            return "cpu"
        archs = "-".join("sm_" + a.replace(".", "") for a in self.cuda_archs)
        return archs + (f"-b{self.block_shape}" if self.block_shape else "")

    def describe(self) -> str:
        if not self.with_cuda:
            return "CPU"
        shape = f", blocks {self.block_shape}" if self.block_shape else ""
        return "CPU+CUDA " + " ".join("sm_" + a.replace(".", "") for a in self.cuda_archs) + shape


def cuda_toolchain(torch_version: str, torch_cuda: Optional[str], cuda_home: Optional[str], archs: Sequence[str],
                   block_shape: str = "") -> Toolchain:
    """The toolchain for these archs with the toolkit at ``cuda_home``; CPU only when there are no archs,
    no toolkit or a CPU build of torch (callers that asked for CUDA check ``with_cuda``)."""
    if not archs or cuda_home is None or torch_cuda is None:
        return Toolchain(torch_version, torch_cuda)
    if block_shape:
        parse_block_shape(block_shape)
    return Toolchain(torch_version, torch_cuda, cuda_home, nvcc_version(cuda_home), tuple(archs), block_shape)


def compiler_macros(toolchain: Toolchain, sources_digest: str) -> List[Tuple[str, str]]:
    """Preprocessor definitions (name, value) that record the build in the module."""
    macros = [("FASTAMP_TORCH_VERSION", f'"{toolchain.torch_version}"'), ("FASTAMP_SOURCE_HASH", f'"{sources_digest}"')]
    if toolchain.with_cuda:
        macros += [
            ("FASTAMP_WITH_CUDA", "1"),
            ("FASTAMP_CUDA_ARCHS", f'"{",".join(toolchain.cuda_archs)}"'),
            ("FASTAMP_CUDA_VERSION", f'"{toolchain.nvcc[0]}.{toolchain.nvcc[1]}"'),
            ("FASTAMP_LARGE_KERNEL_PARAMS", "1" if toolchain.large_kernel_params else "0"),
        ]
        if toolchain.block_shape:
            threads, min_blocks = parse_block_shape(toolchain.block_shape)
            macros += [("FASTAMP_BLOCK_THREADS", str(threads)), ("FASTAMP_MIN_BLOCKS_PER_SM", str(min_blocks)),
                       ("FASTAMP_BLOCK_SHAPE", f'"{toolchain.block_shape}"')]
    return macros


def parse_block_shape(spec: str) -> Tuple[int, int]:
    """"512x2" -> (512, 2): threads per block (a multiple of 32 up to 1024) and minimum blocks per SM."""
    match = re.fullmatch(r"(\d+)x(\d+)", spec.strip())
    if match is None or int(match.group(1)) % 32 or not 32 <= int(match.group(1)) <= 1024 or int(match.group(2)) < 1:
        raise ValueError(f"block shape {spec!r} is not THREADSxMIN_BLOCKS with THREADS a multiple of 32 up to 1024")
    return int(match.group(1)), int(match.group(2))


# --------------------------------------------------------------------------------------------------
# What this machine has
# --------------------------------------------------------------------------------------------------


def _nvml_archs() -> Optional[List[Tuple[int, str]]]:
    """(index, "major.minor") of every GPU NVML sees, or None without NVML. NVML, unlike
    ``torch.cuda.get_device_capability``, does not initialize CUDA in this process (which would
    break CUDA in forked children)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        found = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                continue
            major, minor = ctypes.c_int(), ctypes.c_int()
            if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) == 0:
                found.append((index, f"{major.value}.{minor.value}"))
        return found
    finally:
        nvml.nvmlShutdown()


def visible_gpu_archs() -> List[str]:
    """The compute capabilities ("9.0") of the GPUs this process may use, without initializing CUDA.

    Honours CUDA_VISIBLE_DEVICES given as indices ("" or "-1" hides every GPU). Falls back to torch's
    query only where NVML is missing.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    devices = _nvml_archs()
    if devices is None:
        import torch

        if torch.version.cuda is None or not torch.cuda.is_available():
            return []
        return sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if all(e.isdigit() for e in entries):
            wanted = [int(e) for e in entries]
            devices = [d for d in devices if d[0] in wanted]
    return sorted({arch for _, arch in devices}, key=_arch_number)


# --------------------------------------------------------------------------------------------------
# Build records and the cache
# --------------------------------------------------------------------------------------------------


def build_record(path: str) -> Optional[Dict[str, str]]:
    """The build record embedded in a compiled module (torch, cuda, archs, source), read from the file
    without loading it; None if it carries none (built by an older fastamp, or not fastamp's)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(RECORD_MARKER)
            if start < 0:
                return None
            end = data.find(b"}", start, start + 4096)
            if end < 0:
                return None
            text = data[start + len(RECORD_MARKER):end].decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    return dict(item.split("=", 1) for item in text.split(";") if "=" in item)


def cache_root() -> Path:
    """Where JIT builds live: ``FASTAMP_CACHE_DIR``, else ``$TORCH_EXTENSIONS_DIR/fastamp``, else
    ``$XDG_CACHE_HOME/fastamp`` (``~/.cache/fastamp``)."""
    if os.environ.get("FASTAMP_CACHE_DIR"):
        return Path(os.environ["FASTAMP_CACHE_DIR"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "fastamp"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fastamp"


def _python_tag() -> str:
    return f"{sys.implementation.name}{sys.version_info.major}{sys.version_info.minor}"


def cache_slot(digest: str, torch_version: str, torch_cuda: Optional[str]) -> Path:
    """The cache folder for these sources, this torch (version and CUDA) and this Python; it holds one
    folder per variant (``cpu``, ``sm_90``, ...)."""
    cuda = f"cu{torch_cuda.replace('.', '')}" if torch_cuda else "cpu"
    return cache_root() / re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{digest}-torch{torch_version}-{cuda}-{_python_tag()}")


@dataclass
class CompiledModule:
    """A module in the cache: where it is, its record, and whether this process just compiled it."""

    path: str
    record: Dict[str, str]
    compiled_now: bool = False
    seconds: float = 0.0
    log: str = ""
    archs: List[str] = field(default_factory=list)


def _library_file(folder: Path) -> Optional[Path]:
    matches = sorted(folder.glob("fastamp_C.*"))
    matches = [m for m in matches if m.suffix in (".so", ".pyd", ".dylib")]
    return matches[0] if matches else None


def _record_matches(record: Optional[Dict[str, str]], torch_version: str, digest: str, block_shape: str = "") -> bool:
    return (record is not None and record.get("torch") == torch_version and record.get("source") == digest
            and record.get("block", "") == block_shape)


def find_cached(slot: Path, torch_version: str, digest: str, need_archs: Sequence[str],
                block_shape: str = "") -> Optional[CompiledModule]:
    """A complete build in ``slot`` for this torch and these sources whose CUDA archs cover
    ``need_archs`` (any build when none are needed; a CPU-only one first), of the given block shape."""
    if not slot.is_dir():
        return None
    candidates = []
    for folder in sorted(slot.iterdir()):
        if folder.name.startswith(".") or not (folder / "build.json").is_file():
            continue
        library = _library_file(folder)
        if library is None:
            continue
        record = build_record(str(library))
        if not _record_matches(record, torch_version, digest, block_shape if need_archs else record.get("block", "")):
            continue
        archs = [a for a in record.get("archs", "").split(",") if a]
        if need_archs and not (archs and cuda_archs_cover(archs, need_archs)):
            continue
        candidates.append((bool(archs), CompiledModule(str(library), record, archs=archs)))
    if not candidates:
        return None
    # With a GPU, the smallest CUDA build that covers it; without one, a CPU build if there is one.
    candidates.sort(key=lambda c: (c[0] if not need_archs else False, len(c[1].archs)))
    return candidates[0][1]


def cached_build(toolchain: Toolchain) -> Optional[CompiledModule]:
    """The cache's build for this toolchain and the installed sources, if there is one (no lock taken,
    nothing compiled)."""
    root = source_dir()
    if root is None:
        return None
    digest = source_hash(root)
    slot = cache_slot(digest, toolchain.torch_version, toolchain.torch_cuda)
    return find_cached(slot, toolchain.torch_version, digest, toolchain.cuda_archs, toolchain.block_shape)


@contextlib.contextmanager
def _exclusive(lock_path: Path, on_wait: Optional[str]) -> Iterator[None]:
    """An exclusive lock held by this process until the block ends (released if the process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    if on_wait:
                        sys.stderr.write(on_wait + "\n")
                        on_wait = None
                    time.sleep(0.5)
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if on_wait:
                sys.stderr.write(on_wait + "\n")
                sys.stderr.flush()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _estimate_seconds(toolchain: Toolchain) -> int:
    # Measured on 2 cores: ~20 s for the CPU kernels; each CUDA arch adds ~50 s of serial work.
    jobs = max(1, min(os.cpu_count() or 1, int(os.environ.get("MAX_JOBS") or 64)))
    serial = 40 + 50 * len(toolchain.cuda_archs)
    return int(max(20, serial / min(jobs, 8 if toolchain.with_cuda else 4)))


def _compiler_message(output: str) -> str:
    """The part of a failed build's output a person needs: the compiler's error lines, each with the
    source excerpt after it (not the compile commands, nor the traceback around them)."""
    lines = [line for line in output.splitlines()
             if len(line) < 400 and not line.startswith(("FAILED:", "[", "ninja: build stopped"))
             and "Error building extension" not in line and "cpp_extension.py" not in line]
    keep = [i for i, line in enumerate(lines) if re.search(r"\berror\b|fatal|undefined reference|No such file", line)]
    if not keep:
        return "\n".join(output.splitlines()[-40:])
    chosen: List[str] = []
    for i in keep[:12]:
        for line in lines[i:i + 3]:
            if line not in chosen:
                chosen.append(line)
    return "\n".join(chosen[-80:])


def compile_into_cache(toolchain: Toolchain, *, force: bool = False, verbose: bool = False,
                       announce: bool = True) -> CompiledModule:
    """Compile ``fastamp._C`` for ``toolchain`` into the cache (or find it there) and return it.

    Safe to call from many processes at once: one compiles, the others wait for the lock and then find
    the finished build. Raises BuildError with the compiler's message if compiling fails.
    """
    root = source_dir()
    if root is None:
        raise BuildError("fastamp's C++/CUDA sources are not installed next to the package (no fastamp/_csrc)")
    digest = source_hash(root)
    slot = cache_slot(digest, toolchain.torch_version, toolchain.torch_cuda)
    target = slot / toolchain.variant
    wait_line = f"fastamp: waiting for another process compiling the kernels ({slot})…" if announce else None
    with _exclusive(slot.parent / (slot.name + "." + toolchain.variant + ".lock"), wait_line):
        failure = slot / f"{toolchain.variant}.failed"
        if not force:
            found = find_cached(slot, toolchain.torch_version, digest, toolchain.cuda_archs, toolchain.block_shape)
            if found is not None:
                return found
            # Ranks that waited for a compile that failed do not each fail the same way again.
            if failure.is_file() and time.time() - failure.stat().st_mtime < FAILED_BUILD_MEMORY_S:
                raise BuildError(failure.read_text() + f"\n(remembered from {failure}; `fastamp build` retries)")
        if announce:
            sys.stderr.write(f"fastamp: compiling kernels for torch {toolchain.torch_version}, {toolchain.describe()} "
                             f"(first use, ~{_estimate_seconds(toolchain)} s)…\n")
            sys.stderr.flush()
        staging = slot / f".staging-{toolchain.variant}-{os.getpid()}-{int(time.time() * 1000)}"
        staging.mkdir(parents=True)
        try:
            started = time.perf_counter()
            try:
                log = _compile_in_child(root, digest, toolchain, staging, verbose)
            except BuildError as exc:
                failure.write_text(str(exc))
                raise
            failure.unlink(missing_ok=True)
            seconds = time.perf_counter() - started
            (staging / "build.log").write_text(log)
            for obj in list(staging.glob("*.o")) + list(staging.glob("*.obj")):
                obj.unlink()
            info = {"torch": toolchain.torch_version, "torch_cuda": toolchain.torch_cuda, "variant": toolchain.variant,
                    "archs": list(toolchain.cuda_archs), "source": digest, "seconds": round(seconds, 1),
                    "python": sys.version.split()[0], "compiled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (staging / "build.json").write_text(json.dumps(info, indent=1))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    library = _library_file(target)
    record = build_record(str(library)) if library else None
    if library is None or not _record_matches(record, toolchain.torch_version, digest, toolchain.block_shape):
        raise BuildError(f"the build in {target} carries no matching build record: {record}")
    if announce:
        sys.stderr.write(f"fastamp: kernels compiled in {seconds:.0f} s, cached in {target}\n")
    return CompiledModule(str(library), record, compiled_now=True, seconds=seconds, log=log,
                          archs=list(toolchain.cuda_archs))


def _compile_in_child(root: Path, digest: str, toolchain: Toolchain, staging: Path, verbose: bool) -> str:
    """Run the compile in a fresh interpreter that never imports fastamp (importing it here would
    try to load the module being built), and return its output."""
    spec = {
        "sources": [str(p) for p in extension_sources(root, toolchain.with_cuda)],
        "macros": compiler_macros(toolchain, digest),
        "cuda_home": toolchain.cuda_home,
        "cuda_archs": ";".join(toolchain.cuda_archs),
        "build_directory": str(staging),
        "verbose": verbose,
    }
    spec_file = staging / "spec.json"
    spec_file.write_text(json.dumps(spec))
    code = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    command = [sys.executable, "-c", code, str(Path(__file__).resolve()), "--compile-spec", str(spec_file)]
    if verbose:
        result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.STDOUT, text=True)
        output = ""
    else:
        result = subprocess.run(command, capture_output=True, text=True)
        output = result.stdout + result.stderr
    if result.returncode != 0:
        message = _compiler_message(output) if output else "(see the output above)"
        raise BuildError(f"compiling fastamp's kernels for torch {toolchain.torch_version} ({toolchain.describe()}) "
                         f"failed:\n{message}")
    return output


def _escape_macro(name: str, value: str) -> str:
    # ninja runs the compile commands through a shell: quotes inside a definition must be escaped.
    return f"-D{name}={value}".replace('"', '\\"')


def _unique_object_names(sources: Sequence[str], folder: Path) -> List[str]:
    """``cpp_extension.load`` names each object after its source's file name, so csrc/cpu/ops.cpp and
    csrc/cuda/ops.cpp would both be ops.o: such sources are compiled through a one-line wrapper named
    after their folder (includes inside them still resolve from their own folder)."""
    stems: Dict[str, int] = {}
    for source in sources:
        stems[Path(source).name] = stems.get(Path(source).name, 0) + 1
    unique = []
    for source in sources:
        path = Path(source)
        if stems[path.name] == 1:
            unique.append(source)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        wrapper = folder / f"{path.parent.name}_{path.name}"
        wrapper.write_text(f'#include "{path.resolve()}"\n')
        unique.append(str(wrapper))
    return unique


def _compile_main(spec_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    if spec["cuda_home"]:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = spec["cuda_home"]
        os.environ["TORCH_CUDA_ARCH_LIST"] = spec["cuda_archs"]
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        sys.stderr.write("error: ninja is not installed; compiling on first use needs it (pip install ninja), or "
                         "build ahead of time with `pip install --no-build-isolation .`\n")
        return 1
    macros = [_escape_macro(n, v) for n, v in spec["macros"]]
    with_cuda = bool(spec["cuda_home"])
    try:
        cpp_extension.load(
            name="fastamp_C",
            sources=_unique_object_names(spec["sources"], Path(spec["build_directory"]) / "sources"),
            extra_cflags=CXX_FLAGS + macros,
            extra_cuda_cflags=(NVCC_FLAGS + macros) if with_cuda else None,
            extra_ldflags=LINK_FLAGS,
            build_directory=spec["build_directory"],
            verbose=spec["verbose"],
            with_cuda=with_cuda,
            is_python_module=False,  # loads the library here once, as a check that it links
        )
    except Exception as exc:  # the compiler's output is in the message
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--compile-spec":
        sys.exit(_compile_main(sys.argv[2]))
    sys.exit(f"usage: {sys.argv[0]} --compile-spec FILE (internal; use `fastamp build`)")
