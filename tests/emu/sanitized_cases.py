"""A small case set for the emulated kernels under a sanitizer: ``python tests/emu/sanitized_cases.py
--sanitize asan|ubsan|tsan`` builds the sanitized library and runs every op on it, in this process
(preloaded with the sanitizer's runtime by tests/emu/test_sanitize.py). Tensors end exactly where their
allocation ends, and misaligned views end there too, so one element read or written past the end is an
AddressSanitizer report; a misaligned 128-bit access is UndefinedBehaviorSanitizer's; a missing barrier
is ThreadSanitizer's. Results are checked against the reference as well. Exit status 0: all clean."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastamp.ops import _reference as ref  # noqa: E402
from fastamp.testing import assert_bitwise_equal, clones  # noqa: E402
from tests.emu.build import SANITIZERS, build  # noqa: E402
from tests.emu.emulator import EmulatedKernels  # noqa: E402

CHUNK = 65536


def _exact(n: int, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """n elements that end exactly at the end of their own allocation, starting `offset` elements in."""
    base = torch.empty(n + offset, dtype=torch.float32).normal_().mul_(50).to(dtype)
    return base[offset:]


def cases() -> List[List[torch.Tensor]]:
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for offset in (0, 1, 3):
            out.append([_exact(n, dtype, offset) for n in (1, 3, 5, 8, 9, 33, 4100)])
    out.append([_exact(CHUNK + 3, torch.float16, 1), _exact(7, torch.float32), _exact(CHUNK, torch.bfloat16, 5)])
    return out


def run(kernels: EmulatedKernels) -> None:
    for grads in cases():
        inv = torch.full((), 0.5)
        expected = clones(grads)
        found = torch.zeros(())
        kernels.unscale_check_(grads, found, inv)
        ref.unscale_check_(expected, torch.zeros(()), inv)
        assert_bitwise_equal(grads, expected)
        total, per = kernels.grad_norm(grads, inv, found, per_tensor=True)
        ref_total, ref_per = ref.grad_norm(grads, inv, torch.zeros(()), per_tensor=True)
        assert torch.allclose(total, ref_total.float(), rtol=5e-6) and torch.allclose(per, ref_per.float(), rtol=5e-6)
        _, _, coef, factor = kernels.clip_norm(grads, 1.0, inv, found, per_tensor=True)
        assert factor.item() == (inv * coef).item()
        kernels.unscale_check_norm_(grads, found, inv, per_tensor=True)
        ref.unscale_check_norm_(expected, torch.zeros(()), inv, per_tensor=True)
        assert_bitwise_equal(grads, expected)
        kernels.scale_(grads, torch.full((), 3.0), found)
        ref.scale_(expected, torch.full((), 3.0), torch.zeros(()))
        assert_bitwise_equal(grads, expected)
        assert found.item() == 0.0
    # Non-finite values in every block: many threads set found_inf (declared benign to ThreadSanitizer).
    poisoned = [_exact(4100, torch.float16, 1), _exact(CHUNK + 9, torch.float32)]
    poisoned[0][::7] = float("inf")
    poisoned[1][::5] = float("nan")
    for op in ("grad_norm", "unscale_check_"):
        found = torch.zeros(())
        if op == "grad_norm":
            kernels.grad_norm(poisoned, None, found)
        else:
            kernels.unscale_check_(poisoned, found, torch.full((), 0.5))
        assert found.item() == 1.0, op
    coef = kernels.clip_coef(torch.full((), 4.0), 1.0)
    assert coef.item() == ref.clip_coef(torch.full((), 4.0), 1.0).item()
    scale, growth = torch.full((), 8.0), torch.zeros((), dtype=torch.int32)
    kernels.update_scale_(scale, growth, torch.ones(()), 2.0, 0.5, 2)
    assert scale.item() == 4.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sanitize", choices=sorted(SANITIZERS), required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(EmulatedKernels(build("default", sanitize=args.sanitize)))
    print(f"sanitized cases clean under {args.sanitize}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
