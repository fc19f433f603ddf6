"""The 32-layer CIFAR ResNet (models.resnet32): size, stages, shortcuts, PODNet's variant."""

from __future__ import annotations

import pytest
import torch

from cl_plugins.models.resnet32 import ResNet32


def test_parameter_count_by_hand():
    # conv1 3*16*9 = 432, bn1 32
    # stage1: 5 x (2 convs 16*16*9 = 2,304 + 2 BN 32)                       =  23,360
    # stage2: 16*32*9 + 32*32*9 + 2 BN 64 = 13,952; + 4 x (2 * 9,216 + 128)  =  88,192
    # stage3: 32*64*9 + 64*64*9 + 2 BN 128 = 55,552; + 4 x (2 * 36,864 + 256) = 351,488
    assert sum(p.numel() for p in ResNet32().parameters()) == 432 + 32 + 23_360 + 88_192 + 351_488
    assert sum(p.numel() for p in ResNet32().parameters()) == 463_504
    assert len([m for m in ResNet32().modules() if isinstance(m, torch.nn.Conv2d)]) == 31


def test_stages_and_output_shapes():
    model = ResNet32(nf=4)
    seen = {}
    for name in ("stage1", "stage2", "stage3.3", "stage3.4"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape)))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16) and model.out_features == 16
    assert seen == {"stage1": (2, 4, 32, 32), "stage2": (2, 8, 16, 16),
                    "stage3.3": (2, 16, 8, 8), "stage3.4": (2, 16, 8, 8)}
    assert ResNet32(in_channels=1, nf=4)(torch.randn(2, 1, 28, 28)).shape == (2, 16)
    with pytest.raises(ValueError, match="in_channels"):
        ResNet32(in_channels=0)


def test_zero_residual_blocks_start_as_their_shortcut():
    torch.manual_seed(0)
    model = ResNet32(nf=4, block_relu=False).eval()
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(model.stage1(x), x)  # every block: 0 * branch + identity
    y = model.stage2[0](x)  # strided: every other pixel, the new channels zero (option A)
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2])
    assert torch.equal(y[:, 4:], torch.zeros(2, 4, 4, 4))


def test_block_relu_false_keeps_pre_activation_features():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    plain = ResNet32(nf=4, zero_residual=False).eval()
    podnet = ResNet32(nf=4, zero_residual=False, block_relu=False).eval()
    podnet.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert float(plain(x).min()) >= 0.0 and float(podnet(x).min()) < 0.0


def test_registered_as_a_backbone_with_its_conv_stages():
    from cl_plugins.benchmarks import build_benchmark
    from cl_plugins.core.conv_stages import conv_stages
    from cl_plugins.models import build_model

    info = build_benchmark("split_digits", "class", pad_to_32=True)
    model = build_model({"name": "resnet32", "nf": 4}, info)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert conv_stages(model) == ["backbone.conv1", "backbone.stage1", "backbone.stage2",
                                  "backbone.stage3"]
