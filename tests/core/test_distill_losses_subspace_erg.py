"""subspace_distance (subspace distillation) and erg_triplet_mask / erg_angle_loss (the exemplar
relation loss) against hand computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cl_plugins.core.distill_losses import (erg_angle_loss, erg_triplet_mask, subspace_distance,
                                            triplet_cosines)

# ------------------------------------------------------------------------ subspace distance


def test_two_known_bases():
    # rows are samples; the features of s span {e1, e2}, those of t span {e1, e3}
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # ||P_s^T P_t||_F^2 = 1 (the shared e1): 2 * 2 - 2 * 1
    assert subspace_distance(s, t, dim=2).item() == pytest.approx(2.0, abs=1e-6)
    theta = 0.3  # t spans {e1, cos(theta) e2 + sin(theta) e3}: ||.||^2 = 1 + cos^2(theta)
    t2 = torch.tensor([[3.0, 0.0, 0.0], [0.0, math.cos(theta), math.sin(theta)]])
    assert subspace_distance(s, t2, dim=2).item() == pytest.approx(2 * math.sin(theta) ** 2,
                                                                   abs=1e-6)
    # orthogonal subspaces: the largest value, 2r
    t3 = torch.tensor([[0.0, 0.0, 1.0]])
    assert subspace_distance(s[:1], t3, dim=1).item() == pytest.approx(2.0, abs=1e-6)


def test_only_the_leading_dim_directions_count():
    # s: large spread along e1, then e2, tiny along e3; t: e2 first, then e1
    s = torch.tensor([[10.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.1]])
    t = torch.tensor([[0.0, 10.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.1]])
    assert subspace_distance(s, t, dim=1).item() == pytest.approx(2.0, abs=1e-5)  # e1 vs e2
    assert subspace_distance(s, t, dim=2).item() == pytest.approx(0.0, abs=1e-5)  # both {e1, e2}
    assert subspace_distance(s, t, dim=3).item() == pytest.approx(0.0, abs=1e-5)


def test_invariant_to_what_does_not_change_the_subspace():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64)
    # mixing the samples (an invertible 4 x 4 map) and scaling keep the span of the 4 rows
    mix = torch.randn(4, 4, generator=g, dtype=torch.float64) + 4 * torch.eye(4)
    assert subspace_distance(s, 3.0 * mix @ s, dim=4).item() == pytest.approx(0.0, abs=1e-9)
    # a rotation inside the plane {e1, e2}, applied to features that live in that plane
    p = torch.zeros(5, 6, dtype=torch.float64)
    p[:, :2] = torch.randn(5, 2, generator=g, dtype=torch.float64)
    c, sn = math.cos(0.7), math.sin(0.7)
    rot = torch.eye(6, dtype=torch.float64)
    rot[:2, :2] = torch.tensor([[c, -sn], [sn, c]], dtype=torch.float64)
    assert subspace_distance(p, p @ rot.t(), dim=2).item() == pytest.approx(0.0, abs=1e-9)
    # identical features (rows permuted), no noise: 0
    assert subspace_distance(s, s[[2, 0, 3, 1]], dim=3).item() == pytest.approx(0.0, abs=1e-9)


def test_class_wise_mean_and_fewer_samples_than_dim():
    # class 0 (rows 0, 2): s spans {e1, e2}, t spans {e1, e3} -> 2 * 2 - 2 * 1 = 2
    # class 1 (rows 1, 3, 4): identical -> 0
    # class 7 (row 5): one sample each, r = 1: 2 - 2 cos^2 = 2 - 2 * (1/2) = 1
    s = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 1.0, 0, 0], [0, 0, 1.0, 1.0],
                      [1.0, 1.0, 0, 0], [1.0, 0, 0, 0]])
    t = s.clone()
    t[2] = torch.tensor([0, 0, 1.0, 0])
    t[5] = torch.tensor([1.0, 1.0, 0, 0])
    labels = torch.tensor([0, 1, 0, 1, 1, 7])
    expected = (2.0 + 0.0 + 1.0) / 3
    got = subspace_distance(s, t, dim=10, labels=labels)  # r_k = n_k < dim for every class
    assert got.item() == pytest.approx(expected, abs=1e-5)
    # one subspace over every row: 6 rows in R^4, dim 10 -> r = 4, both span R^4 -> 0
    assert subspace_distance(s, t, dim=10).item() == pytest.approx(0.0, abs=1e-5)


def test_class_wise_equals_the_mean_of_per_class_distances():
    g = torch.Generator().manual_seed(9)
    s = torch.randn(11, 7, generator=g, dtype=torch.float64)
    t = torch.randn(11, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([3, 1, 3, 0, 1, 3, 0, 0, 3, 1, 5])  # sizes 4, 3, 3, 1
    per_class = []
    for c in (0, 1, 3, 5):
        rows = [i for i in range(11) if labels[i] == c]
        us = torch.linalg.svd(s[rows].t(), full_matrices=False)[0][:, :2]
        ut = torch.linalg.svd(t[rows].t(), full_matrices=False)[0][:, :2]
        per_class.append(2 * us.shape[1] - 2 * float(((us.t() @ ut) ** 2).sum()))
    got = subspace_distance(s, t, dim=2, labels=labels).item()
    assert got == pytest.approx(sum(per_class) / 4, abs=1e-10)


def test_noise_is_drawn_from_the_generator():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 5, generator=g)
    t = torch.randn(6, 5, generator=g)
    gen = torch.Generator().manual_seed(11)
    copy = torch.Generator().manual_seed(11)
    noise = torch.randn((2, 6, 5), generator=copy) * 0.5
    by_hand = subspace_distance(s + noise[0], t + noise[1], dim=2)
    got = subspace_distance(s, t, dim=2, noise_std=0.5, generator=gen)
    assert got.item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert torch.equal(gen.get_state(), copy.get_state())  # one draw of 2 x 6 x 5 numbers
    with pytest.raises(ValueError, match="dim"):
        subspace_distance(s, t, dim=0)
    with pytest.raises(ValueError, match="noise_std"):
        subspace_distance(s, t, noise_std=-1.0)


def test_gradient_flows_to_the_student_only_and_matches_finite_differences():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 2])  # classes of 4, 3 and 1 rows
    d = subspace_distance(s, t, dim=2, labels=labels)
    d.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda a: subspace_distance(a, t, dim=2, labels=labels),
                                    (s.detach().clone().requires_grad_(True),))


# ------------------------------------------------------------------ exemplar relation loss


def _triplets_by_loops(labels, cross_class):
    out = []
    n = len(labels)
    for j, i, k in itertools.product(range(n), repeat=3):
        if len({i, j, k}) < 3 or not i < k:
            continue
        if cross_class and len({labels[i], labels[j], labels[k]}) < 3:
            continue
        out.append((j, i, k))
    return out


def test_triplet_mask_by_hand():
    labels = [0, 0, 1, 2]
    for cross in (False, True):
        mask = erg_triplet_mask(torch.tensor(labels), cross)
        assert sorted(map(tuple, mask.nonzero().tolist())) == _triplets_by_loops(labels, cross)
    assert int(erg_triplet_mask(torch.tensor(labels)).sum()) == 4 * 3  # vertex x pair of others
    # the node sets with three labels: {0, 2, 3} and {1, 2, 3}, three vertices each
    assert int(erg_triplet_mask(torch.tensor(labels), True).sum()) == 6


def _cos_at(p, i, j, k):
    a = [p[i][d] - p[j][d] for d in range(len(p[0]))]
    b = [p[k][d] - p[j][d] for d in range(len(p[0]))]
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _huber(x):
    return 0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5


def test_angle_loss_by_hand():
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]  # teacher: a unit square
    s = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -0.5]]  # student: node 3 moved across
    labels = [0, 1, 2, 0]
    for cross in (False, True):
        trip = _triplets_by_loops(labels, cross)
        expected = sum(_huber(_cos_at(s, i, j, k) - _cos_at(t, i, j, k))
                       for j, i, k in trip) / len(trip)
        mask = erg_triplet_mask(torch.tensor(labels), cross)
        got = erg_angle_loss(torch.tensor(s), torch.tensor(t), mask)
        assert got.item() == pytest.approx(expected, abs=1e-6)
    # some triplet's cosine moved by more than 1: the linear branch of the Huber loss is used
    assert max(abs(_cos_at(s, i, j, k) - _cos_at(t, i, j, k))
               for j, i, k in _triplets_by_loops(labels, False)) > 1


def test_angle_loss_properties():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(6, 4, generator=g)
    mask = erg_triplet_mask(torch.tensor([0, 0, 1, 1, 2, 2]))
    # angles survive a similarity transform (scale, rotation, shift)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    s = (3.0 * t @ q + 1.5).requires_grad_(True)
    assert erg_angle_loss(s, t, mask).item() == pytest.approx(0.0, abs=1e-5)
    # the selected cosines are those of triplet_cosines, rows (i, j, k)
    from cl_plugins.core.distill_losses import _all_angles

    jik = mask.nonzero()
    assert torch.allclose(_all_angles(t)[mask], triplet_cosines(t, jik[:, [1, 0, 2]]), atol=1e-6)
    # the teacher gets no gradient; an empty mask gives a zero that still backpropagates
    t.requires_grad_(True)
    erg_angle_loss(s * torch.linspace(1, 2, 6).unsqueeze(1), t, mask).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    empty = erg_triplet_mask(torch.tensor([0, 0, 1]), cross_class=True)  # two labels only
    assert not empty.any()
    z = erg_angle_loss(s[:3], t[:3], empty)
    assert z.item() == 0.0 and z.requires_grad
    with pytest.raises(ValueError, match="triplet mask must be"):
        erg_angle_loss(s, t, mask[:5, :5, :5])
