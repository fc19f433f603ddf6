"""SubspaceKDPlugin: arguments, the term on the selected rows, the released code's detached
class-wise term, DER's replayed samples without touching DER's draws, split_digits end to end
with ER (class-IL), and exact resume from the state."""

from __future__ import annotations


import pytest
import torch

from cl_plugins.core.distill_losses import subspace_distance
from cl_plugins.distillation.subspace_kd import SubspaceKDPlugin
from cl_plugins.replay.der import DERPlugin
from cl_plugins.replay.er import ERPlugin
from helpers import check_plugins_resume_exactly, er_der_strategy, stream_accuracies


def test_arguments_are_checked():
    for kwargs, match in [({"dim": 0}, "dim"), ({"noise_std": -0.1}, "noise_std"),
                          ({"class_wise": 1}, "class_wise"), ({"weight": -1.0}, "weight"),
                          ({"class_wise": False, "detach_classwise": True}, "class_wise=True"),
                          ({"replay_source": "buffer"}, "replay_source"),
                          ({"replay_source": "der"}, "inputs='replay'"),
                          ({"seed": -1}, "seed"), ({"gap_floor": -0.01}, "gap_floor"),
                          ({"gap_floor": float("nan")}, "gap_floor")]:
        with pytest.raises(ValueError, match=match):
            SubspaceKDPlugin(**kwargs)


def test_the_term_is_the_subspace_distance_with_the_plugins_noise():
    plugin = SubspaceKDPlugin(dim=3, noise_std=0.05, seed=4, layers=["a", "b"])
    g = torch.Generator().manual_seed(0)
    s = {n: torch.randn(12, 6, generator=g, requires_grad=True) for n in "ab"}
    t = {n: torch.randn(12, 6, generator=g) for n in "ab"}
    y = torch.tensor([0, 1, 2] * 4)
    gen = torch.Generator()
    gen.set_state(plugin.generator.get_state())
    expected = sum(subspace_distance(s[n], t[n], 3, y, 0.05, gen) for n in "ab")
    got = plugin.distill_loss(s, t, y, torch.zeros(12, dtype=torch.long))
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.equal(plugin.generator.get_state(), gen.get_state())  # the draws advanced it
    glob = SubspaceKDPlugin(dim=3, noise_std=0.0, class_wise=False, layers="a")
    assert glob.distill_loss(s, t, y, y).item() == pytest.approx(
        subspace_distance(s["a"], t["a"], 3).item(), abs=1e-6)


def test_gap_floor_reaches_the_svd_backward():
    """A class with more rows than dim and two singular values 1e-4 apart across the cut: the
    plugin's gradient is subspace_distance's with its gap_floor, and 0 gives the exact one."""
    g = torch.Generator().manual_seed(2)
    q1 = torch.linalg.qr(torch.randn(14, 14, generator=g))[0]
    q2 = torch.linalg.qr(torch.randn(20, 20, generator=g))[0]
    sv = torch.tensor([5, 4.5, 4, 3.5, 3, 1.0, 1.0 - 1e-4, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1])
    feats = (q1 * sv) @ q2[:, :14].T
    teacher = {"a": torch.randn(14, 20, generator=g)}
    y = torch.zeros(14, dtype=torch.long)
    grads = {}
    for floor in (0.0, 0.01):
        s = {"a": feats.clone().requires_grad_(True)}
        SubspaceKDPlugin(dim=6, noise_std=0.0, gap_floor=floor, layers="a").distill_loss(
            s, teacher, y, y).backward()
        ref = feats.clone().requires_grad_(True)
        subspace_distance(ref, teacher["a"], 6, y, gap_floor=floor).backward()
        torch.testing.assert_close(s["a"].grad, ref.grad)
        grads[floor] = s["a"].grad.norm().item()
    assert grads[0.0] > 20 * grads[0.01]


def test_the_released_class_wise_term_is_detached_and_ours_is_not():
    # the released code gathers the per-class distances with torch.tensor(dist).mean()
    x = torch.randn(5, requires_grad=True)
    dist = [(x ** 2).sum(), x.sum()]
    with pytest.warns(UserWarning):
        released = torch.tensor(dist).mean()
    assert released.grad_fn is None and not released.requires_grad
    g = torch.Generator().manual_seed(1)
    s = torch.randn(10, 6, generator=g)
    t = torch.randn(10, 6, generator=g)
    y = torch.tensor([0, 1] * 5)
    values = {}
    for detach in (False, True):
        plugin = SubspaceKDPlugin(dim=2, seed=0, detach_classwise=detach)
        feats = s.clone().requires_grad_(True)
        value = plugin.distill_loss({"backbone": feats}, {"backbone": t}, y, y)
        values[detach] = value.item()
        assert value.requires_grad is not detach
        if not detach:
            value.backward()
            assert feats.grad.abs().sum() > 0
    assert values[True] == pytest.approx(values[False], abs=1e-6)  # same value, same noise


def _old_accuracy(st, info):
    return sum(stream_accuracies(st.model, info.benchmark.test_stream)[:4]) / 4


def test_with_er_on_split_digits_less_forgetting_than_naive_and_the_term_acts():
    runs = {}
    for name, plugins in [("naive", []), ("er", [ERPlugin(mem_size=200, seed=0)]),
                          ("er+sd", [ERPlugin(mem_size=200, seed=0),
                                     SubspaceKDPlugin(inputs="replay", seed=0)]),
                          ("er+released", [ERPlugin(mem_size=200, seed=0),
                                           SubspaceKDPlugin(inputs="replay", seed=0,
                                                            detach_classwise=True)])]:
        st, info = er_der_strategy(plugins, sgd=True)
        for exp in info.benchmark.train_stream:
            st.train(exp)
        runs[name] = st
    assert _old_accuracy(runs["er+sd"], info) > _old_accuracy(runs["naive"], info) + 0.1
    moved = [not torch.equal(a, b) for a, b in zip(runs["er"].model.parameters(),
                                                   runs["er+sd"].model.parameters())]
    assert all(moved)  # the same seed, ER's same draws: only the SD term differs
    # the released code's class-wise term passes no gradient: it trains exactly as ER
    assert all(torch.equal(a, b) for a, b in zip(runs["er"].model.parameters(),
                                                 runs["er+released"].model.parameters()))


def test_alone_with_its_defaults_it_distils_the_current_rows():
    seen = []
    plugin = SubspaceKDPlugin(seed=0)
    original = plugin.distill_loss
    plugin.distill_loss = lambda s, t, y, tl: seen.append(y.shape[0]) or original(s, t, y, tl)
    st, info = er_der_strategy([plugin], sgd=True)
    for exp in list(info.benchmark.train_stream)[:2]:
        st.train(exp)
    n = len(info.benchmark.train_stream[1].dataset)
    assert len(seen) == -(-n // 32) and set(seen) == {32, n % 32}  # every step, only exp 1's
    assert plugin.n_experiences == 2


def test_state_round_trip_resumes_exactly():
    def make():
        return [ERPlugin(mem_size=100, seed=0), SubspaceKDPlugin(inputs="replay", seed=3)]

    a, b, states = check_plugins_resume_exactly(make)
    assert torch.equal(a[1].generator.get_state(), b[1].generator.get_state())
    with pytest.raises(ValueError, match="dim=10, this plugin has dim=5"):
        SubspaceKDPlugin(inputs="replay", dim=5).load_state_dict(states[1])


def test_der_samples_leave_ders_draws_untouched():
    runs, rows = {}, []
    for name in ("der", "der+sd"):
        der = DERPlugin(mem_size=200, alpha=0.5, beta=0.0, replay_mb_size=20, seed=0)
        plugins = [der]
        if name == "der+sd":
            sd = SubspaceKDPlugin(inputs="replay", replay_source="der", seed=1)
            original = sd.distill_loss
            sd.distill_loss = lambda s, t, y, tl: rows.append(y.shape[0]) or original(s, t, y, tl)
            plugins.append(sd)
        st, info = er_der_strategy(plugins, sgd=True)
        for exp in list(info.benchmark.train_stream)[:3]:
            st.train(exp)
        runs[name] = (st, der)
    (st1, der1), (st2, der2) = runs["der"], runs["der+sd"]
    assert set(rows) == {20}  # DER's replay_mb_size samples of its memory
    assert torch.equal(der1.buffer.x, der2.buffer.x) and torch.equal(der1.buffer.y, der2.buffer.y)
    assert torch.equal(der1.buffer.generator.get_state(), der2.buffer.generator.get_state())
    assert not torch.equal(der1.buffer.logits, der2.buffer.logits)  # the models differ
    st, info = er_der_strategy([SubspaceKDPlugin(inputs="replay", replay_source="der")])
    with pytest.raises(ValueError, match="no plugin|has none"):
        st.train(info.benchmark.train_stream[0])
