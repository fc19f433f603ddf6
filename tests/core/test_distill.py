"""cl_plugins.core.distill: the KD loss."""

from __future__ import annotations

import pytest
import torch

from cl_plugins.core.distill import kd_loss


def test_kd_t2_scaling_keeps_the_gradient_scale():
    # Near a uniform teacher, d KD / d s = J_softmax (s - q) / T^2 without the T^2 factor:
    # with it, the gradient does not depend on T.
    torch.manual_seed(0)
    q = torch.zeros(4, 5, dtype=torch.float64)
    s0 = 1e-3 * torch.randn(4, 5, dtype=torch.float64)

    def grad(T, scale):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, q, T, scale).backward()
        return s.grad

    g1, g4 = grad(1.0, True), grad(4.0, True)
    assert torch.allclose(g4, g1, rtol=1e-2, atol=0)
    ratio = grad(4.0, False).norm() / grad(1.0, False).norm()
    assert ratio == pytest.approx(1 / 16, rel=1e-2)
