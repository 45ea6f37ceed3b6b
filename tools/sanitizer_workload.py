#!/usr/bin/env python3
"""A reduced CUDA workload for compute-sanitizer (memcheck, racecheck): every fastamp kernel once on
the awkward inputs of ``fastamp check`` (chunk and vector boundaries, misaligned and non-contiguous
views, hundreds of tensors, non-finite values at the edges), then a fused clipped step. Under the
sanitizer each launch is slow, so this is kept to a few launches per op. Exits 0 when it ran; the
sanitizer's own exit code reports what it found."""

from __future__ import annotations

import sys

import torch

import fastamp
from fastamp import ops
from fastamp.testing import grad_cases


def main() -> int:
    if not torch.cuda.is_available():
        print("no GPU", file=sys.stderr)
        return 2
    if not fastamp.has_cuda_kernels():
        print(f"no CUDA kernels: {fastamp.build_info()['extension_error']}", file=sys.stderr)
        return 1
    one = lambda v=0.0: torch.full((1,), v, device="cuda")  # noqa: E731
    for name, grads in grad_cases("cuda"):
        found = one()
        ops.unscale_check_(grads, found, one(0.5))
        ops.grad_norm(grads, one(0.5), found, per_tensor=True)
        ops.unscale_check_norm_(grads, found, one(2.0), per_tensor=True)
        ops.scale_(grads, one(0.25), found)
        ops.scale_(grads, one(0.25))
        print(f"ran {name}", flush=True)
    scale, tracker, hyst = one(2.0**16), torch.zeros(1, dtype=torch.int32, device="cuda"), torch.full(
        (1,), 2, dtype=torch.int32, device="cuda")
    ops.update_scale_(scale, tracker, one(1.0), 2.0, 0.5, 3, 2, hyst, 1.0, 2.0**24)
    ops.clip_coef(torch.tensor(3.0, device="cuda"), 1.0)
    model = torch.nn.Linear(64, 33).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    scaler = fastamp.GradScaler("cuda")
    scaler.scale(model(torch.randn(8, 64, device="cuda")).square().mean()).backward()
    scaler.clip_grad_norm_(optimizer, 1.0)
    scaler.step(optimizer)
    scaler.update()
    torch.cuda.synchronize()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
