"""fastamp's CUDA kernels, emulated on the CPU (tests/emu/build.py), behind the signatures of
:mod:`fastamp.ops`: the op tests run the same calls against :mod:`fastamp.ops._reference` and, on a GPU,
against the real kernels.

Inputs are validated by the reference's validators first (as csrc/cuda/ops.cpp validates before it
launches), and non-contiguous tensors are run through contiguous copies and written back (as
csrc/flat_tensors.h does). Tensors are CPU tensors: their memory is the emulated device's.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastamp.ops import _reference as ref

__all__ = ["CudaKernels", "EmulatedKernels", "LaunchError"]

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_P = ctypes.c_void_p


class LaunchError(RuntimeError):
    """A launch the emulator refused or a kernel it caught misbehaving (C10_CUDA_KERNEL_LAUNCH_CHECK's error)."""


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class _Dense:
    """A tensor list as contiguous memory, written back into the strided originals on exit."""

    def __init__(self, tensors: Sequence[Tensor], written: bool):
        self.originals = list(tensors)
        self.dense = [t if t.is_contiguous() else t.contiguous() for t in self.originals]
        self.written = written
        n = len(self.dense)
        self.data = (_P * max(n, 1))(*[t.data_ptr() for t in self.dense])
        self.numel = (ctypes.c_int64 * max(n, 1))(*[t.numel() for t in self.dense])
        self.dtype = (ctypes.c_int * max(n, 1))(*[_DTYPES[t.dtype] for t in self.dense])
        self.n = n

    def args(self) -> tuple:
        return self.data, self.numel, self.dtype, self.n

    def write_back(self) -> None:
        if self.written:
            for original, dense in zip(self.originals, self.dense):
                if dense is not original:
                    original.copy_(dense)


class EmulatedKernels:
    """The emulated CUDA kernels of one build (a shared library from tests/emu/build.py)."""

    def __init__(self, library: Path):
        self.path = Path(library)
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.emu_error.restype = ctypes.c_char_p
        self.lib.emu_chunk_size.restype = ctypes.c_longlong
        for name in ("emu_clip_coef", "emu_update_scale"):
            getattr(self.lib, name).restype = ctypes.c_int
        self.lib.emu_clip_coef.argtypes = [_P, _P, ctypes.c_int, ctypes.c_double, ctypes.c_double]
        self.lib.emu_update_scale.argtypes = [_P, _P, _P, _P, ctypes.c_double, ctypes.c_double, ctypes.c_longlong,
                                              ctypes.c_longlong, ctypes.c_double, ctypes.c_double]
        self.chunk_size = int(self.lib.emu_chunk_size())
        self.block_threads = int(self.lib.emu_block_threads())
        self.max_tensors_per_launch = int(self.lib.emu_max_tensors_per_launch())
        self.max_blocks_per_launch = int(self.lib.emu_max_blocks_per_launch())

    # ---- the runtime's controls ----------------------------------------------------------------

    def call(self, name: str, *args) -> None:
        """Calls entry point ``name``; raises :class:`LaunchError` with the launch error it returned."""
        if getattr(self.lib, name)(*args) != 0:
            raise LaunchError(self.lib.emu_error().decode())

    @contextlib.contextmanager
    def launches(self) -> Iterator[List[str]]:
        """Collects the names of the kernels launched inside the block (in order)."""
        self.lib.emu_reset_launches()
        names: List[str] = []
        try:
            yield names
        finally:
            size = self.lib.emu_launch_names(None, 0) + 1
            buf = ctypes.create_string_buffer(size)
            self.lib.emu_launch_names(buf, size)
            names.extend(line for line in buf.value.decode().splitlines() if line)

    @contextlib.contextmanager
    def block_order(self, seed: int) -> Iterator[None]:
        """Runs the blocks of every launch in the permutation drawn from ``seed`` (0: grid order)."""
        self.lib.emu_set_block_order_seed(ctypes.c_uint(seed))
        try:
            yield
        finally:
            self.lib.emu_set_block_order_seed(ctypes.c_uint(0))

    # ---- the ops, as fastamp.ops states them ---------------------------------------------------

    def unscale_check_(self, grads: Sequence[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
        ref.validate_unscale_check("unscale_check_", grads, found_inf, inv_scale)
        dense = _Dense(grads, written=True)
        self.call("emu_unscale_check", *dense.args(), _P(_ptr(found_inf)), _P(_ptr(inv_scale)))
        dense.write_back()

    def grad_norm(self, grads: Sequence[Tensor], inv_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
                  per_tensor: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        ref.validate_grad_norm(grads, inv_scale, found_inf)
        dense = _Dense(grads, written=False)
        total, per = self._norm_outputs(len(grads), per_tensor)
        self.call("emu_grad_norm", *dense.args(), _P(_ptr(inv_scale)), _P(_ptr(found_inf)), _P(_ptr(total)),
                  _P(_ptr(per) if per_tensor else None))
        return total, (per if per_tensor else None)

    def unscale_check_norm_(self, grads: Sequence[Tensor], found_inf: Tensor, inv_scale: Tensor,
                            per_tensor: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        ref.validate_unscale_check("unscale_check_norm_", grads, found_inf, inv_scale)
        dense = _Dense(grads, written=True)
        total, per = self._norm_outputs(len(grads), per_tensor)
        self.call("emu_unscale_check_norm", *dense.args(), _P(_ptr(found_inf)), _P(_ptr(inv_scale)), _P(_ptr(total)),
                  _P(_ptr(per) if per_tensor else None))
        dense.write_back()
        return total, (per if per_tensor else None)

    def clip_coef(self, total_norm: Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
        ref.validate_clip_coef(total_norm, max_norm, eps)
        coef = torch.full((), math.nan, dtype=total_norm.dtype)
        self.call("emu_clip_coef", _P(_ptr(total_norm)), _P(_ptr(coef)), int(total_norm.dtype == torch.float64),
                  float(max_norm), float(eps))
        return coef

    def clip_norm(self, grads: Sequence[Tensor], max_norm: float, inv_scale: Optional[Tensor] = None,
                  found_inf: Optional[Tensor] = None, per_tensor: bool = False,
                  eps: float = 1e-6) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
        ref.validate_clip_norm(grads, max_norm, inv_scale, found_inf, eps)
        if not grads:  # as csrc/cuda/ops.cpp: no norm launch for an empty list
            total = torch.zeros(())
            coef = self.clip_coef(total, max_norm, eps)
            return total, (torch.zeros(0) if per_tensor else None), coef, (
                coef.clone() if inv_scale is None else inv_scale.reshape(()) * coef)
        dense = _Dense(grads, written=False)
        total, per = self._norm_outputs(len(grads), per_tensor)
        coef, factor = torch.full((), math.nan), torch.full((), math.nan)
        self.call("emu_clip_norm", *dense.args(), ctypes.c_double(max_norm), _P(_ptr(inv_scale)), _P(_ptr(found_inf)),
                  _P(_ptr(total)), _P(_ptr(per) if per_tensor else None), _P(_ptr(coef)), _P(_ptr(factor)),
                  ctypes.c_double(eps))
        return total, (per if per_tensor else None), coef, factor

    def scale_(self, tensors: Sequence[Tensor], factor: Tensor, found_inf: Optional[Tensor] = None) -> None:
        ref.validate_scale(tensors, factor, found_inf)
        dense = _Dense(tensors, written=True)
        self.call("emu_scale", *dense.args(), _P(_ptr(factor)), _P(_ptr(found_inf)))
        dense.write_back()

    def update_scale_(self, scale: Tensor, growth_tracker: Tensor, found_inf: Tensor, growth_factor: float,
                      backoff_factor: float, growth_interval: int, hysteresis: int = 1,
                      hysteresis_tracker: Optional[Tensor] = None, min_scale: float = 0.0,
                      max_scale: float = math.inf) -> None:
        ref.validate_update_scale(scale, growth_tracker, found_inf, hysteresis, hysteresis_tracker, min_scale, max_scale)
        self.call("emu_update_scale", _P(_ptr(scale)), _P(_ptr(growth_tracker)), _P(_ptr(hysteresis_tracker)),
                  _P(_ptr(found_inf)), growth_factor, backoff_factor, growth_interval, hysteresis, min_scale, max_scale)

    @staticmethod
    def _norm_outputs(n: int, per_tensor: bool) -> Tuple[Tensor, Tensor]:
        # NaN-filled, so that an output a kernel forgot to write cannot pass for a right answer.
        return torch.full((), math.nan), torch.full((n if per_tensor else 0,), math.nan)


class CudaKernels:
    """The real CUDA kernels (:mod:`fastamp.ops` on a GPU) behind the emulator's CPU-tensor calls, so the
    emulator's cases run on a GPU too and the two are held to the same oracle (`make gpu-check`).

    Each CPU tensor goes to the GPU with its whole storage, so a view keeps its element offset (and its
    misalignment); after the call every argument is copied back in place, results come back to the CPU."""

    def __getattr__(self, name: str):
        from fastamp import ops

        op = getattr(ops, name)

        def run(*args, **kwargs):
            moved = []

            def to_cuda(x):
                if isinstance(x, Tensor):
                    storage = x.untyped_storage()
                    whole = torch.empty(0, dtype=x.dtype).set_(storage, 0, (storage.nbytes() // x.element_size(),))
                    on_gpu = whole.cuda().as_strided(x.shape, x.stride(), x.storage_offset())
                    moved.append((x, on_gpu))
                    return on_gpu
                if isinstance(x, (list, tuple)):
                    return type(x)(to_cuda(v) for v in x)
                return x

            result = op(*[to_cuda(a) for a in args], **{k: to_cuda(v) for k, v in kwargs.items()})
            for original, on_gpu in moved:
                original.copy_(on_gpu.cpu())

            def to_cpu(x):
                if isinstance(x, Tensor):
                    return x.cpu()
                if isinstance(x, (list, tuple)):
                    return type(x)(to_cpu(v) for v in x)
                return x

            return to_cpu(result)

        return run
