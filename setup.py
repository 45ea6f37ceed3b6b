"""Builds fastamp and, where torch is importable, its extension fastamp._C ahead of time.

- ``pip install --no-build-isolation .`` (or ``-e .``) with torch installed: the C++ CPU kernels, and
  the CUDA kernels when torch is a CUDA build and a CUDA toolkit is found (or FORCE_CUDA=1).
  TORCH_CUDA_ARCH_LIST picks the archs (default in fastamp/_build.py); MAX_JOBS caps compile jobs.
- An isolated build (``pip install .``, ``pip install git+<url>``) has no torch: it installs the Python
  package with the C++/CUDA sources (fastamp/_csrc), and the kernels compile on first use against the
  torch that imports them (fastamp/_build.py). No torch is downloaded either way.
- ``FASTAMP_NO_EXT=1`` skips the ahead-of-time build even where torch is importable.

Sources, flags and the arch list live in fastamp/_build.py, shared with the compile-on-first-use path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    # By file path: importing the fastamp package would import torch, which an isolated build lacks.
    spec = importlib.util.spec_from_file_location("_fastamp_build", os.path.join(ROOT, "fastamp", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


fastamp_build = _load_build_module()
find_cuda_home = fastamp_build.find_cuda_home


class BuildPyWithSources(build_py):
    """Installs csrc/ as fastamp/_csrc, so that an installed fastamp can compile its kernels."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, "fastamp", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), target, ignore=shutil.ignore_patterns("tests"))


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def toolchain(torch):
    """What an ahead-of-time build here compiles for (fastamp/_build.py's Toolchain)."""
    cuda_home = find_cuda_home()
    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    if force_cuda and torch.version.cuda is None:
        raise RuntimeError(
            f"FORCE_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build; install a CUDA build "
            "of torch (e.g. torch==2.14.1) or unset FORCE_CUDA"
        )
    if force_cuda and cuda_home is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit root")
    archs = fastamp_build.parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or fastamp_build.DEFAULT_CUDA_ARCHS)
    return fastamp_build.cuda_toolchain(torch.__version__, torch.version.cuda, cuda_home, archs)


def extensions():
    if os.environ.get("FASTAMP_NO_EXT") == "1":
        return []
    torch = _torch_or_none()
    if torch is None:
        print("fastamp: torch is not importable in this build environment (pip's isolated build): installing the "
              "Python package and the C++/CUDA sources; the kernels compile on first use", file=sys.stderr)
        return []
    tools = toolchain(torch)
    if tools.with_cuda:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = tools.cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(tools.cuda_archs)
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    csrc = os.path.join(ROOT, "csrc")
    sources = [os.path.relpath(p, ROOT) for p in fastamp_build.extension_sources(Path(csrc), tools.with_cuda)]
    macros = fastamp_build.compiler_macros(tools, fastamp_build.source_hash(Path(csrc)))
    if tools.with_cuda:
        return [CUDAExtension("fastamp._C", sources, define_macros=macros,
                              extra_compile_args={"cxx": fastamp_build.CXX_FLAGS, "nvcc": fastamp_build.NVCC_FLAGS},
                              extra_link_args=fastamp_build.LINK_FLAGS)]
    return [CppExtension("fastamp._C", sources, define_macros=macros,
                         extra_compile_args={"cxx": fastamp_build.CXX_FLAGS}, extra_link_args=fastamp_build.LINK_FLAGS)]


def cuda_build_expected() -> bool:
    """Whether an ahead-of-time build here compiles the CUDA kernels (used by `make test` to expect them)."""
    if os.environ.get("FASTAMP_NO_EXT") == "1":
        return False
    import torch

    return torch.version.cuda is not None and (find_cuda_home() is not None or os.environ.get("FORCE_CUDA") == "1")


if __name__ == "__main__":
    ext_modules = extensions()
    cmdclass = {"build_py": BuildPyWithSources}
    if ext_modules:
        from torch.utils.cpp_extension import BuildExtension

        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    setup(
        packages=find_packages(include=["fastamp", "fastamp.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
