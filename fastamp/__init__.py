"""fastamp: fused, sync-free optimizer-side kernels for PyTorch mixed-precision training."""

from __future__ import annotations

from typing import Any, Dict

import torch

from . import _moved, ops
from ._extension import KernelFallbackWarning, extension_status
from .forensics import OverflowDiagnosis, TrainingStuckWarning, diagnose_overflow
from .grad_scaler import GradScaler
from .spike_guard import SpikeGuard
from .trainer import FusedMixedPrecisionTrainer

__version__ = "0.1.0"

__all__ = ["FusedMixedPrecisionTrainer", "GradScaler", "KernelFallbackWarning", "OverflowDiagnosis",
           "SpikeGuard", "TrainingStuckWarning", "__version__", "build_info", "diagnose_overflow", "has_cuda_kernels", "ops"]

_moved.install()


def has_cuda_kernels() -> bool:
    """Whether the compiled CUDA kernels are registered (visible without a GPU)."""
    return bool(extension_status()["cuda_kernels"])


def build_info() -> Dict[str, Any]:
    """How fastamp was built and what runs: extension loaded or not and why, CPU/CUDA kernels, CUDA
    archs compiled, torch version, and which dispatch keys fall back to the reference."""
    info: Dict[str, Any] = {"fastamp_version": __version__, "torch_version": torch.__version__,
                            "torch_cuda_version": torch.version.cuda}
    info.update(extension_status())
    info["cuda_available"] = torch.cuda.is_available()
    info["num_threads"] = torch.get_num_threads()
    return info
