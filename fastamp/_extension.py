"""Loads the compiled kernels (``fastamp._C``) and fills any gap with the reference implementation.

Loading is wrapped: a missing or broken build never breaks ``import fastamp``; the ops then run the
pure-PyTorch reference, and :func:`fastamp.build_info` says why.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import torch

from .ops import _library, _reference

__all__ = ["EXTENSION", "dispatch_keys_with_kernel", "extension_status"]

_DISPATCH_KEYS = ("CPU", "CUDA")


def _load() -> Dict[str, Any]:
    status: Dict[str, Any] = {"loaded": False, "error": None, "path": None, "module": None}
    if os.environ.get("FASTAMP_DISABLE_EXTENSION") == "1":
        status["error"] = "disabled by FASTAMP_DISABLE_EXTENSION=1"
        return status
    try:
        from . import _C  # type: ignore[attr-defined]  # noqa: F401  (registers the kernels on import)
    except ImportError as exc:  # not built (pure-Python install) or built against another torch
        status["error"] = f"{type(exc).__name__}: {exc}"
        return status
    except OSError as exc:  # a shared library it needs could not be loaded
        status["error"] = f"{type(exc).__name__}: {exc}"
        return status
    status.update(loaded=True, path=getattr(_C, "__file__", None), module=_C)
    return status


def dispatch_keys_with_kernel(op: str) -> List[str]:
    """Dispatch keys (of CPU and CUDA) that have a kernel registered for ``fastamp::<op>``."""
    return [key for key in _DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastamp::{op}", key)]


EXTENSION = _load()

# Any of CPU/CUDA that the extension did not cover runs the reference implementation.
_REFERENCE_KEYS: Dict[str, List[str]] = {}
for _op in _library.OP_NAMES:
    for _key in _DISPATCH_KEYS:
        if _key not in dispatch_keys_with_kernel(_op):
            _library.LIBRARY.impl(_op, getattr(_reference, _op), _key)
            _REFERENCE_KEYS.setdefault(_key, []).append(_op)


def extension_status() -> Dict[str, Any]:
    """What was loaded: the extension (or why not) and which dispatch keys run the reference."""
    module = EXTENSION["module"]
    return {
        "extension_loaded": EXTENSION["loaded"],
        "extension_error": EXTENSION["error"],
        "extension_path": EXTENSION["path"],
        "cpu_kernels": EXTENSION["loaded"] and "CPU" not in _REFERENCE_KEYS,
        "cuda_kernels": EXTENSION["loaded"] and "CUDA" not in _REFERENCE_KEYS,
        "cuda_archs": getattr(module, "cuda_archs", "").split(",") if getattr(module, "cuda_archs", "") else [],
        "compiled_cuda_version": getattr(module, "cuda_version", None) or None,
        "compiled_torch_version": getattr(module, "torch_version", None),
        "openmp": bool(getattr(module, "openmp", 0)) if module else False,
        "reference_fallback": {key: list(ops) for key, ops in _REFERENCE_KEYS.items()},
    }
