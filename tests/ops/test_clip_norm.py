"""clip_norm: grad_norm, the clip coefficient of its total and the combined factor, in one op."""

from __future__ import annotations

import math

import pytest
import torch

from fastamp.testing import IMPLEMENTATIONS, assert_bitwise_equal, same_bits, tolerance

SIZES = [0, 1, 7, 65535, 65536, 65537, 300]


def _grads(device, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(n, generator=g) * 40).to(dtypes[i % len(dtypes)]).to(device) for i, n in enumerate(SIZES)]


@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e9])
@pytest.mark.parametrize("with_scale", [False, True])
def test_norm_coef_and_factor(impl, device, max_norm, with_scale):
    grads = _grads(device)
    inv = torch.full((1,), 0.25, device=device) if with_scale else None
    found = torch.zeros(1, device=device)
    total, per, coef, factor = impl.clip_norm(grads, max_norm, inv, found, per_tensor=True)
    # Oracle: torch's own norm of the unscaled grads (fp64), and clip_grad_norm_'s coefficient formula.
    unscaled = [g.double() * (0.25 if with_scale else 1.0) for g in grads]
    expected_total = torch.linalg.vector_norm(torch.cat([u.reshape(-1) for u in unscaled]))
    rtol = tolerance("grad_norm", device, torch.float16)
    assert total.dtype == torch.float32 and math.isclose(total.item(), expected_total.item(), rel_tol=rtol)
    assert per is not None and torch.allclose(per.double().cpu(),
                                              torch.stack([torch.linalg.vector_norm(u) for u in unscaled]).cpu(), rtol=rtol)
    expected_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    assert coef.dtype == torch.float32 and coef.shape == () and same_bits(coef, expected_coef)
    expected_factor = inv.reshape(()) * expected_coef if with_scale else expected_coef
    assert factor.dtype == torch.float32 and same_bits(factor, expected_factor)
    assert found.item() == 0.0
    # The same total as grad_norm, bit for bit, and per-tensor norms change nothing.
    alone, _ = impl.grad_norm(grads, inv, None)
    assert same_bits(alone, total)
    assert same_bits(impl.clip_norm(grads, max_norm, inv, None)[0], total)


def test_nonfinite_sets_the_flag_and_the_coefficient_is_nan(impl, device):
    grads = _grads(device)
    grads[3][-1] = math.inf
    found = torch.zeros(1, device=device)
    total, _, coef, factor = impl.clip_norm(grads, 1.0, torch.full((1,), 0.5, device=device), found)
    assert found.item() == 1.0 and math.isinf(total.item())
    assert coef.item() == 0.0 and factor.item() == 0.0  # max_norm / inf, as clip_grad_norm_ computes it


def test_empty_list(impl, device):
    inv = torch.full((1,), 0.5, device=device)
    total, per, coef, factor = impl.clip_norm([], 2.0, inv, torch.zeros(1, device=device), per_tensor=True)
    assert total.item() == 0.0 and per.numel() == 0 and coef.item() == 1.0 and factor.item() == 0.5


def test_kernel_matches_reference_bit_for_bit_on_coef_and_factor(kernels, device):
    grads = _grads(device)
    inv = torch.full((1,), 1 / 3.0, device=device)
    ours = kernels.clip_norm(grads, 0.7, inv, torch.zeros(1, device=device))
    theirs = IMPLEMENTATIONS["reference"].clip_norm(grads, 0.7, inv, torch.zeros(1, device=device))
    assert math.isclose(ours[0].item(), theirs[0].item(), rel_tol=tolerance("grad_norm", device, torch.float16))
    coef_of_ours = IMPLEMENTATIONS["reference"].clip_coef(ours[0], 0.7).float()
    assert_bitwise_equal([ours[2], ours[3]], [coef_of_ours, inv.reshape(()) * coef_of_ours])


@pytest.mark.parametrize("bad,message", [
    (dict(max_norm=-1.0), "max_norm must be non-negative"),
    (dict(eps=-1.0), "eps must be non-negative"),
    (dict(inv_scale=torch.ones(1, dtype=torch.float64)), "inv_scale"),
])
def test_bad_input_is_refused_naming_it(impl, device, bad, message):
    args = dict(max_norm=1.0, inv_scale=None, eps=1e-6)
    args.update(bad)
    if args["inv_scale"] is not None:
        args["inv_scale"] = args["inv_scale"].to(device)
    grads = _grads(device)
    before = [g.clone() for g in grads]
    with pytest.raises((RuntimeError, ValueError), match=message):
        impl.clip_norm(grads, args["max_norm"], args["inv_scale"], None, False, args["eps"])
    assert_bitwise_equal(grads, before)
