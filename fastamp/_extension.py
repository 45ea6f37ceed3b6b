"""Loads the compiled kernels (``fastamp._C``) and fills any gap with the reference implementation.

In order:
1. the ahead-of-time build installed with the package (``pip install --no-build-isolation``), if its
   build record says it was compiled for the running torch;
2. a build in the JIT cache for this torch, these sources and the visible GPUs (``fastamp build``
   puts one there ahead of time);
3. compiling one into the cache now (unless ``FASTAMP_JIT=0``), which prints one line on stderr;
   (``FASTAMP_CUDA_BLOCK_SHAPE=512x1`` asks for a block-shape variant of the CUDA kernels, which
   ``make gpu-check`` times; it skips step 1);
4. otherwise the pure-PyTorch reference, with one :class:`KernelFallbackWarning` saying why and what
   to do.

A missing or broken build never breaks ``import fastamp``; :func:`fastamp.build_info` says which of
the above is in use and from where.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from typing import Any, Dict, List, Optional

import torch

from . import _build
from .ops import _library, _reference

__all__ = ["EXTENSION", "KernelFallbackWarning", "LARGE_PARAMS_MIN_DRIVER", "dispatch_keys_with_kernel",
           "driver_refuses_kernels", "extension_status"]

_DISPATCH_KEYS = ("CPU", "CUDA")
MODE_AOT = "ahead-of-time"
MODE_JIT = "jit"
MODE_REFERENCE = "reference"


class KernelFallbackWarning(RuntimeWarning):
    """fastamp's compiled kernels are not in use (or not for every device): the reference runs."""


def _import_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("fastamp._C", path)
    module = importlib.util.module_from_spec(spec)  # dlopen: registers the kernels
    spec.loader.exec_module(module)
    sys.modules["fastamp._C"] = module
    return module


def _ahead_of_time_build() -> Optional[str]:
    """The ``_C`` module installed in this package's folder by setup.py, if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def _jit_toolchain(problems: List[str]) -> _build.Toolchain:
    """What a JIT build here compiles for: CPU always; CUDA for the visible GPUs' archs when torch is
    a CUDA build and a toolkit is found."""
    archs = _build.visible_gpu_archs() if torch.version.cuda is not None else []
    cuda_home = _build.find_cuda_home() if archs else None
    if archs and cuda_home is None:
        problems.append("no CUDA toolkit (nvcc) was found to compile the CUDA kernels: set CUDA_HOME")
    block_shape = os.environ.get("FASTAMP_CUDA_BLOCK_SHAPE", "")
    if block_shape:
        try:
            _build.parse_block_shape(block_shape)
        except ValueError as exc:
            problems.append(f"FASTAMP_CUDA_BLOCK_SHAPE ignored: {exc}")
            block_shape = ""
    return _build.cuda_toolchain(torch.__version__, torch.version.cuda, cuda_home, archs, block_shape)


def _load_jit(status: Dict[str, Any], problems: List[str]) -> bool:
    root = _build.source_dir()
    if root is None:
        problems.append("the C++/CUDA sources are not installed (no fastamp/_csrc), so nothing can be compiled")
        return False
    tools = _jit_toolchain(problems)
    status["jit_cache"] = str(_build.cache_root())
    found = _build.cached_build(tools)
    if found is None:
        if os.environ.get("FASTAMP_JIT") == "0":
            problems.append(f"FASTAMP_JIT=0 forbids compiling and the cache ({_build.cache_root()}) holds no build "
                            f"for torch {torch.__version__} ({tools.describe()}): run `fastamp build` once")
            return False
        try:
            found = _build.compile_into_cache(tools)
        except _build.BuildError as exc:
            problems.append(str(exc))
            return False
        except OSError as exc:
            problems.append(f"compiling into {_build.cache_root()} failed: {exc} (FASTAMP_CACHE_DIR moves the cache)")
            return False
    try:
        module = _import_module(found.path)
    except (ImportError, OSError) as exc:
        problems.append(f"the cached build {found.path} failed to load: {exc}")
        return False
    status.update(loaded=True, mode=MODE_JIT, path=found.path, module=module, compiled_now=found.compiled_now)
    return True


def _load() -> Dict[str, Any]:
    status: Dict[str, Any] = {"loaded": False, "mode": MODE_REFERENCE, "error": None, "path": None, "module": None,
                              "compiled_now": False, "jit_cache": None}
    if os.environ.get("FASTAMP_DISABLE_EXTENSION") == "1":
        status["error"] = "disabled by FASTAMP_DISABLE_EXTENSION=1"
        return status
    problems: List[str] = []
    installed = _ahead_of_time_build()
    if os.environ.get("FASTAMP_CUDA_BLOCK_SHAPE"):
        installed = None  # a block-shape variant (for timing) only ever comes from the JIT cache
    if installed is not None:
        record = _build.build_record(installed)
        if record is None:
            problems.append(f"{installed} carries no build record (built by an older fastamp): rebuild it")
        elif record.get("torch") != torch.__version__:
            problems.append(f"{installed} was built for torch {record.get('torch')}, but torch {torch.__version__} "
                            "is running")
        else:
            try:
                status.update(loaded=True, mode=MODE_AOT, path=installed, module=_import_module(installed))
                return status
            except (ImportError, OSError) as exc:  # a library it needs is missing
                problems.append(f"{installed} failed to load: {type(exc).__name__}: {exc}")
    if not _load_jit(status, problems):
        status["error"] = "; ".join(problems) or "no compiled kernels"
        return status
    status["notes"] = problems
    return status


def dispatch_keys_with_kernel(op: str) -> List[str]:
    """Dispatch keys (of CPU and CUDA) that have a kernel registered for ``fastamp::<op>``."""
    return [key for key in _DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastamp::{op}", key)]


# Kernels with the 32 KB parameter layout need a CUDA 12.1 (R530) driver or newer.
LARGE_PARAMS_MIN_DRIVER = 12010


def driver_refuses_kernels(large_kernel_params: bool, driver_version: int) -> bool:
    """Whether the installed driver (``cudaDriverGetVersion``; 0 when there is none) would reject every
    launch of kernels built with the 32 KB kernel-parameter layout."""
    return bool(large_kernel_params) and 0 < driver_version < LARGE_PARAMS_MIN_DRIVER


def _driver_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


EXTENSION = _load()
_module = EXTENSION["module"]
_DRIVER_REFUSES = _module is not None and driver_refuses_kernels(getattr(_module, "large_kernel_params", 0),
                                                                  getattr(_module, "cuda_driver_version", 0))

# Any of CPU/CUDA that the extension did not cover runs the reference implementation.
_REFERENCE_KEYS: Dict[str, List[str]] = {}
for _op in _library.OP_NAMES:
    for _key in _DISPATCH_KEYS:
        if _key not in dispatch_keys_with_kernel(_op) or (_key == "CUDA" and _DRIVER_REFUSES):
            with warnings.catch_warnings():  # replacing the compiled CUDA kernel is the point here
                warnings.simplefilter("ignore")
                _library.LIBRARY.impl(_op, getattr(_reference, _op), _key)
            _REFERENCE_KEYS.setdefault(_key, []).append(_op)


def _fallback_warning() -> Optional[str]:
    if EXTENSION["error"] == "disabled by FASTAMP_DISABLE_EXTENSION=1":
        return None  # asked for
    if not EXTENSION["loaded"]:
        return (f"fastamp: compiled kernels are not in use, the ops run the pure-PyTorch reference (many times "
                f"slower).\nWhy: {EXTENSION['error']}\nWhat to do: install a C++ compiler and ninja and let fastamp "
                "compile on first use, run `fastamp build` to see the compiler's messages, or reinstall with "
                "`pip install --no-build-isolation .` against this torch.")
    if _DRIVER_REFUSES:
        return (f"fastamp: the CUDA driver ({_driver_version_text(_module.cuda_driver_version)}) is older than CUDA "
                f"{_driver_version_text(LARGE_PARAMS_MIN_DRIVER)} (R530), which the compiled CUDA kernels' 32 KB "
                "kernel-parameter layout needs: CUDA tensors run the pure-PyTorch reference.\nWhat to do: update the "
                "NVIDIA driver, or build with a CUDA toolkit older than 12.1 (the 4 KB layout).")
    if "CUDA" in _REFERENCE_KEYS and torch.version.cuda is not None and _build.visible_gpu_archs():
        notes = "; ".join(EXTENSION.get("notes") or []) or f"{EXTENSION['path']} was built without CUDA kernels"
        return (f"fastamp: no CUDA kernels are in use, CUDA tensors run the pure-PyTorch reference.\nWhy: {notes}\n"
                "What to do: make nvcc findable (CUDA_HOME) and run `fastamp build`, or rebuild with a CUDA toolkit.")
    return None


_WARNING = _fallback_warning()
if _WARNING:
    warnings.warn(_WARNING, KernelFallbackWarning, stacklevel=2)


def extension_status() -> Dict[str, Any]:
    """What was loaded: which kernels are in use (ahead-of-time, jit or reference) and from where,
    why not where they are not, and which dispatch keys run the reference."""
    module = EXTENSION["module"]
    return {
        "kernels": EXTENSION["mode"],
        "extension_loaded": EXTENSION["loaded"],
        "extension_error": EXTENSION["error"],
        "extension_path": EXTENSION["path"],
        "compiled_on_this_import": EXTENSION["compiled_now"],
        "builds_passed_over": list(EXTENSION.get("notes") or []),
        "jit_cache": EXTENSION["jit_cache"] or str(_build.cache_root()),
        "cpu_kernels": EXTENSION["loaded"] and "CPU" not in _REFERENCE_KEYS,
        "cuda_kernels": EXTENSION["loaded"] and "CUDA" not in _REFERENCE_KEYS,
        "cuda_archs": getattr(module, "cuda_archs", "").split(",") if getattr(module, "cuda_archs", "") else [],
        "compiled_cuda_version": getattr(module, "cuda_version", None) or None,
        "compiled_torch_version": getattr(module, "torch_version", None),
        "openmp": bool(getattr(module, "openmp", 0)) if module else False,
        "large_kernel_params": bool(getattr(module, "large_kernel_params", 0)),
        "chunk_size": getattr(module, "chunk_size", None),
        "cuda_driver_version": getattr(module, "cuda_driver_version", 0) or None,
        "reference_fallback": {key: list(ops) for key, ops in _REFERENCE_KEYS.items()},
        "warning": _WARNING,
    }
