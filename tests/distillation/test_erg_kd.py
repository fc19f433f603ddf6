"""ERGKDPlugin: degree selection by hand, the graph it keeps and grows, the term on the graph's
nodes, split_digits end to end with ER (class-IL), and exact resume from the state."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cl_plugins.core.distill_losses import erg_angle_loss, erg_triplet_mask
from cl_plugins.distillation.erg_kd import ERGKDPlugin, degree_order
from cl_plugins.replay.er import ERPlugin
from helpers import check_plugins_resume_exactly, er_der_strategy, stream_accuracies


def test_degree_order_by_hand():
    angles = [0.0, 30.0, 60.0, 90.0, 200.0]  # unit vectors at these angles (degrees)
    f = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    degree = []
    for i, a in enumerate(angles):
        degree.append(sum(max(0.0, math.cos(math.radians(a - b)))
                          for j, b in enumerate(angles) if j != i))
    expected = sorted(range(len(angles)), key=lambda i: (-degree[i], i))
    assert degree_order(3.0 * f).tolist() == expected
    assert degree_order(3.0 * f, chunk=2).tolist() == expected  # taken two rows at a time
    assert expected[:2] == [1, 2]  # the central directions


def test_arguments_are_checked():
    for kwargs, match in [({"exemplars_per_class": 0}, "exemplars_per_class"),
                          ({"selection": "herding"}, "selection"),
                          ({"triplets": "some"}, "triplets"), ({"weight": -1.0}, "weight"),
                          ({"seed": -2}, "seed"), ({"layers": []}, "layers")]:
        with pytest.raises(ValueError, match=match):
            ERGKDPlugin(**kwargs)


def _features(model, x):
    model.eval()
    with torch.no_grad():
        return model.backbone(x)


def test_graph_nodes_are_the_top_degree_samples_of_each_class_and_grow():
    plugin = ERGKDPlugin(exemplars_per_class=3, seed=0)
    st, info = er_der_strategy([plugin], sgd=True)
    stream = list(info.benchmark.train_stream)
    st.train(stream[0])
    model_after_0 = copy.deepcopy(st.model)
    ds = stream[0].dataset.eval()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    f = _features(model_after_0, x)
    expected_x = []
    for c in sorted(set(y.tolist())):
        idx = torch.nonzero(y == c).flatten()
        fn = torch.nn.functional.normalize(f[idx].double(), dim=1)
        sim = (fn @ fn.t()).clamp_min(0)
        deg = [float(sim[i].sum() - sim[i, i]) for i in range(len(idx))]
        order = sorted(range(len(idx)), key=lambda i: (-deg[i], i))[:3]
        expected_x.append(x[idx[order]])
    assert torch.equal(plugin.nodes["x"], torch.cat(expected_x))
    assert plugin.nodes["y"].tolist() == [int(c) for c in sorted(set(y.tolist())) for _ in "abc"]
    st.train(stream[1])
    assert plugin.nodes["x"].shape[0] == 12 and torch.equal(plugin.nodes["x"][:6],
                                                           torch.cat(expected_x))
    assert len(set(plugin.nodes["y"].tolist())) == 4


def test_the_term_runs_on_the_nodes_and_starts_at_zero():
    plugin = ERGKDPlugin(exemplars_per_class=4, seed=0)
    calls = []
    original = plugin.distill_loss

    def spy(s, t, y, tl):
        value = original(s, t, y, tl)
        calls.append((s["backbone"].detach().clone(), t["backbone"].clone(), y.clone(),
                      value.item()))
        return value

    plugin.distill_loss = spy
    st, info = er_der_strategy([ERPlugin(mem_size=100, seed=0), plugin], sgd=True)
    stream = list(info.benchmark.train_stream)
    st.train(stream[0])
    assert calls == []  # no teacher, no term in the first experience
    teacher = copy.deepcopy(st.model)
    st.train(stream[1])
    assert len(calls) == -(-len(stream[1].dataset) // 32)  # one term per step
    s0, t0, y0, v0 = calls[0]
    assert y0.shape[0] == 8 and v0 == pytest.approx(0.0, abs=1e-6)  # student = teacher
    assert torch.allclose(t0, _features(teacher, plugin.nodes["x"][:8]), atol=1e-6)
    s1, t1, y1, v1 = calls[-1]
    assert torch.equal(t1, t0) and v1 > 0  # the teacher's node features are fixed
    assert v1 == pytest.approx(erg_angle_loss(s1, t1, erg_triplet_mask(y1)).item(), abs=1e-6)


def test_with_er_on_split_digits_less_forgetting_than_naive_and_the_term_acts():
    runs = {}
    for name, plugins in [("naive", []), ("er", [ERPlugin(mem_size=200, seed=0)]),
                          ("er+erg", [ERPlugin(mem_size=200, seed=0), ERGKDPlugin(seed=0)]),
                          ("er+erg_cross", [ERPlugin(mem_size=200, seed=0),
                                            ERGKDPlugin(triplets="cross_class", seed=0)])]:
        st, info = er_der_strategy(plugins, sgd=True)
        for i, exp in enumerate(info.benchmark.train_stream):
            st.train(exp)
            if i == 1:
                runs[name + "@1"] = copy.deepcopy(st.model)
        runs[name] = st.model
    old = {k: sum(stream_accuracies(runs[k], info.benchmark.test_stream)[:4]) / 4
           for k in ("naive", "er+erg")}
    assert old["er+erg"] > old["naive"] + 0.1

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

    assert not same(runs["er"], runs["er+erg"])
    # with two classes in the graph there is no triplet of three classes: nothing is added
    assert same(runs["er@1"], runs["er+erg_cross@1"])
    assert not same(runs["er"], runs["er+erg_cross"])


@pytest.mark.parametrize("selection", ["degree", "random"])
def test_state_round_trip_resumes_exactly(selection):
    def make():
        return [ERPlugin(mem_size=100, seed=0),
                ERGKDPlugin(exemplars_per_class=3, selection=selection, seed=5)]

    a, b, states = check_plugins_resume_exactly(make)
    assert all(torch.equal(a[1].nodes[k], b[1].nodes[k]) for k in ("x", "y", "t"))
    assert torch.equal(a[1].generator.get_state(), b[1].generator.get_state())
    with pytest.raises(ValueError, match="exemplars_per_class=3, this plugin has "
                                         "exemplars_per_class=5"):
        ERGKDPlugin(selection=selection).load_state_dict(states[1])
