"""The emulated CUDA kernels (tests/emu/build.py), built once per session and variant."""

from __future__ import annotations

import os
import shutil
from typing import Dict

import pytest
import torch

from .build import VARIANTS, build
from .emulator import CudaKernels, EmulatedKernels

_BUILT: Dict[str, EmulatedKernels] = {}


def emulated(variant: str = "default") -> EmulatedKernels:
    """The emulated kernels of one build variant (built on first use, cached on disk by content)."""
    if shutil.which("g++") is None:
        reason = "the CUDA emulator needs g++"
        if os.environ.get("FASTAMP_EXPECT_EMULATOR") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    if variant not in _BUILT:
        _BUILT[variant] = EmulatedKernels(build(variant))
    return _BUILT[variant]


@pytest.fixture(scope="session")
def emu() -> EmulatedKernels:
    """The default build: 256-thread blocks, 4 KB kernel parameters."""
    return emulated("default")


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def emu_variant(request) -> EmulatedKernels:
    """Every build variant: the parameter layouts and the block shapes."""
    return emulated(request.param)


@pytest.fixture(scope="session", params=["emulated", "cuda"] if torch.cuda.is_available() else ["emulated"])
def target(request):
    """The kernels a case runs on: the emulated ones, and where a GPU is, the real ones on the same case."""
    if request.param == "cuda":
        return CudaKernels()
    return emulated("default")
