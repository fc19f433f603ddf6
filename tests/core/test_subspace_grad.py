"""core.subspace_grad: the leading subspace's gradient over the singular pairs across the cut
equals torch's SVD gradient where that one is accurate, matches finite differences where torch's
fails (equal singular values inside the leading block: D1's DER + SD failure), and is zero (to
rounding) when the subspace is the whole space."""

from __future__ import annotations

import pytest
import torch

from cl_plugins.core.distill_losses import subspace_distance
from cl_plugins.core.subspace_grad import leading_subspace


def _loss(w, t):
    return (2 * w.shape[-1] - 2 * (w.transpose(-2, -1) @ t).pow(2).sum((-2, -1))).sum()


def _target(n, d, m, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    return torch.linalg.svd(x.transpose(1, 2), full_matrices=False)[0][..., :m]


@pytest.mark.parametrize("n,d,m", [(13, 20, 10), (30, 8, 5), (6, 20, 10), (12, 12, 4)])
def test_equals_torch_svd_gradient_on_separated_spectra(n, d, m):
    f = torch.randn(2, n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                    requires_grad=True)
    t = _target(n, d, m)
    ours, = torch.autograd.grad(_loss(leading_subspace(f, m), t), f)
    u = torch.linalg.svd(f.transpose(1, 2), full_matrices=False)[0][..., :m]
    ref, = torch.autograd.grad(_loss(u, t), f)
    assert leading_subspace(f, m).shape == (2, d, min(m, n, d))
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-11)


def _degenerate(n=13, d=20):
    """Rows whose two leading singular values are equal (5, 5), a clear gap at the 10th."""
    g = torch.Generator().manual_seed(3)
    q1 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([5, 5, 4, 3.5, 3, 2.5, 2.2, 2, 1.8, 1.6, 0.5, 0.4, 0.3],
                     dtype=torch.float64)[:n]
    return (q1 * s) @ q2[:, :n].T


def test_equals_finite_differences_where_torch_svd_gradient_fails():
    f0, m = _degenerate(), 10
    t = _target(13, 20, m)[:1]
    f = f0[None].clone().requires_grad_(True)
    ours, = torch.autograd.grad(_loss(leading_subspace(f, m), t), f)
    u = torch.linalg.svd(f.transpose(1, 2), full_matrices=False)[0][..., :m]
    ref, = torch.autograd.grad(_loss(u, t), f)
    assert torch.isfinite(ours).all() and ours.norm() > 0
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        d = torch.randn(f0.shape, generator=g, dtype=torch.float64)
        eps = 1e-6
        fd = (_loss(leading_subspace((f0 + eps * d)[None], m), t)
              - _loss(leading_subspace((f0 - eps * d)[None], m), t)) / (2 * eps)
        assert (ours[0] * d).sum().item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9)
    # torch's own: NaN or wrong here (its 1 / (s_1^2 - s_2^2) terms of rounding noise; torch
    # 2.x gave a finite gradient 15% off along the first direction on this matrix)
    assert not torch.isfinite(ref).all() or (ref - ours).norm() > 1e-2 * ours.norm()


def test_whole_space_has_zero_gradient():
    f = torch.randn(1, 10, 6, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(_loss(leading_subspace(f, 6), _target(10, 6, 6)[:1]), f)
    assert grad.abs().max() < 1e-14  # rounding of (I - W W^T) G: torch.svd gives noise here too


def test_subspace_distance_backward_is_finite_on_a_degenerate_class():
    """The loss the plugin uses, no noise, one class with equal leading singular values."""
    s = _degenerate().float().requires_grad_(True)
    t = torch.randn(13, 20, generator=torch.Generator().manual_seed(5))
    subspace_distance(s, t, dim=10, labels=torch.zeros(13, dtype=torch.long)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.norm() > 0


def test_non_finite_features_give_a_nan_distance_not_an_svd_error():
    """A diverged model's features: the loss is NaN (DivergenceGuard then reports the run as
    diverged), where torch.linalg.svd would raise (the run was written as failed)."""
    s = torch.randn(12, 8, requires_grad=True)
    bad = s.detach().clone()
    bad[3, 2] = float("nan")
    labels = torch.arange(12) % 2
    assert torch.isnan(subspace_distance(bad.requires_grad_(True), s.detach(), 3, labels))
    assert torch.isnan(subspace_distance(s, bad, 3, labels, noise_std=0.01))
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.svd(bad)


def test_a_tie_across_the_cut_contributes_nothing_instead_of_nan():
    """Singular values equal across the cut (s_r = s_{r+1}) in float32: the subspace is not
    defined; the pair's term is left out, the others kept (equal to a tie-free neighbour's)."""
    f = _degenerate().float()
    n, d = f.shape
    u, s, vh = torch.linalg.svd(f, full_matrices=False)
    s_tie = s.clone()
    s_tie[10] = s_tie[9]  # r = 10: tie across the cut
    f_tie = ((u * s_tie) @ vh)[None].requires_grad_(True)
    t = _target(n, d, 10)[:1].float()
    grad, = torch.autograd.grad(_loss(leading_subspace(f_tie, 10), t), f_tie)
    assert torch.isfinite(grad).all() and grad.norm() > 0


def _near_tie_across_the_cut(delta, n=13, d=20):
    """``_degenerate``'s spectrum with s_10 - s_11 = ``delta`` (r = 10), everything else fixed."""
    g = torch.Generator().manual_seed(3)
    q1 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([5, 4.5, 4, 3.5, 3, 2.5, 2.2, 2, 1.8, 1.0, 1.0 - delta, 0.4, 0.3],
                     dtype=torch.float64)
    return ((q1 * s) @ q2[:, :n].T)[None]


def _grad(f, m, t, gap_floor=0.0):
    f = f.clone().requires_grad_(True)
    return torch.autograd.grad(_loss(leading_subspace(f, m, gap_floor), t), f)[0]


def test_gap_floor_is_exact_above_the_floor_and_bounded_below_it():
    """Every gap across the cut at least the floor: the exact gradient. A gap far below it (the
    D1 DER + SD collapse): the exact gradient grows as 1 / gap, the floored one stays put."""
    t = _target(13, 20, 10)[:1]
    wide = _near_tie_across_the_cut(0.5)
    torch.testing.assert_close(_grad(wide, 10, t, gap_floor=0.1), _grad(wide, 10, t),
                               rtol=0, atol=0)
    exact = [_grad(_near_tie_across_the_cut(dl), 10, t).norm() for dl in (1e-3, 1e-5)]
    floored = [_grad(_near_tie_across_the_cut(dl), 10, t, 0.01).norm() for dl in (1e-3, 1e-5)]
    assert exact[1] / exact[0] > 50  # 1 / gap: 100x
    assert floored[1] / floored[0] == pytest.approx(1.0, rel=0.05)
    assert floored[1] < exact[1] / 500


def test_subspace_distance_rejects_a_negative_gap_floor():
    s = torch.randn(12, 8)
    with pytest.raises(ValueError, match="gap_floor"):
        subspace_distance(s, s, 3, gap_floor=-1.0)
