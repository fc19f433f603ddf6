"""Shared projection machinery: layer inputs as matrices, fan-in projectors, eigen helpers."""

import pytest
import torch
from avalanche.models import MultiHeadClassifier
from torch import nn

from cl_plugins.core.layer_inputs import (UnsupportedLayerError, fan_in, input_rows,
                                          protected_layers, record_inputs, split_weight_matrix,
                                          weight_matrix)
from cl_plugins.core.subspace import (FanInProjector, energy_rank, orthonormal_complement,
                                      sym_eigh)
from cl_plugins.models.classifier import ClassifierNet


@pytest.mark.parametrize("kwargs", [dict(stride=1, padding=1), dict(stride=2, padding=0),
                                    dict(stride=1, padding=2, dilation=2),
                                    dict(stride=1, padding="same")])
def test_conv_equals_unfolded_patches_times_weight_matrix(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, **kwargs).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    out = conv(x)
    rows = input_rows(conv, x, with_bias=True)
    mat = weight_matrix(conv, with_bias=True)
    assert mat.shape == (5, fan_in(conv, with_bias=True)) == (5, 28)
    by_rows = rows @ mat.T  # [B*L, out], rows ordered (sample, position)
    expected = out.flatten(2).transpose(1, 2).reshape(-1, 5)
    torch.testing.assert_close(by_rows, expected, rtol=1e-12, atol=1e-12)


def test_linear_rows_and_weight_split_round_trip():
    lin = nn.Linear(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    rows = input_rows(lin, x, with_bias=True)
    torch.testing.assert_close(rows @ weight_matrix(lin, True).T, lin(x).reshape(-1, 3))
    w, b = split_weight_matrix(lin, weight_matrix(lin, True), True)
    assert torch.equal(w, lin.weight) and torch.equal(b, lin.bias)


def test_protected_layers_excludes_task_heads_and_raises_on_unsupported():
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, 8))
    backbone.out_features = 8
    net = ClassifierNet(backbone, MultiHeadClassifier(8, 2))
    layers, norms = protected_layers(net)
    assert sorted(layers) == ["backbone.0", "backbone.3"] and sorted(norms) == ["backbone.1"]
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UnsupportedLayerError, match=r"'0'.*groups=2"):
        protected_layers(grouped)
    with pytest.raises(UnsupportedLayerError, match=r"'1'.*ConvTranspose2d"):
        protected_layers(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 2, 3)))
    with pytest.raises(UnsupportedLayerError, match=r"'emb'.*Embedding"):
        protected_layers(nn.ModuleDict({"emb": nn.Embedding(3, 2), "fc": nn.Linear(2, 2)}))


def test_record_inputs_sees_each_layer_input_and_removes_hooks():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    seen = {}
    with record_inputs({"0": net[0], "2": net[2]}, lambda n, m, x: seen.__setitem__(n, x)):
        x = torch.randn(5, 3)
        net(x)
    assert torch.equal(seen["0"], x) and seen["2"].shape == (5, 4)
    assert not net[0]._forward_hooks and not net[2]._forward_hooks


@pytest.mark.parametrize("k", [0, 2, 5, 7, 8])
@pytest.mark.parametrize("mode", ["onto", "out_of"])
def test_projector_equals_dense_formula_on_either_side(k, mode):
    torch.manual_seed(k)
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    basis = q[:, :k]
    proj = FanInProjector(basis, mode=mode, scale=0.5 if mode == "onto" else 1.0,
                          dtype=torch.float64)
    assert proj.factor_rank == min(k, d - k)  # the cheaper side is stored
    dense = basis @ basis.T
    g = torch.randn(3, d, dtype=torch.float64)
    expected = 0.5 * g @ dense if mode == "onto" else g - g @ dense
    torch.testing.assert_close(proj.apply(g), expected, rtol=1e-10, atol=1e-10)
    again = FanInProjector.from_state_dict(proj.state_dict())
    torch.testing.assert_close(again.apply(g), proj.apply(g))


def test_orthonormal_complement_and_sym_eigh_in_float64():
    torch.manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))
    comp = orthonormal_complement(basis)
    assert comp.shape == (6, 4)
    torch.testing.assert_close(comp.T @ comp, torch.eye(4, dtype=torch.float64))
    assert float((basis.T @ comp).abs().max()) < 1e-12
    x = torch.randn(10, 6).float()
    vals, vecs = sym_eigh(x.T @ x)
    assert vals.dtype == torch.float64 and bool((vals[1:] >= vals[:-1]).all())


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.6, 14.0) == 1
    assert energy_rank(s, 0.9, 14.0) == 2
    assert energy_rank(s, 0.99, 14.0) == 3
    assert energy_rank(s, 0.9, 14.0, already_explained=13.0) == 1


def test_plain_sgd_and_groups_holding():
    from cl_plugins.core.input_side import groups_holding, plain_sgd

    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": a.parameters()},
                           {"params": b.parameters(), "momentum": 0.9}], lr=0.1)
    held = groups_holding(opt, [a.weight])
    assert len(held) == 1 and held[0]["params"][0] is a.weight
    assert plain_sgd(opt, held) and not plain_sgd(opt)  # the second group has momentum
    assert not plain_sgd(torch.optim.Adam(a.parameters()))


def test_check_fan_ins_names_the_layer():
    from cl_plugins.core.layer_inputs import check_fan_ins

    layers = {"fc": nn.Linear(3, 2)}
    check_fan_ins(object(), layers, {}, True)  # nothing stored yet
    check_fan_ins(object(), layers, {"fc": torch.zeros(4, 4)}, True)  # 3 + bias column
    with pytest.raises(ValueError, match="'fc' has fan-in 3, the stored statistics 4"):
        check_fan_ins(object(), layers, {"fc": torch.zeros(4, 4)}, False)
    with pytest.raises(ValueError, match="protected layers changed"):
        check_fan_ins(object(), layers, {"other": torch.zeros(3, 3)}, False)


def test_extend_basis_drop_one_keeps_one_vector_fewer():
    from cl_plugins.core.subspace import extend_basis

    rep = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))  # energies 9, 4, 1
    assert extend_basis(None, rep, 0.9).shape == (3, 2)  # 13 / 14 >= 0.9
    assert extend_basis(None, rep, 0.9, drop_one=True).shape == (3, 1)
    grown = extend_basis(extend_basis(None, rep, 0.6), rep, 0.99)
    assert grown.shape == (3, 3)
    torch.testing.assert_close(grown.T @ grown, torch.eye(3, dtype=torch.float64))
