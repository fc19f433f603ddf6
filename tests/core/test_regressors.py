"""core.regressors: which regressor a pair of shapes gets, its output against loops by hand, the
set that builds them on first sight, its state, and taking parameters out of an optimizer."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from cl_plugins.core.regressors import RegressorSet, build_regressor, remove_params


@pytest.mark.parametrize("s, t, kind, out", [
    ((5,), (3,), nn.Linear, None),
    ((4, 6, 6), (8, 6, 6), nn.Conv2d, (1, 1)),  # equal spatial size: 1x1 convolution
    ((4, 6, 7), (8, 4, 3), nn.Conv2d, (3, 5)),  # FitNets: H_s - H_t + 1, W_s - W_t + 1
])
def test_kind_and_output_shape(s, t, kind, out):
    reg = build_regressor(s, t)
    assert type(reg) is kind
    if out is not None:
        assert reg.kernel_size == out and reg.in_channels == s[0] and reg.out_channels == t[0]
    assert tuple(reg(torch.randn((2,) + s)).shape) == (2,) + t


def test_equal_shapes_need_no_regressor_and_relu_ends_it():
    assert build_regressor((4, 3, 3), [4, 3, 3]) is None
    reg = build_regressor((5,), (3,), relu=True)
    assert isinstance(reg, nn.Sequential) and isinstance(reg[1], nn.ReLU)
    torch.manual_seed(0)
    assert (reg(torch.randn(50, 5)) >= 0).all()


@pytest.mark.parametrize("s, t, match", [
    ((4, 3, 3), (4, 5, 5), r"where: the student's map \[4, 3, 3\] is smaller than the teacher's "
                           r"\[4, 5, 5\]"),
    ((4, 3, 3), (36,), r"where: no regressor maps the student's features of shape \[4, 3, 3\] to "
                       r"the teacher's \[36\]"),
    ((4, 9), (4, 3), r"both must be vectors \[D\] or both maps \[C, H, W\]"),
])
def test_shapes_no_regressor_can_map(s, t, match):
    with pytest.raises(ValueError, match=match):
        build_regressor(s, t, where="where")


def test_conv_regressor_against_loops():
    torch.manual_seed(0)
    reg = build_regressor((2, 4, 3), (3, 2, 2))  # kernel 3 x 2
    x = torch.randn(1, 2, 4, 3)
    w, b = reg.weight.detach(), reg.bias.detach()
    want = torch.zeros(1, 3, 2, 2)
    for o in range(3):
        for i in range(2):
            for j in range(2):
                acc = b[o].item()
                for c in range(2):
                    for u in range(3):
                        for v in range(2):
                            acc += w[o, c, u, v].item() * x[0, c, i + u, j + v].item()
                want[0, o, i, j] = acc
    assert torch.allclose(reg(x), want, atol=1e-5)


def test_set_builds_once_checks_shapes_and_round_trips():
    torch.manual_seed(0)
    regs = RegressorSet(who="Who")
    s, t = torch.randn(4, 6), torch.randn(4, 2)
    same = regs.apply("a->a", t, t)
    assert same is t and not regs.created  # equal shapes: the identity, nothing built
    out = regs.apply("b->c", s, t)
    assert out.shape == (4, 2) and regs.created and list(regs.modules) == ["b->c"]
    first = regs.modules["b->c"]
    regs.apply("b->c", s, t)
    assert regs.modules["b->c"] is first and len(regs.parameters()) == 2
    with pytest.raises(ValueError, match=r"Who \(b->c\): the regressor was built for "
                                         r"student/teacher features of shapes \[\[6\], \[2\]\]"):
        regs.apply("b->c", torch.randn(4, 5), t)
    buf = io.BytesIO()
    torch.save(regs.state(), buf)
    buf.seek(0)
    back = RegressorSet(who="Who")
    back.load(torch.load(buf, weights_only=True))
    assert back.shapes == regs.shapes and not back.created
    assert torch.equal(back.apply("b->c", s, t), regs.apply("b->c", s, t))
    with pytest.raises(ValueError, match="saved with relu=False, this one has relu=True"):
        RegressorSet(relu=True, who="Who").load(regs.state())


def test_remove_params_takes_groups_state_and_gradients_out():
    a, b = nn.Linear(2, 2), nn.Linear(2, 1)
    opt = torch.optim.Adam(a.parameters(), lr=0.1)
    opt.add_param_group({"params": list(b.parameters())})
    b(a(torch.randn(3, 2))).sum().backward()
    opt.step()
    remove_params(opt, b.parameters())
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == list(a.parameters())
    assert set(opt.state) == set(a.parameters())
    assert all(p.grad is None for p in b.parameters())
    assert all(p.grad is not None for p in a.parameters())
