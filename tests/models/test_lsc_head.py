"""PODNet's local-similarity classifier (models.lsc_head): similarities, masking, freezing,
imprinting and the NCA loss, against explicit loops."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cl_plugins.models.lsc_head import LSCHead, kmeans, nca_loss


def _exp(classes):
    return SimpleNamespace(classes_in_this_experience=list(classes), task_labels=[0])


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) *
                                                        sum(y * y for y in b))


def _head(n_out=3, k=2, d=2):
    head = LSCHead(d, n_out, proxies=k).double()
    with torch.no_grad():
        head.proxies.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [3.0, 3.0],
                                         [0.5, -1.0], [-2.0, -0.1]], dtype=torch.float64))
    return head


def test_class_similarity_is_the_softmax_weighted_proxy_cosine():
    head = _head()
    x = torch.tensor([[2.0, 1.0], [-0.3, 0.7]], dtype=torch.float64)
    w = head.proxies.tolist()
    got = head.class_similarities(x).detach()
    for i, xi in enumerate(x.tolist()):
        for c in range(3):
            s = [_cos(xi, w[2 * c + k]) for k in range(2)]
            e = [math.exp(v) for v in s]
            assert float(got[i, c]) == pytest.approx(sum(ei / sum(e) * si
                                                         for ei, si in zip(e, s)), rel=1e-12)


def test_adaptation_unmasks_trained_classes_and_scales_the_logits():
    head = _head()
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    assert torch.all(head(x) == -1e4)  # nothing trained yet
    head.adaptation(_exp([0, 2]))
    with torch.no_grad():
        head.scale.fill_(3.0)
    z, y = head(x).detach(), head.class_similarities(x).detach()
    assert torch.allclose(z[0, [0, 2]], 3.0 * y[0, [0, 2]]) and float(z[0, 1]) == -1e4
    head.eval()
    head.adaptation(_exp([1]))  # evaluation never unmasks
    assert head.seen.tolist() == [True, False, True]
    head.train()
    with pytest.raises(ValueError, match="3 outputs but the experience holds class 3"):
        head.adaptation(_exp([3]))


def test_frozen_classes_get_no_gradient():
    head = _head()
    head.adaptation(_exp([0, 1, 2]))
    head.freeze([1])
    head(torch.tensor([[2.0, 1.0], [0.1, -1.0]], dtype=torch.float64)).sum().backward()
    g = head.proxies.grad.view(3, 2, 2)
    assert torch.all(g[1] == 0) and g[0].abs().sum() > 0 and g[2].abs().sum() > 0
    head.freeze([])
    assert not head.frozen.any()


def _nca_by_hand(z, y, margin=0.0):
    total = 0.0
    for row, t in zip(z.tolist(), y.tolist()):
        row = [v - margin if j == t else v for j, v in enumerate(row)]
        m = max(row)
        total += math.log(math.exp(m) + sum(math.exp(v) for j, v in enumerate(row) if j != t)) \
            - row[t]
    return total / len(y)


def _official_form(z, y, margin):
    """The code's steps: the margin off every column, the max off every row, the positive's
    slot zeroed in the denominator."""
    total = 0.0
    for row, t in zip(z.tolist(), y.tolist()):
        s = [v - margin for v in row]
        s = [v - max(s) for v in s]
        den = sum(math.exp(0.0 if j == t else v) for j, v in enumerate(s))
        total += -(s[t] - math.log(den))
    return total / len(y)


def test_nca_loss_is_the_official_code_s_and_the_margin_lowers_the_positive_only():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 1, 1, 2])
    assert float(nca_loss(z, y)) == pytest.approx(_nca_by_hand(z, y), rel=1e-12)
    assert float(nca_loss(z, y)) == pytest.approx(_official_form(z, y, 0.6), rel=1e-12)
    assert float(nca_loss(z, y, 0.6)) == pytest.approx(_nca_by_hand(z, y, 0.6), rel=1e-12)
    assert float(nca_loss(z, y, 0.6)) > float(nca_loss(z, y))
    masked = torch.cat([z, torch.full((5, 2), -1e4, dtype=torch.float64)], dim=1)
    assert float(nca_loss(masked, y)) == pytest.approx(float(nca_loss(z, y)), rel=1e-12)


def test_imprint_sets_normalised_means_or_centres_scaled_to_the_old_proxies():
    torch.manual_seed(0)
    head = LSCHead(2, 3, proxies=1).double()
    head.adaptation(_exp([0]))
    with torch.no_grad():
        head.proxies[0] = torch.tensor([3.0, 4.0])  # the old class: norm 5
    head.adaptation(_exp([1, 2]))
    f = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-3.0, 0.0]], dtype=torch.float64)
    head.imprint([1, 2], f, torch.tensor([1, 1, 2, 2]))
    s = 1 / math.sqrt(2)  # class 1: mean of (1, 0) and (0, 1), normalised, times 5
    assert torch.allclose(head.proxies[1], torch.tensor([5 * s, 5 * s], dtype=torch.float64))
    assert torch.allclose(head.proxies[2], torch.tensor([-5.0, 0.0], dtype=torch.float64))
    assert torch.equal(head.proxies[0], torch.tensor([3.0, 4.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="no sample of class 2"):
        head.imprint([2], f, torch.tensor([1, 1, 1, 1]))
    multi = LSCHead(2, 2, proxies=2).double()
    multi.adaptation(_exp([1]))
    pts = torch.tensor([[1.0, 0.05], [1.0, -0.05], [0.0, 1.0], [0.1, 1.0]], dtype=torch.float64)
    multi.imprint([1], pts, torch.tensor([1, 1, 1, 1]))  # no other seen class: norm 1
    unit = torch.nn.functional.normalize(pts, dim=1)
    want = {tuple(unit[:2].mean(0).tolist()), tuple(unit[2:].mean(0).tolist())}
    got = {tuple(v) for v in multi.proxies.view(2, 2, 2)[1].tolist()}
    assert {tuple(round(a, 12) for a in v) for v in got} == \
        {tuple(round(a, 12) for a in v) for v in want}


def test_kmeans_is_deterministic_and_repeats_too_few_rows():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(30, 4, generator=g, dtype=torch.float64)
    assert torch.equal(kmeans(f, 3), kmeans(f.clone(), 3))
    few = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert kmeans(few, 3).tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]


def test_build_model_lsc_head_and_its_options():
    from cl_plugins.benchmarks import build_benchmark
    from cl_plugins.models import build_model

    info = build_benchmark("split_digits", "class")
    model = build_model({"name": "mlp", "hidden": [8], "head": "lsc", "proxies": 3}, info)
    assert isinstance(model.head, LSCHead) and model.head.proxies.shape == (10 * 3, 8)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert build_model({"name": "mlp", "hidden": [8], "head": "lsc"}, info).head.k == 10
    with pytest.raises(ValueError, match="model.proxies is an option of head 'lsc'"):
        build_model({"name": "mlp", "hidden": [8], "proxies": 3}, info)
    with pytest.raises(ValueError, match="proxies"):
        LSCHead(4, 2, proxies=0)
