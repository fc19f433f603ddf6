"""core.rkd_angle: RKD's angle loss with its hand-written backward pass against the autograd
formula of helpers.rkd_angle (itself checked against triple loops in
test_distill_losses_mmd_rkd.py): the same value and gradient in float64, repeated and zero rows
included; a finite-difference gradient check; float32 gradients within float32 rounding of the
float64 ones even for embeddings far from the origin; invariances; edge cases."""

from __future__ import annotations

import pytest
import torch

from cl_plugins.core.rkd_angle import all_cosines, angle_factors, rkd_angle_loss
from helpers import rkd_angle


def pair(seed, n, d, scale=1.0, offset=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = offset + torch.randn(n, d, generator=g, dtype=torch.float64)
    t = offset + scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    return s.to(dtype), t.to(dtype)


def value_and_grad(fn, s, t, weight=1.0):
    x = s.clone().requires_grad_()
    v = fn(x, t)
    (weight * v).backward()
    return v.item(), x.grad


@pytest.mark.parametrize("scale", [1.0, 4.0])  # 4.0: differences beyond Huber's delta 1
def test_value_and_gradient_equal_the_autograd_formula_with_repeated_and_zero_rows(scale):
    s, t = pair(0, 9, 5, scale)
    s[4], s[5], t[2] = s[1], 0.0, t[0]  # a repeated row, a zero row, a repeated teacher row
    ref_v, ref_g = value_and_grad(rkd_angle, s, t, weight=3.0)
    v, g = value_and_grad(rkd_angle_loss, s, t, weight=3.0)
    assert v == pytest.approx(ref_v, rel=1e-12)
    assert torch.allclose(g, ref_g, rtol=1e-10, atol=1e-14)
    assert g.abs().sum() > 0


def test_finite_differences():
    s, t = pair(1, 6, 3, scale=2.0)
    assert torch.autograd.gradcheck(lambda x: rkd_angle_loss(x, t),
                                    (s.clone().requires_grad_(),))


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (100.0, 0.1), (0.0, 1e-3)])
def test_float32_gradients_are_float32_accurate_far_from_the_origin(offset, spread):
    s, t = pair(2, 64, 50, scale=1.1 * spread, offset=offset)
    s = offset + (s - offset) * spread
    s32, t32 = s.float(), t.float()
    # the reference: the float64 formula on the float32-rounded embeddings
    ref_v, ref_g = value_and_grad(rkd_angle, s32.double(), t32.double())
    v, g = value_and_grad(rkd_angle_loss, s32, t32)
    assert g.dtype == torch.float32
    assert (g.double() - ref_g).norm() / ref_g.norm() < 1e-6
    assert v == pytest.approx(ref_v, rel=1e-5)


def test_cosines_are_the_triplet_angles_and_invariant_to_rotation_scale_and_shift():
    s, _ = pair(3, 7, 4)
    c = all_cosines(*angle_factors(s, torch.float64))
    j, i, k = 2, 5, 0
    e1, e2 = s[i] - s[j], s[k] - s[j]
    assert c[j, i, k].item() == pytest.approx((e1 @ e2 / e1.norm() / e2.norm()).item(), rel=1e-12)
    assert torch.all(c[torch.arange(7), torch.arange(7)] == 0)  # i = j
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    moved = all_cosines(*angle_factors(2.5 * s @ q + 7.0, torch.float64))
    assert torch.allclose(moved, c, atol=1e-12)


def test_edge_cases():
    s = torch.ones(2, 3, requires_grad=True)
    loss = rkd_angle_loss(s, torch.zeros(2, 3))
    assert loss.item() == 0.0
    loss.backward()  # a graph exists, the gradient is 0
    assert torch.equal(s.grad, torch.zeros(2, 3))
    same = torch.ones(5, 3, requires_grad=True)  # every row coincides: every cosine is 0
    rkd_angle_loss(same, torch.randn(5, 3)).backward()
    assert torch.isfinite(same.grad).all()
    with pytest.raises(ValueError, match="one row per sample"):
        rkd_angle_loss(torch.ones(3, 2), torch.ones(4, 2))
    t = torch.randn(4, 2, requires_grad=True)
    rkd_angle_loss(torch.randn(4, 2, requires_grad=True), t).backward()
    assert t.grad is None  # the teacher is a constant
