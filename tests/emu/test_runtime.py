"""The emulator itself: its warp intrinsics follow CUDA's rules (computed here by hand), shared memory
and __syncthreads order a block, and every misbehaviour CUDA leaves undefined is a launch error that
names what went wrong, instead of a run that happens to give some answer."""

from __future__ import annotations

import ctypes
import re
from typing import Optional

import pytest
import torch

from .build import RUNTIME, build
from .emulator import EmulatedKernels


@pytest.fixture(scope="module")
def faulty(emu) -> ctypes.CDLL:  # the emu fixture skips where there is no g++
    lib = ctypes.CDLL(str(build("default", extra_sources=[RUNTIME / "faulty_kernels.cu"])))
    lib.faulty_launch.restype = ctypes.c_char_p
    lib.faulty_launch.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return lib


def launch(lib: ctypes.CDLL, name: str, threads: int = 64, blocks: int = 1, out: Optional[torch.Tensor] = None) -> str:
    out = out if out is not None else torch.zeros(max(threads * blocks * 5, 1), dtype=torch.int32)
    return lib.faulty_launch(name.encode(), out.data_ptr(), threads, blocks).decode()


def test_warp_intrinsics_follow_cuda_rules(faulty):
    threads = 64
    out = torch.zeros(threads * 5, dtype=torch.int32)
    assert launch(faulty, "warp_rules", threads, out=out) == ""
    got = out.reshape(threads, 5).tolist()
    odd_lanes = sum(1 << lane for lane in range(32) if lane % 2 == 1)
    for t in range(threads):
        lane, warp_base = t % 32, t - t % 32
        down = t + 1 if lane + 1 < 32 else t  # past the warp's end: the lane's own value
        up = t - 2 if lane % 8 >= 2 else t  # width 8: no reads across 8-lane segments
        xor = warp_base + (lane ^ 5)
        shfl = warp_base + (lane // 16) * 16 + 3  # width 16: lane 3 of the lane's own segment
        ballot = odd_lanes - (1 << 32)  # as a signed 32-bit int
        assert got[t] == [down, up, xor, shfl, ballot], t


def test_shared_memory_and_barrier_order_each_block(faulty):
    threads, blocks = 96, 3
    out = torch.zeros(threads * blocks, dtype=torch.int32)
    assert launch(faulty, "shared_rotation", threads, blocks, out=out) == ""
    expected = [b * 1000 + (t + 1) % threads for b in range(blocks) for t in range(threads)]
    assert out.tolist() == expected


@pytest.mark.parametrize("name,message", [
    ("divergent_syncthreads", r"divergent __syncthreads: thread \d+ .* at faulty_kernels.cu:\d+ while \d+ threads wait at"),
    ("exit_before_shuffle", r"lane 3 of its warp has already returned|returned while its warp waits"),
    ("exit_while_warp_waits", r"lane (1[6-9]|2\d|3[01])\) returned while its warp waits for it at __shfl_down_sync|"
                              r"but lane (1[6-9]|2\d|3[01]) of its warp has already returned"),
    ("out_of_mask_read", r"lane 15 of warp [01] reads lane 16 at __shfl_down_sync .*outside the mask"),
    ("mask_without_own_lane", r"whose mask leaves out its own lane"),
    ("deadlock", r"deadlock: every live thread waits and none can be released: threads 0-4,6-36,38-63 at "
                 r"__shfl_sync \(faulty_kernels.cu:\d+\); threads 5,37 at __syncthreads"),
    ("exit_while_block_waits", r"returned while 1 threads wait at __syncthreads|"
                               r"thread 0 .* reaches __syncthreads .* after threads [\d,-]+ returned"),
])
def test_misbehaviour_is_a_launch_error(faulty, name, message):
    error = launch(faulty, name)
    assert error.startswith("CUDA error (emulated): launch of "), error
    assert f"{name}_kernel (faulty_kernels.cu:" in error  # names the kernel and its launch
    assert re.search(message, error, re.S), error


@pytest.mark.parametrize("threads,blocks,message", [
    (2048, 1, "invalid configuration argument: 2048 threads per block"),
    (0, 1, "invalid configuration argument: a zero grid or block dimension"),
    (32, 0, "invalid configuration argument: a zero grid or block dimension"),
])
def test_invalid_launch_shapes_are_refused(faulty, threads, blocks, message):
    out = torch.full((4,), 7, dtype=torch.int32)
    assert message in launch(faulty, "plain", threads, blocks, out=out)
    assert out.tolist() == [7, 7, 7, 7]  # nothing ran


def test_parameters_over_the_limit_are_refused(faulty):
    error = launch(faulty, "oversized_parameters", 32)  # a 5,000-byte struct and a pointer
    assert "too many resources requested for launch: 5008 bytes of kernel parameters (the limit is 4096)" in error


def test_a_failed_launch_leaves_the_runtime_usable(faulty, emu: EmulatedKernels):
    assert "deadlock" in launch(faulty, "deadlock")
    assert launch(faulty, "plain", 64, 2) == ""
    total, _ = emu.grad_norm([torch.ones(9)])
    assert total.item() == 3.0
