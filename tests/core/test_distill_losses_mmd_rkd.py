"""NST's MMD and RKD's distance and angle losses (core.distill_losses) against explicit loops on
small tensors; gradients reach the student only."""

from __future__ import annotations

import math

import pytest
import torch

from cl_plugins.core.distill_losses import mmd2, neuron_vectors, rkd_distance
from helpers import rkd_angle


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5


def unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v] if n > 0 else [0.0] * len(v)


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


# ------------------------------------------------------------------------------ NST


def test_neuron_vectors_by_hand():
    f = torch.tensor([[[[3.0, 0.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]],
                     dtype=torch.float64)  # [1, 2, 2, 2]: channel 0 = (3, 0, 0, 4), channel 1 = 0
    v = neuron_vectors(f)
    assert v.shape == (1, 2, 4)
    want = torch.tensor([3.0, 0.0, 0.0, 4.0], dtype=torch.float64) / math.sqrt(25 + 1e-10)
    assert torch.allclose(v[0, 0], want, rtol=1e-14, atol=0)
    assert torch.equal(v[0, 1], torch.zeros(4, dtype=torch.float64))  # a dead channel stays 0
    assert neuron_vectors(torch.ones(2, 3, 5)).shape == (2, 3, 5)  # [N, C, L] maps too
    with pytest.raises(ValueError, match=r"spatial feature maps.*\(4, 6\)"):
        neuron_vectors(torch.zeros(4, 6))


def mmd2_by_loops(s, t, k):
    """Mean over samples of the biased MMD^2 between the normalised channel maps, by loops."""
    total = 0.0
    for n in range(s.shape[0]):
        a = [unit(s[n, c].flatten().tolist()) for c in range(s.shape[1])]
        b = [unit(t[n, c].flatten().tolist()) for c in range(t.shape[1])]
        ss = sum(k(x, y) for x in a for y in a) / len(a) ** 2
        tt = sum(k(x, y) for x in b for y in b) / len(b) ** 2
        st = sum(k(x, y) for x in a for y in b) / (len(a) * len(b))
        total += ss + tt - 2 * st
    return total / s.shape[0]


KERNELS = {
    "linear": ({}, lambda x, y: dot(x, y)),
    "poly": ({}, lambda x, y: dot(x, y) ** 2),  # the paper's d = 2, c = 0
    "poly_c": ({"degree": 3, "c": 0.5}, lambda x, y: (dot(x, y) + 0.5) ** 3),
    "gaussian": ({"sigma": 0.7},
                 lambda x, y: math.exp(-sum((a - b) ** 2 for a, b in zip(x, y)) / (2 * 0.49))),
}


@pytest.mark.parametrize("case", list(KERNELS))
def test_mmd2_matches_the_loops_and_only_the_student_gets_a_gradient(case):
    kwargs, k = KERNELS[case]
    kernel = case.split("_")[0]
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)  # 2 ch.
    value = mmd2(s, t, kernel=kernel, **kwargs)
    assert value.item() == pytest.approx(mmd2_by_loops(s.detach(), t.detach(), k), rel=1e-9)
    assert value.item() > 1e-3
    value.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda x: mmd2(x, t.detach(), kernel=kernel, **kwargs),
                                    (s.detach().clone().requires_grad_(),))
    assert mmd2(s, s.detach() * 3.0, kernel=kernel, **kwargs).item() == pytest.approx(0, abs=1e-12)


def test_mmd2_linear_is_the_distance_of_the_mean_neuron_vectors():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    diff = neuron_vectors(s).mean(1) - neuron_vectors(t).mean(1)
    assert mmd2(s, t, kernel="linear").item() == pytest.approx(
        diff.pow(2).sum(1).mean().item(), rel=1e-5)


def test_mmd2_poly_compares_the_spatial_gram_matrices():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    a, b = neuron_vectors(s), neuron_vectors(t)  # [N, C, HW]
    gs = a.transpose(1, 2) @ a / a.shape[1]
    gt = b.transpose(1, 2) @ b / b.shape[1]
    assert mmd2(s, t).item() == pytest.approx((gs - gt).pow(2).sum((1, 2)).mean().item(),
                                              rel=1e-5)


def test_mmd2_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="spatial sizes differ"):
        mmd2(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 2, 2))
    with pytest.raises(ValueError, match="one row per sample"):
        mmd2(torch.ones(2, 3, 4), torch.ones(3, 3, 4))
    with pytest.raises(ValueError, match="kernel must be one of"):
        mmd2(torch.ones(2, 3, 4), torch.ones(2, 3, 4), kernel="rbf")


# ------------------------------------------------------------------------------ RKD


def rkd_distance_by_loops(s, t):
    def psi(f):
        n = len(f)
        d = [[math.dist(f[i], f[j]) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mu for j in range(n)] for i in range(n)]

    ps, pt = psi(s.tolist()), psi(t.tolist())
    n = len(ps)
    return sum(huber(ps[i][j] - pt[i][j]) for i in range(n) for j in range(n)) / n ** 2


def rkd_angle_by_loops(s, t):
    def cosines(f):
        n = len(f)
        out = {}
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    e1 = unit([a - b for a, b in zip(f[i], f[j])])  # 0 where f_i = f_j
                    e2 = unit([a - b for a, b in zip(f[k], f[j])])
                    out[j, i, k] = dot(e1, e2)
        return out

    cs, ct = cosines(s.tolist()), cosines(t.tolist())
    return sum(huber(cs[key] - ct[key]) for key in cs) / len(cs)


def rkd_pair(seed, n=5, d=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_()
    return s, t


@pytest.mark.parametrize("scale", [1.0, 4.0])  # 4.0: some differences beyond Huber's delta 1
def test_rkd_distance_matches_the_loops(scale):
    s, t = rkd_pair(2, scale=scale)
    value = rkd_distance(s, t)
    assert value.item() == pytest.approx(rkd_distance_by_loops(s.detach(), t.detach()),
                                         rel=1e-9)
    value.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda x: rkd_distance(x, t.detach()),
                                    (s.detach().clone().requires_grad_(),))
    # invariant to scaling either embedding (distances are divided by their mean)
    assert rkd_distance(3 * s, t).item() == pytest.approx(value.item(), rel=1e-9)


def test_rkd_angle_matches_the_loops_with_repeated_and_zero_rows():
    s, t = rkd_pair(3, n=6, d=4)
    with torch.no_grad():
        s[4] = s[1]  # a repeated sample: its differences are 0, so are their cosines
        s[5] = 0.0
        t[2] = t[0]
    value = rkd_angle(s, t)
    assert value.item() == pytest.approx(rkd_angle_by_loops(s.detach(), t.detach()), rel=1e-9)
    value.backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_rkd_angle_gradient_and_invariances():
    s, t = rkd_pair(4, n=5, d=3, scale=2.0)
    value = rkd_angle(s, t)
    assert value.item() == pytest.approx(rkd_angle_by_loops(s.detach(), t.detach()), rel=1e-9)
    assert torch.autograd.gradcheck(lambda x: rkd_angle(x, t.detach()),
                                    (s.detach().clone().requires_grad_(),))
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    moved = 2.5 * s.detach() @ q + 1.0  # rotated, scaled, shifted: the same angles
    assert rkd_angle(moved, t).item() == pytest.approx(value.item(), rel=1e-9)
    # float32 features give float32 cosines, computed in float64 inside
    assert rkd_angle(s.float(), t.float()).dtype == torch.float32


def test_rkd_losses_with_too_few_rows_are_zero_with_a_gradient():
    s = torch.ones(2, 3, requires_grad=True)
    assert rkd_angle(s, torch.zeros(2, 3)).item() == 0.0
    assert rkd_distance(s[:1], torch.zeros(1, 3)).item() == 0.0
    rkd_angle(s, torch.zeros(2, 3)).backward()  # a graph exists, the gradient is 0
    assert torch.equal(s.grad, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one row per sample"):
        rkd_distance(torch.ones(3, 2), torch.ones(4, 2))
