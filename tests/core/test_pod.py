"""PODNet's pooled-output losses (core.pod) against explicit loops over channels, rows, columns."""

from __future__ import annotations

import math

import pytest
import torch

from cl_plugins.core.pod import adaptive_factor, pod_flat, pod_spatial, pod_spatial_pool


def _pool_by_hand(h):
    """Per sample: [sum_w h^2 for each (c, row)] then [sum_h h^2 for each (c, column)]."""
    n, c, hh, ww = h.shape
    out = []
    for i in range(n):
        width = [sum(float(h[i, k, r, q]) ** 2 for q in range(ww)) for k in range(c)
                 for r in range(hh)]
        height = [sum(float(h[i, k, r, q]) ** 2 for r in range(hh)) for k in range(c)
                  for q in range(ww)]
        out.append(width + height)
    return out


def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def test_spatial_pooling_sums_squares_over_width_then_height():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    got = pod_spatial_pool(h)
    assert got.shape == (2, 3 * 4 + 3 * 5)
    assert torch.allclose(got, torch.tensor(_pool_by_hand(h), dtype=torch.float64))
    # one hot entry: width pooling puts it at (c, row), height pooling at (c, column)
    one = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    one[0, 1, 2, 3] = -2.0
    v = pod_spatial_pool(one)[0]
    assert v[1 * 3 + 2] == 4.0 and v[2 * 3 + 1 * 4 + 3] == 4.0 and v.sum() == 8.0


def test_pod_spatial_is_the_mean_over_stages_and_samples_of_normalised_distances():
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64),
         torch.randn(3, 5, 2, 3, generator=g, dtype=torch.float64)]
    t = [x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in s]
    want = 0.0
    for a, b in zip(s, t):
        dists = []
        for pa, pb in zip(_pool_by_hand(a), _pool_by_hand(b)):
            ua, ub = _unit(pa), _unit(pb)
            dists.append(math.sqrt(sum((x - y) ** 2 for x, y in zip(ua, ub))))
        want += sum(dists) / len(dists)
    want /= 2
    assert float(pod_spatial(s, t)) == pytest.approx(want, rel=1e-12)
    assert float(pod_spatial(s, s)) == pytest.approx(0.0, abs=1e-12)


def test_pod_spatial_ignores_sign_and_scale_and_sends_no_gradient_to_the_teacher():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    assert float(pod_spatial([s.detach()], [-3.0 * s.detach()])) == pytest.approx(0.0, abs=1e-6)
    pod_spatial([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_pod_flat_is_one_minus_the_cosine():
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 2.0], [3.0, 4.0], [-1.0, -1.0]], dtype=torch.float64)
    # cosines 0, 1, -1 -> 1 - cos = 1, 0, 2
    assert float(pod_flat(s, t)) == pytest.approx(1.0)
    maps = torch.ones(2, 2, 2, 2)  # flattened per sample
    assert float(pod_flat(maps, 2 * maps)) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_factor_and_errors():
    assert adaptive_factor(55, 5) == pytest.approx(math.sqrt(11))
    assert adaptive_factor(4, 2) == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="n_new"):
        adaptive_factor(5, 0)
    with pytest.raises(ValueError, match="n_seen"):
        adaptive_factor(3, 5)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] maps.*\(2, 8\)"):
        pod_spatial([torch.zeros(2, 8)], [torch.zeros(2, 8)])
    with pytest.raises(ValueError, match="one teacher map per student map"):
        pod_spatial([torch.zeros(1, 1, 2, 2)], [])
    with pytest.raises(ValueError, match="embeddings"):
        pod_flat(torch.zeros(2, 3), torch.zeros(2, 4))
