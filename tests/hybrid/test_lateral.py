"""core.lateral: the active column's forward by hand (adapters read the KB's activations), the
supported models, and the re-initialisation from a plugin's generator."""

from __future__ import annotations

import pytest
import torch
from avalanche.models import MultiHeadClassifier
from torch import nn

from cl_plugins.core.lateral import TwoColumnNet, check_two_column_model, reinit_
from cl_plugins.models.classifier import ClassifierNet
from cl_plugins.models.heads import MaskedHead
from cl_plugins.models.mlp import MLP


def tiny_net(seed=0, activation="relu"):
    torch.manual_seed(seed)
    return ClassifierNet(MLP(3, (4, 2), activation=activation), nn.Linear(2, 2)).double()


def test_active_column_forward_by_hand():
    kb = tiny_net()
    net = TwoColumnNet(kb).double()
    with torch.no_grad():  # alpha away from its small init, so the lateral terms weigh in
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    net.column = "ac"
    x = torch.randn(5, 3, dtype=torch.float64)
    r = torch.relu
    k1, k2 = kb.backbone.layers[0], kb.backbone.layers[2]
    a1, a2 = net.ac.backbone.layers[0], net.ac.backbone.layers[2]
    g1 = r(x @ k1.weight.T + k1.bias)                      # KB layer 1
    g2 = r(g1 @ k2.weight.T + k2.bias)                     # KB features
    lat = net.lateral[0]
    h1 = r(x @ a1.weight.T + a1.bias)                      # AC layer 1: no lateral
    h2 = r(h1 @ a2.weight.T + a2.bias
           + lat.alpha * (r(g1 @ lat.V.weight.T + lat.V.bias) @ lat.U.weight.T))
    ha = net.head_adapter
    out = (h2 @ net.ac.head.weight.T + net.ac.head.bias
           + ha.alpha * (r(g2 @ ha.V.weight.T + ha.V.bias) @ ha.U.weight.T + ha.U.bias))
    got = net(x, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(got, out, atol=1e-12)
    # the lateral terms depend on the KB: changing a KB weight changes the AC's output
    with torch.no_grad():
        k1.weight.add_(1.0)
    assert not torch.allclose(net(x, torch.zeros(5, dtype=torch.long)), out)
    # no gradient reaches the KB through the adapters; the AC and adapters get one
    net(x, torch.zeros(5, dtype=torch.long)).sum().backward()
    assert all(p.grad is None for p in kb.parameters())
    assert lat.alpha.grad is not None and a1.weight.grad is not None
    # column "kb": the KB's own forward, whatever the AC
    net.column = "kb"
    assert torch.equal(net(x, 0), kb(x, 0))


def test_adapter_width_and_activation_follow_the_backbone():
    kb = tiny_net(activation="tanh")
    net = TwoColumnNet(kb, width=7)
    assert net.lateral[0].V.out_features == 7 and net.lateral[0].U.in_features == 7
    assert isinstance(net.lateral[0].act, nn.Tanh) and isinstance(net.head_adapter.act, nn.Tanh)
    assert net.kb is kb and net.ac is not kb


class ConvBackbone(nn.Module):
    out_features = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize("make,match", [
    (lambda: nn.Sequential(nn.Linear(3, 2)), "needs a ClassifierNet"),
    (lambda: ClassifierNet(ConvBackbone(), nn.Linear(4, 2)), "MLP backbones only"),
    (lambda: ClassifierNet(MLP(3, (4,), batch_norm=True), nn.Linear(4, 2)), "batch norm"),
    (lambda: ClassifierNet(MLP(3, (4,)), nn.Sequential(nn.Linear(4, 2))), "does not support "
                                                                          "the head"),
])
def test_unsupported_models_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        check_two_column_model(make(), "P")


@pytest.mark.parametrize("head", [lambda: MaskedHead(4, 3, mask="task"),
                                  lambda: MultiHeadClassifier(4, 3, masking=False)])
def test_supported_heads(head):
    check_two_column_model(ClassifierNet(MLP(3, (4, 4)), head()), "P")


def test_reinit_is_seeded_by_the_generator_and_spares_the_global_rng():
    net = TwoColumnNet(tiny_net())
    before = [p.detach().clone() for p in net.ac.parameters()]
    torch.manual_seed(5)
    reinit_(net.ac, torch.Generator().manual_seed(3))
    after_global = torch.rand(1)
    first = [p.detach().clone() for p in net.ac.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(before, first))
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after_global)  # the global RNG was not consumed
    torch.manual_seed(123)  # another global state: same result from the same generator
    reinit_(net.ac, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, p) for a, p in zip(first, net.ac.parameters()))
    reinit_(net.lateral, torch.Generator().manual_seed(3))
    assert all(0 <= float(a.min()) and float(a.max()) < 0.1 for a in
               [net.lateral[0].alpha.detach(), net.head_adapter.alpha.detach()])
