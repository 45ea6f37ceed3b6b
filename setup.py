"""Builds fastamp and its one extension, fastamp._C.

- C++ CPU kernels always (unless FASTAMP_NO_EXT=1, which installs pure Python: the ops then run the
  reference implementation).
- CUDA kernels when torch is a CUDA build and a CUDA toolkit is found, or FORCE_CUDA=1.
  TORCH_CUDA_ARCH_LIST picks the archs (default below); MAX_JOBS caps parallel compile jobs.
- Install with ``pip install --no-build-isolation``: the extension must compile against the torch it
  will run with, and an isolated build would download another one.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _is_toolkit_root(path: str) -> bool:
    has_nvcc = os.path.isfile(os.path.join(path, "bin", "nvcc"))
    has_cudart = any(
        glob.glob(os.path.join(path, sub, "libcudart.so*")) for sub in ("lib64", "lib", "targets/x86_64-linux/lib")
    )
    return has_nvcc and has_cudart


def find_cuda_home() -> str | None:
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


def _nvcc_version(cuda_home: str) -> tuple[int, int]:
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _archs(arch_list: str) -> list[str]:
    return [a for a in re.split(r"[;\s,]+", arch_list.strip()) if a]


def extensions():
    if os.environ.get("FASTAMP_NO_EXT") == "1":
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    with_cuda = torch.version.cuda is not None and (cuda_home is not None or force_cuda)
    if force_cuda and torch.version.cuda is None:
        raise RuntimeError(
            f"FORCE_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build; install a CUDA build "
            "of torch (e.g. torch==2.14.1) or unset FORCE_CUDA"
        )
    if force_cuda and cuda_home is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit root")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    macros = [("FASTAMP_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unused-function"]
    link_flags = ["-fopenmp"]  # without it at::parallel_for in extension code silently runs on one thread
    build_kwargs = {}
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        archs = _archs(arch_list)
        major, minor = _nvcc_version(cuda_home)
        # CUDA 12.1+ lets kernels on Volta and newer take 32 KB of parameters instead of 4 KB.
        min_arch = min(float(a.replace("+PTX", "")) for a in archs)
        large_params = (major, minor) >= (12, 1) and min_arch >= 7.0
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        macros += [
            ("FASTAMP_WITH_CUDA", "1"),
            ("FASTAMP_CUDA_ARCHS", f'"{",".join(archs)}"'),
            ("FASTAMP_CUDA_VERSION", f'"{major}.{minor}"'),
            ("FASTAMP_LARGE_KERNEL_PARAMS", "1" if large_params else "0"),
        ]
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            "fastamp._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("fastamp._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags)
    build_kwargs["cmdclass"] = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [ext], build_kwargs


def cuda_build_expected() -> bool:
    """Whether a build here compiles the CUDA kernels (used by `make test` to expect them)."""
    if os.environ.get("FASTAMP_NO_EXT") == "1":
        return False
    import torch

    return torch.version.cuda is not None and (find_cuda_home() is not None or os.environ.get("FORCE_CUDA") == "1")


if __name__ == "__main__":
    ext_modules, build_kwargs = extensions()
    setup(
        packages=find_packages(include=["fastamp", "fastamp.*"]),
        ext_modules=ext_modules,
        **build_kwargs,
    )
