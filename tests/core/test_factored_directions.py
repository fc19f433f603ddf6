"""core.factored_directions / core.direction_store: per-layer (input, output-gradient) factors
give exactly the dense output gradients; the store picks the factored form only where it holds,
and both storages project alike in float32 on a real run."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.direction_store import DirectionStore
from cl_plugins.core.factored_directions import (FactoredDirections, linear_blocks,
                                                 output_factors)
from cl_plugins.core.params import shared_parameters
from cl_plugins.models import build_model
from cl_plugins.projection.ogd import OGDPlugin, output_gradients

from helpers import naive_sgd


def _mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 4, bias=bias),
                         nn.Tanh(), nn.Linear(4, 3)).double()


def _xy(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                              generator=g)


@pytest.mark.parametrize("variant", ["gtl", "ave", "all"])
@pytest.mark.parametrize("bias", [True, False])
def test_factors_rebuild_the_dense_output_gradients(variant, bias):
    model = _mlp(bias)
    params = shared_parameters(model)
    blocks = linear_blocks(model, params)
    assert [w for _, w, _ in blocks] == ["0.weight", "2.weight", "4.weight"]
    x, y = _xy()
    factors = output_factors(model, blocks, x, y, variant)
    store = FactoredDirections([(m.in_features, m.out_features, b is not None)
                                for m, _, b in blocks])
    rows = []
    for (_, _, b), (a, d) in zip(blocks, factors):
        rows.append((d[:, :, None] * a[:, None, :]).reshape(len(a), -1))
        if b:
            rows.append(d)
    want = output_gradients(model, params, x, y, variant)
    torch.testing.assert_close(torch.cat(rows, 1), want, rtol=1e-12, atol=1e-14)
    # and the Gram matrix from the factors is V^T V
    torch.testing.assert_close(store._gram([a for a, _ in factors], [d for _, d in factors],
                                           [a for a, _ in factors], [d for _, d in factors]),
                               want @ want.T, rtol=1e-12, atol=1e-12)


class _Twice(nn.Module):
    """One Linear used twice per forward: its output gradient is a sum of two outer products."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def _conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 5)), nn.Conv1d(1, 2, 3), nn.Flatten(),
                         nn.Linear(6, 3)).double()


@pytest.mark.parametrize("make,form", [(_mlp, "factored"), (_conv, "dense"),
                                       (lambda: _Twice().double(), "dense")])
def test_auto_picks_factored_only_where_it_holds(make, form):
    model = make()
    x, y = _xy(12)
    ds = TensorDataset(x, y, torch.zeros(12, dtype=torch.long))
    from types import SimpleNamespace
    st = SimpleNamespace(model=model, optimizer=None,
                         experience=SimpleNamespace(dataset=ds, task_labels=[0]))
    auto = OGDPlugin(memory_per_task=12)
    auto.after_training_exp(st)
    assert auto.store.form == form
    dense = OGDPlugin(memory_per_task=12, storage="dense")
    dense.after_training_exp(st)
    assert auto.directions_per_exp == dense.directions_per_exp
    s_a, s_d = auto.basis, dense.basis  # the same span
    torch.testing.assert_close(s_a @ (s_a.T @ s_d), s_d, rtol=0, atol=1e-10)
    if form == "dense":
        with pytest.raises(ValueError, match="storage='factored': .*use storage='dense' or "
                                             "'auto'"):
            OGDPlugin(memory_per_task=12, storage="factored").after_training_exp(st)


def test_float32_factored_and_dense_steps_agree_on_split_digits():
    """Two tasks of split_digits (float32 MLP, the default memory): both storages keep the same
    number of directions, and their steps on a fresh gradient agree to float32 rounding times
    cond(V); the factored store holds far fewer bytes."""
    info = build_benchmark("split_digits", "domain")
    exps = list(info.benchmark.train_stream)
    plugins = {}
    for storage in ("dense", "factored"):
        torch.manual_seed(0)
        model = build_model({"name": "mlp", "hidden": [64, 64]}, info)
        plugin = OGDPlugin(memory_per_task=100, storage=storage)
        strategy = naive_sgd(model, plugin)
        for e in exps[:3]:
            torch.manual_seed(1)
            strategy.train(e)
        plugins[storage] = (plugin, model)
    (pd, md), (pf, mf) = plugins["dense"], plugins["factored"]
    assert pd.directions_per_exp == pf.directions_per_exp and pd.n_directions == 300
    for a, b in zip(md.parameters(), mf.parameters()):  # the same training, up to rounding
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    n = sum(p.numel() for p in md.parameters())
    g = torch.randn(n, generator=torch.Generator().manual_seed(5))
    gd, gf = pd.project(g), pf.project(g)
    cond = pf.store.factored.condition()
    assert cond < 1e3
    assert (gd - gf).norm() < 1e-5 * cond * g.norm()
    s = pd.basis.double()  # what leaks into the protected span, relative to g
    assert (s.T @ gf.double()).norm() < 1e-5 * cond * g.norm()
    assert pf.memory_bytes * 5 < pd.memory_bytes


def test_store_state_round_trip_keeps_the_form():
    model = _mlp()
    params = shared_parameters(model)
    x, y = _xy(8)
    store = DirectionStore("auto")
    store.add(model, params, [(x, y, 0)], "gtl", output_gradients, lambda m, k: None)
    state = store.state_dict()
    back = DirectionStore("auto")
    back.load_state_dict(state)
    assert back.form == "factored" and back.m == store.m == 8
    g = torch.randn(sum(p.numel() for p in params.values()), dtype=torch.float64)
    assert torch.equal(back.project(g), store.project(g))


class _Unused(nn.Module):
    """A shared Linear computed but not on the path to the logits: its part of every output
    gradient is zero (the dense rows say so too)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.side = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(5, 2)

    def forward(self, x):
        self.side(x)
        return self.b(torch.tanh(self.a(x)))


def test_a_layer_off_the_output_path_has_a_zero_part():
    torch.manual_seed(0)
    model = _Unused().double()
    params = shared_parameters(model)
    x, y = _xy()
    blocks = linear_blocks(model, params)
    factors = output_factors(model, blocks, x, y, "gtl")
    assert torch.equal(factors[2][1], torch.zeros(6, 2, dtype=torch.float64))
    dense = output_gradients(model, params, x, y, "gtl")
    rows = []
    for (_, _, b), (a, d) in zip(blocks, factors):
        rows += [(d[:, :, None] * a[:, None, :]).reshape(len(a), -1)] + ([d] if b else [])
    torch.testing.assert_close(torch.cat(rows, 1), dense, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("block", [1, 3, 64])
def test_drop_cholesky_keeps_the_independent_columns_in_order(block):
    """30 independent columns, 10 combinations of the first 5 and 2 near-copies (1e-3 apart) of
    columns 5-6: at tol 1e-5 the 30 and the near-copies are kept, in order, whatever the block
    size, and L L^T is their Gram matrix; at tol 1e-2 the near-copies are dropped too."""
    from cl_plugins.core.factored_directions import drop_cholesky

    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 30, generator=g, dtype=torch.float64)
    v = torch.cat([v, v[:, :5] @ torch.randn(5, 10, generator=g, dtype=torch.float64),
                   v[:, 5:7] + 1e-3 * torch.randn(50, 2, generator=g, dtype=torch.float64)], 1)
    gram = v.T @ v
    keep, low = drop_cholesky(gram, gram.diagonal(), 1e-5, block=block)
    assert keep == list(range(30)) + [40, 41]
    kept = gram[keep][:, keep]
    torch.testing.assert_close(low[:32, :32] @ low[:32, :32].T, kept, rtol=0, atol=1e-10)
    keep, _ = drop_cholesky(gram, gram.diagonal(), 1e-2, block=block)
    assert keep == list(range(30))


@pytest.mark.parametrize("extra", ["none", "penalty", "two_forwards"])
def test_the_step_takes_v_t_g_from_the_layer_inputs_and_anything_else_the_usual_way(extra):
    """The factored step with the step's inputs captured (t = V^T g from (X, Delta)) equals the
    step that reads t off the gradient: for a plain step, with a penalty gradient that does not
    go through the outputs (the residual path), and with two forward passes in the step."""
    from cl_plugins.core.direction_store import inner_from_inputs

    model = _mlp(bias=True)
    store = DirectionStore("factored", 1e-5)
    x0, y0 = _xy(8, seed=0)
    model.eval()
    store.add(model, shared_parameters(model), [(x0, y0, 0)], "gtl", output_gradients,
              lambda m, k: None)
    model.train()
    assert store.form == "factored" and store.m == 8
    x, y = _xy(6, seed=1)
    results = {}
    for capture in (True, False):
        model.zero_grad()
        if capture:
            store.begin_step(model, shared_parameters)
        loss = nn.functional.cross_entropy(model(x), y)
        if extra == "penalty":
            loss = loss + 0.3 * sum((p ** 2).sum() for p in model.parameters())
        if extra == "two_forwards":
            loss = loss + nn.functional.cross_entropy(model(2 * x), y)
        loss.backward()
        grads = [(m.weight.grad, m.bias.grad) for m in model if isinstance(m, nn.Linear)]
        if capture:
            pairs = store.capture.pairs()
            assert pairs is not None and len(pairs) == 3
            assert pairs[0][0].shape == (12 if extra == "two_forwards" else 6, 5)
            t_in = inner_from_inputs(store.factored, pairs, grads)
            torch.testing.assert_close(t_in, store.factored.inner(grads), rtol=1e-10, atol=1e-12)
        store.step_(model, shared_parameters)
        store.end_step()
        results[capture] = [g.clone() for pair in grads for g in pair]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert store.capture.pairs() is None  # closed: nothing kept after the step


def test_the_input_side_inner_product_drops_the_residual_only_within_rounding():
    """Without the residual's share, a penalty gradient would leak into the protected span:
    the t from the inputs alone differs from V^T g by the penalty's part."""
    from cl_plugins.core.direction_store import inner_from_inputs

    model = _mlp(bias=True)
    store = DirectionStore("factored", 1e-5)
    x0, y0 = _xy(8, seed=0)
    store.add(model.eval(), shared_parameters(model), [(x0, y0, 0)], "gtl", output_gradients,
              lambda m, k: None)
    model.train()
    x, y = _xy(6, seed=1)
    store.begin_step(model, shared_parameters)
    (nn.functional.cross_entropy(model(x), y)
     + sum((p ** 2).sum() for p in model.parameters())).backward()
    grads = [(m.weight.grad, m.bias.grad) for m in model if isinstance(m, nn.Linear)]
    pairs = store.capture.pairs()
    outputs_only = [(dlt.T @ xx, dlt.sum(0)) for xx, dlt in pairs]
    full = store.factored.inner(grads)
    assert (store.factored.inner(outputs_only) - full).abs().max() > 1e-3
    torch.testing.assert_close(inner_from_inputs(store.factored, pairs, grads), full,
                               rtol=1e-10, atol=1e-12)
    store.end_step()
