"""torch.library.opcheck on CUDA: the schemas, fake kernels and the CUDA kernels agree (mutations,
aliasing, fake-tensor shapes, autograd registration). Skipped without an NVIDIA GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _grads():
    return [torch.randn(70000, device="cuda"), torch.randn(3, 5, device="cuda").half(), torch.randn(0, device="cuda"),
            torch.randn(9, device="cuda").bfloat16()]


def _one(value=0.0, dtype=torch.float32):
    return torch.full((1,), value, dtype=dtype, device="cuda")


CASES = {
    "unscale_check_": lambda: (_grads(), _one(), _one(0.5)),
    "grad_norm": lambda: (_grads(), _one(0.5), _one(), True),
    "grad_norm_no_optionals": lambda: (_grads(), None, None, False),
    "unscale_check_norm_": lambda: (_grads(), _one(), _one(0.5), True),
    "clip_coef": lambda: (torch.tensor(3.0, device="cuda"), 1.0, 1e-6),
    "scale_": lambda: (_grads(), _one(0.5), _one()),
    "update_scale_": lambda: (_one(1024.0), _one(0, torch.int32), _one(1.0), 2.0, 0.5, 3, 2, _one(2, torch.int32),
                              1.0, 65536.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck_on_cuda(case):
    import fastamp

    assert fastamp.has_cuda_kernels(), fastamp.build_info()
    op = getattr(torch.ops.fastamp, case.replace("_no_optionals", "")).default
    torch.library.opcheck(op, CASES[case]())
