"""RGO's Feature Encoding Layer and the two FEL networks (fel_mlp, resnet18_nobn)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_plugins.core.layer_inputs import protected_layers
from cl_plugins.models import FELMLP, FeatureEncodingLayer, ResNet18NoBN, build_model


def _info(shape=(1, 8, 8), scenario="task", n_outputs=3):
    return SimpleNamespace(input_shape=shape, scenario=scenario, task_labels=scenario == "task",
                           n_outputs=n_outputs)


def test_permutation_deterministic_per_seed_and_task_identity_at_task_0():
    a, b = FeatureEncodingLayer(50, seed=3), FeatureEncodingLayer(50, seed=3)
    assert torch.equal(a.permutation(0), torch.arange(50))
    for t in (1, 2, 7):
        assert torch.equal(a.permutation(t), b.permutation(t))
        assert torch.equal(torch.sort(a.permutation(t)).values, torch.arange(50))
    assert not torch.equal(a.permutation(1), a.permutation(2))
    assert not torch.equal(a.permutation(1), FeatureEncodingLayer(50, seed=4).permutation(1))
    # the same (seed, task) gives the same permutation whatever else was drawn before
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(FeatureEncodingLayer(50, seed=3).permutation(2), a.permutation(2))


def test_permutation_is_orthogonal_and_is_what_forward_applies():
    fel = FeatureEncodingLayer(6, seed=1)
    m = fel.matrix(2)
    torch.testing.assert_close(m @ m.T, torch.eye(6), rtol=0, atol=0)
    assert torch.equal(m.sum(0), torch.ones(6)) and torch.equal(m.sum(1), torch.ones(6))
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(fel(x, 2), x @ m.double(), rtol=0, atol=0)
    assert torch.equal(fel(x, 0), x)
    # conv maps: channels permuted, the same permutation at every position
    maps = torch.randn(2, 6, 3, 3)
    out = fel(maps, 2)
    for c, src in enumerate(fel.permutation(2).tolist()):
        assert torch.equal(out[:, c], maps[:, src])
    # norms are preserved (orthogonal) and mixed-task batches are handled per sample
    assert torch.allclose(out.norm(), maps.norm())
    labels = torch.tensor([0, 2, 1, 2])
    mixed = fel(x, labels)
    for i, t in enumerate(labels.tolist()):
        assert torch.equal(mixed[i:i + 1], fel(x[i:i + 1], t))


def test_disabled_layer_is_identity_and_missing_labels_raise():
    x = torch.randn(3, 5)
    assert torch.equal(FeatureEncodingLayer(5, 0, enabled=False)(x, 4), x)
    assert torch.equal(FeatureEncodingLayer(5, 0, enabled=False)(x), x)
    with pytest.raises(ValueError, match="needs the task labels"):
        FeatureEncodingLayer(5, 0)(x)
    with pytest.raises(ValueError, match="dimension 1 must have 5"):
        FeatureEncodingLayer(5, 0)(torch.randn(3, 4), 1)
    with pytest.raises(ValueError, match="width must be"):
        FeatureEncodingLayer(0, 0)


def test_fel_mlp_same_permutation_per_width_and_manual_forward():
    torch.manual_seed(0)
    net = FELMLP(input_size=12, hidden=[7, 7, 5], fel_seed=11)
    x = torch.randn(4, 12)
    for t in (0, 3):
        p7, p5 = net.fels[0].permutation(t), net.fels[2].permutation(t)
        assert torch.equal(p7, net.fels[1].permutation(t))  # same width, same permutation
        h = torch.relu(net.fcs[0](x))[:, p7]
        h = torch.relu(net.fcs[1](h))[:, p7]
        h = torch.relu(net.fcs[2](h))[:, p5]
        torch.testing.assert_close(net(x, t), h, rtol=0, atol=0)


def test_identical_outputs_in_train_and_eval_mode():
    torch.manual_seed(0)
    mlp = build_model({"name": "fel_mlp", "hidden": [16, 16], "head": "linear"}, _info())
    res = build_model({"name": "resnet18_nobn", "nf": 4, "head": "linear"},
                      _info((3, 16, 16)))
    for net, x in ((mlp, torch.randn(5, 1, 8, 8)), (res, torch.randn(2, 3, 16, 16))):
        for t in (0, 1, 4):
            net.train()
            a = net(x, t)
            net.eval()
            b = net(x, t)
            assert torch.equal(a, b)


def test_build_model_routes_task_labels_and_fel_false_is_same_net():
    torch.manual_seed(5)
    with_fel = build_model({"name": "fel_mlp", "hidden": [16, 16], "head": "linear"}, _info())
    torch.manual_seed(5)
    without = build_model({"name": "fel_mlp", "hidden": [16, 16], "head": "linear",
                           "fel": False}, _info())
    for (n, p), (_, q) in zip(with_fel.named_parameters(), without.named_parameters()):
        assert torch.equal(p, q), n
    x = torch.randn(6, 1, 8, 8)
    # task 0: identity encoding, same outputs; other tasks differ only with FEL
    assert torch.equal(with_fel(x, 0), without(x, 0))
    assert not torch.allclose(with_fel(x, 1), without(x, 1))
    assert torch.equal(without(x, 1), without(x, 3))
    # the routed labels equal an explicit backbone call; they are cleared after the call
    feats = with_fel.backbone(x, 2)
    torch.testing.assert_close(with_fel(x, 2), with_fel.head(feats), rtol=0, atol=0)
    torch.testing.assert_close(with_fel(x, torch.full((6,), 2)), with_fel(x, 2))
    with pytest.raises(ValueError, match="needs the task labels"):
        with_fel.backbone(x)
    # copies route to their own backbone
    twin = copy.deepcopy(with_fel)
    torch.testing.assert_close(twin(x, 2), with_fel(x, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fel=true needs task labels"):
        build_model({"name": "fel_mlp", "hidden": [8]}, _info(scenario="domain"))
    build_model({"name": "fel_mlp", "hidden": [8], "fel": False}, _info(scenario="domain"))


def test_routed_labels_cleared_when_the_forward_raises_after_the_backbone():
    torch.manual_seed(0)
    net = build_model({"name": "fel_mlp", "hidden": [16], "head": "multihead"}, _info())
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(KeyError):  # task 3 has no head yet: raises after the FEL backbone ran
        net(x, 3)
    # a later plain backbone call (as LwF / iCaRL make) must not use task 3's permutation
    with pytest.raises(ValueError, match="needs the task labels"):
        net.backbone(x)
    torch.testing.assert_close(net(x, 0), net.head(net.backbone(x, 0), 0), rtol=0, atol=0)


def test_fel_seed_drawn_from_the_run_seed_and_kept_in_state_dict():
    torch.manual_seed(1)
    a = FELMLP(10, [8])
    torch.manual_seed(1)
    b = FELMLP(10, [8])
    torch.manual_seed(2)
    c = FELMLP(10, [8])
    assert a.fels[0].seed == b.fels[0].seed != c.fels[0].seed
    c.load_state_dict(a.state_dict())
    assert c.fels[0].seed == a.fels[0].seed
    x = torch.randn(3, 10)
    torch.testing.assert_close(c(x, 3), a(x, 3), rtol=0, atol=0)


def test_resnet18_nobn_structure_and_block_placement():
    torch.manual_seed(0)
    net = ResNet18NoBN(in_channels=3, nf=4, fel_seed=9)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (1, 1)
    assert net.conv1.padding == (3, 3) and net.out_features == 32
    shortcuts = [b.shortcut for stage in net.layers for b in stage]
    assert shortcuts[0] is None and shortcuts[1] is None
    assert [s.kernel_size for s in shortcuts[2::2]] == [(1, 1)] * 3
    assert all(s.stride == (2, 2) for s in shortcuts[2::2])
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))
    layers, norms = protected_layers(nn.ModuleDict({"backbone": net}))
    assert len(layers) == 1 + 16 + 3 and not norms
    # a block: ReLU(FEL(conv2(FEL(ReLU(conv1 x)))) + shortcut(x)): the shortcut is not permuted
    block = net.layers[1][0]
    x = torch.randn(2, 4, 8, 8)
    perm = block.fel1.permutation(2)
    inner = block.conv2(torch.relu(block.conv1(x))[:, perm])[:, perm]
    torch.testing.assert_close(block(x, 2), torch.relu(inner + block.shortcut(x)),
                               rtol=0, atol=0)
    assert net(torch.randn(2, 3, 16, 16), 1).shape == (2, 32)
    # "code" init: conv bounds 1/sqrt(k * in_channels)
    assert float(net.layers[3][1].conv2.weight.detach().abs().max()) <= (3 * 32) ** -0.5
    torch.manual_seed(0)
    plain = ResNet18NoBN(in_channels=3, nf=4, fel=False, fel_seed=1)
    for (n, p), (_, q) in zip(net.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="model.init must be one of"):
        ResNet18NoBN(init="he")
