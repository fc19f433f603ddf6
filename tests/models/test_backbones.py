"""Image backbones: output shapes, pinned parameter counts, structure, argument errors, seeding."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_plugins.models.alexnet import AlexNet5
from cl_plugins.models.lenet import LeNet
from cl_plugins.models.preact_resnet import PreActResNet18
from cl_plugins.models.reduced_resnet import ReducedResNet18


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- output shapes


@pytest.mark.parametrize(
    "make, shape, out",
    [
        (PreActResNet18, (2, 3, 32, 32), 512),
        (PreActResNet18, (2, 3, 64, 64), 512),
        (lambda: PreActResNet18(in_channels=1, width=8), (2, 1, 28, 28), 64),
        (ReducedResNet18, (2, 3, 32, 32), 160),
        (lambda: ReducedResNet18(nf=8), (2, 3, 64, 64), 64),
        (AlexNet5, (2, 3, 32, 32), 2048),
        (lambda: AlexNet5(in_channels=1, input_size=28, dropout=False), (2, 1, 28, 28), 2048),
        (LeNet, (2, 1, 28, 28), 84),
        (lambda: LeNet(in_channels=3, input_size=32), (2, 3, 32, 32), 84),
        (lambda: LeNet(channels=(4, 8), hidden=(32, 16)), (2, 1, 28, 28), 16),
    ],
)
def test_output_shape(make, shape, out):
    model = make()
    assert model.out_features == out
    y = model(torch.randn(*shape))
    assert y.shape == (shape[0], out)
    y.sum().backward()  # the whole graph is differentiable
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- parameter counts


def test_preact_resnet18_param_count():
    # stem 3*64*9 = 1,728
    # stage1: 2 x (bn 128 + conv 36,864 + bn 128 + conv 36,864)                        =   147,968
    # stage2: bn 128 + conv 73,728 + bn 256 + conv 147,456 + 1x1 64*128 = 8,192         =   229,760
    #         + bn 256 + conv 147,456 + bn 256 + conv 147,456                           =   295,424
    # stage3: bn 256 + 294,912 + bn 512 + 589,824 + 1x1 32,768 = 918,272; + 1,180,672   = 2,098,944
    # stage4: bn 512 + 1,179,648 + bn 1,024 + 2,359,296 + 1x1 131,072 = 3,671,552;
    #         + 1,024 + 2,359,296 + 1,024 + 2,359,296 = 4,720,640                       = 8,392,192
    # bn_last 2*512 = 1,024.  Total = 11,167,040
    assert n_params(PreActResNet18()) == 11_167_040
    # bias=True adds one bias per conv output channel: stem 64 + per stage 2 convs/block x 2 blocks
    # + one shortcut = 64 + 4*(64+128+256+512) + (128+256+512) = 64 + 3,840 + 896 = 4,800
    assert n_params(PreActResNet18(bias=True)) == 11_167_040 + 4_800


def test_reduced_resnet18_param_count():
    # nf=20: stem 3*20*9 = 540 + bn 40
    # layer1: 2 x (3,600 + 40 + 3,600 + 40)                                   =  14,560
    # layer2: 7,200 + 80 + 14,400 + 80 + shortcut (800 + 80) = 22,640; + 28,960 =  51,600
    # layer3: 28,800 + 160 + 57,600 + 160 + (3,200 + 160) = 90,080; + 115,520   = 205,600
    # layer4: 115,200 + 320 + 230,400 + 320 + (12,800 + 320) = 359,360; + 461,440 = 820,800
    # Total = 540 + 40 + 14,560 + 51,600 + 205,600 + 820,800 = 1,093,140
    assert n_params(ReducedResNet18()) == 1_093_140


def test_alexnet5_param_count():
    # conv1 3*64*16 = 3,072   bn1 128
    # conv2 64*128*9 = 73,728 bn2 256
    # conv3 128*256*4 = 131,072 bn3 512
    # fc1 (256*2*2)*2048 = 2,097,152 bn4 4,096
    # fc2 2048*2048 = 4,194,304 bn5 4,096
    # Total = 6,508,416
    assert n_params(AlexNet5()) == 6_508_416
    # GPM projects/freezes by position: 15 tensors, the weights at the official positions.
    names = [n for n, _ in AlexNet5().named_parameters()]
    assert len(names) == 15
    assert [n for n in names if n.endswith("weight") and not n.startswith("bn")] == [
        "conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc2.weight"
    ]


def test_lenet_param_count():
    # 28x28, 1 channel: conv1 1*6*25+6 = 156; conv2 6*16*25+16 = 2,416;
    # fc1 (16*4*4)*120+120 = 30,840; fc2 120*84+84 = 10,164. Total = 43,576
    assert n_params(LeNet()) == 43_576
    # 32x32, 3 channels: conv1 3*6*25+6 = 456; conv2 2,416; fc1 400*120+120 = 48,120; fc2 10,164
    assert n_params(LeNet(in_channels=3, input_size=32)) == 61_156


# ---------------------------------------------------------------- structure


def test_preact_resnet18_structure():
    model = PreActResNet18()
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in model.modules())
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1) and model.conv1.out_channels == 64
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 2 per block, 3 projection shortcuts
    assert all(c.bias is None for c in convs)
    assert all(m.bias is not None for m in PreActResNet18(bias=True).modules() if isinstance(m, nn.Conv2d))
    # Shortcuts are bare 1x1 convs (no BN) exactly where the shape changes.
    for i, stride in zip(range(1, 5), (1, 2, 2, 2)):
        first, second = getattr(model, f"stage{i}")
        assert second.shortcut is None
        if i == 1:
            assert first.shortcut is None
        else:
            assert isinstance(first.shortcut, nn.Conv2d)
            assert first.shortcut.kernel_size == (1, 1) and first.shortcut.stride == (stride, stride)
        assert first.conv1.stride == (stride, stride)


def test_preact_identity_shortcut_carries_bn_output():
    # Official Adam-NSCL block: identity shortcut adds BN1(x), not x. With conv2 zeroed the block
    # output is exactly that shortcut.
    block = PreActResNet18().stage1[1]
    block.train()
    nn.init.zeros_(block.conv2.weight)
    x = torch.randn(4, 64, 8, 8) * 3 + 2
    with torch.no_grad():
        out = block(x)
        expected = F.batch_norm(x, None, None, training=True)  # bn1 at init: weight 1, bias 0
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-1)


def test_reduced_resnet18_matches_gem_pooling_on_32x32():
    # GEM: avg_pool2d(out, 4) on the 4x4 map of a 32x32 input == our global average.
    torch.manual_seed(0)
    model = ReducedResNet18().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = F.relu(model.bn1(model.conv1(x)))
        h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
        assert h.shape[-2:] == (4, 4)
        ref = F.avg_pool2d(h, 4).flatten(1)
        assert torch.allclose(model(x), ref, atol=1e-6)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    # Projection shortcuts are conv + BN (post-activation design).
    sc = model.layer2[0].shortcut
    assert isinstance(sc[0], nn.Conv2d) and isinstance(sc[1], nn.BatchNorm2d)


def test_alexnet5_structure():
    model = AlexNet5()
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(bns) == 5 and all(not bn.track_running_stats for bn in bns)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 5 and all(m.bias is None for m in layers)
    assert [m.kernel_size for m in layers[:3]] == [(4, 4), (3, 3), (2, 2)]
    assert [m.out_channels for m in layers[:3]] == [64, 128, 256]
    assert layers[3].in_features == 256 * 2 * 2
    assert sorted(m.p for m in model.modules() if isinstance(m, nn.Dropout)) == [0.2, 0.5]
    assert not any(isinstance(m, nn.Dropout) for m in AlexNet5(dropout=False).modules())


def test_alexnet5_dropout_switch():
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    model = AlexNet5().train()
    torch.manual_seed(1)
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # dropout is active in training
    model.eval()
    assert torch.allclose(model(x), model(x))
    nodrop = AlexNet5(dropout=False).train()
    assert torch.allclose(nodrop(x), nodrop(x))


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: PreActResNet18(in_channels=0), "in_channels"),
        (lambda: PreActResNet18(in_channels=3.0), "in_channels"),
        (lambda: PreActResNet18(width=0), "width"),
        (lambda: PreActResNet18(width=True), "width"),
        (lambda: PreActResNet18(bias=1), "bias"),
        (lambda: ReducedResNet18(in_channels=-1), "in_channels"),
        (lambda: ReducedResNet18(nf=0), "nf"),
        (lambda: ReducedResNet18(nf="20"), "nf"),
        (lambda: AlexNet5(in_channels=0), "in_channels"),
        (lambda: AlexNet5(input_size=18), "input_size"),
        (lambda: AlexNet5(dropout="yes"), "dropout"),
        (lambda: LeNet(in_channels=0), "in_channels"),
        (lambda: LeNet(input_size=15), "input_size"),
        (lambda: LeNet(channels=(6,)), "channels"),
        (lambda: LeNet(channels=(6, 0)), r"channels\[1\]"),
        (lambda: LeNet(hidden=120), "hidden"),
        (lambda: LeNet(hidden=(120, 8.5)), r"hidden\[1\]"),
    ],
)
def test_bad_arguments(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_smallest_valid_input_sizes_work():
    assert AlexNet5(input_size=19, dropout=False)(torch.randn(2, 3, 19, 19)).shape == (2, 2048)
    assert LeNet(input_size=16)(torch.randn(2, 1, 16, 16)).shape == (2, 84)


@pytest.mark.parametrize(
    "model, x",
    [
        (PreActResNet18(), torch.randn(2, 1, 32, 32)),
        (ReducedResNet18(), torch.randn(2, 1, 32, 32)),
        (AlexNet5(), torch.randn(2, 1, 32, 32)),
        (LeNet(), torch.randn(2, 3, 28, 28)),
    ],
)
def test_wrong_input_channels(model, x):
    expected, found = model.in_channels, x.shape[1]
    with pytest.raises(ValueError, match=rf"expects {expected} input channels.*got {found} channels"):
        model(x)


def test_wrong_input_rank_and_size():
    with pytest.raises(ValueError, match="4-D"):
        ReducedResNet18()(torch.randn(2, 3 * 32 * 32))  # GEM's flat vectors are not accepted
    with pytest.raises(ValueError, match="input_size=32.*got 28x28"):
        AlexNet5()(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="input_size=28.*got 32x32"):
        LeNet()(torch.randn(2, 1, 32, 32))


# ---------------------------------------------------------------- seeding


@pytest.mark.parametrize("make", [PreActResNet18, ReducedResNet18, AlexNet5, LeNet])
def test_same_seed_same_parameters(make):
    torch.manual_seed(123)
    a = make()
    torch.manual_seed(123)
    b = make()
    torch.manual_seed(124)
    c = make()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_mlp_batch_norm_option():
    from cl_plugins.models.mlp import MLP

    net = MLP(12, hidden=[5, 4], bias=False, batch_norm=True, bn_eps=1e-6)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert [b.num_features for b in bns] == [5, 4] and all(b.eps == 1e-6 for b in bns)
    # order: Linear -> BN -> activation, per hidden layer
    kinds = [type(m).__name__ for m in net.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU"]
    net.train()
    h = net.layers[1](net.layers[0](torch.randn(32, 12)))
    assert torch.allclose(h.mean(0), torch.zeros(5), atol=1e-5)  # batch statistics applied
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in MLP(12, hidden=[5]).modules())
    with pytest.raises(ValueError, match="model.batch_norm"):
        MLP(12, batch_norm="yes")
    with pytest.raises(ValueError, match="model.bn_eps"):
        MLP(12, batch_norm=True, bn_eps=0.0)
