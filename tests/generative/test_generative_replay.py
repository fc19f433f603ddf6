"""GenerativeReplayPlugin (DGR, DGR+distill): the loss weighting on a hand example, the labelling
of the replayed rows by the previous solver (hard and soft), the task-IL replay per past head,
errors, an exact resume from a saved state, and DGR against naive on split_digits (class-IL);
docs/methods/generative_replay.md."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from avalanche.models.utils import avalanche_forward
from torch import nn

from cl_plugins.core.vae import VAE
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.generative.generative_replay import GenerativeReplayPlugin, soft_target_ce
from cl_plugins.registry import MethodSpec
from generative_common import (SMALL_VAE, StepRecorder, check_exact_resume, digits_strategy, reload,
                               train_and_predict_old)
from helpers import check_registry_header


def _hand_ce(row, label):
    return -row[label] + math.log(sum(math.exp(v) for v in row))


def test_registry_header_and_his_defaults():
    check_registry_header(GenerativeReplayPlugin)
    p = GenerativeReplayPlugin()
    assert (p.distill, p.temperature, p.scale_t2, p.loss_weighting, p.replay_mb_size) == (
        False, 2.0, True, "vandeven", None)
    assert (p.vae_fc_layers, p.vae_fc_units, p.vae_z_dim, p.vae_lr) == (3, 400, 100, 0.001)


@pytest.mark.parametrize("t, weighting", [(2, "vandeven"), (3, "vandeven"), (3, "batch")])
def test_loss_weighting_on_a_hand_example(t, weighting):
    out = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3],                  # 2 stream rows
                        [1.5, -0.5, 0.0], [0.2, 0.1, 2.0], [-1.0, 0.4, 0.0]])  # 3 replayed
    y = torch.tensor([0, 2, 1, 2, 0])
    crit = nn.CrossEntropyLoss()
    st = SimpleNamespace(mb_output=out, mb_y=y, _criterion=crit, loss=crit(out, y))
    p = GenerativeReplayPlugin(loss_weighting=weighting)
    p.n_experiences, p._start, p._n_rep, p._teacher_out = t - 1, 2, 3, None
    p.before_backward(st)
    rows = out.tolist()
    cur = sum(_hand_ce(rows[i], int(y[i])) for i in range(2)) / 2
    rep = sum(_hand_ce(rows[i], int(y[i])) for i in range(2, 5)) / 3
    w_cur = 1 / t if weighting == "vandeven" else 2 / 5
    assert st.loss.item() == pytest.approx(w_cur * cur + (1 - w_cur) * rep, rel=1e-6)


def test_soft_target_ce_on_a_hand_example():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    q = torch.tensor([[2.0, -1e4, 0.0], [0.0, 1.0, -1e4]])  # masked teacher classes: p = 0
    for scale in (True, False):
        want = 0.0
        for n in range(2):
            zq = [math.exp(v / 2) for v in q[n].tolist()]
            p = [v / sum(zq) for v in zq]
            ls = [v / 2 - math.log(sum(math.exp(u / 2) for u in s[n].tolist()))
                  for v in s[n].tolist()]
            want += -sum(a * b for a, b in zip(p, ls)) / 2
        got = soft_target_ce(s, q, 2.0, scale).item()
        assert got == pytest.approx(want * (4 if scale else 1), rel=1e-6)


class RngRecorder(StepRecorder):
    """A StepRecorder that also keeps the plugin's generator state at the start of each step
    (before the plugin draws the step's replayed inputs)."""

    def __init__(self, plugin, check=None):
        super().__init__(check)
        self.plugin, self.rng_state = plugin, None

    def before_training_iteration(self, strategy, **kwargs):
        super().before_training_iteration(strategy, **kwargs)
        self.rng_state = self.plugin.rng.get_state()


def _assert_snapshots_are_current(p, model):
    """After an experience: the teacher is a frozen copy of the model, prev_generator of the
    generator (both refreshed at every experience's end)."""
    for (name, a), b in zip(model.named_parameters(), p.teacher.parameters()):
        assert torch.equal(a, b) and not b.requires_grad, name
    for (name, a), b in zip(p.generator.named_parameters(), p.prev_generator.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("distill", [False, True])
def test_replayed_rows_are_generated_and_labelled_by_the_previous_solver(distill):
    def check(strategy, rec):
        n = rec["n"]
        x_rep = rec["x"][n:]
        # drawn from the frozen previous generator with the plugin's own generator state
        rng = torch.Generator().set_state(rec_plugin.rng_state)
        with torch.no_grad():
            assert torch.equal(x_rep, p.prev_generator.sample(16, rng))
        assert float(x_rep.min()) >= 0.0 and float(x_rep.max()) <= 1.0
        with torch.no_grad():
            q = avalanche_forward(p.teacher, x_rep, rec["t"][n:])
        assert torch.equal(rec["y"][n:], q.argmax(1))  # hard labels: the previous solver's
        assert set(rec["y"][n:].tolist()) <= set(range(2 * rec["exp"]))  # old classes only
        out = strategy.mb_output
        crit = nn.CrossEntropyLoss()
        t = rec["exp"] + 1
        rep = soft_target_ce(out[n:], q, 2.0, True) if distill else crit(out[n:], rec["y"][n:])
        want = crit(out[:n], rec["y"][:n]) / t + (1 - 1 / t) * rep
        assert strategy.loss.item() == pytest.approx(want.item(), rel=1e-5)

    p = GenerativeReplayPlugin(distill=distill, replay_mb_size=16, seed=0, **SMALL_VAE)
    rec_plugin = RngRecorder(p, check)
    st, info = digits_strategy([p, rec_plugin])
    exps = info.benchmark.train_stream
    st.train(exps[0])
    assert rec_plugin.steps == [] and p.teacher is not None and p.old_classes == [0, 1]
    _assert_snapshots_are_current(p, st.model)
    for e in exps[1:3]:
        st.train(e)
        _assert_snapshots_are_current(p, st.model)
    assert {r["exp"] for r in rec_plugin.steps} == {1, 2} and len(rec_plugin.steps) == 16


def test_task_il_replays_the_same_inputs_on_every_past_head():
    def check(strategy, rec):  # at the step itself: the teacher that labels this step's rows
        n, x, t = rec["n"], rec["x"], rec["t"]
        if rec["exp"] != 2:
            return
        assert x.shape[0] == n + 16 and t[n:].tolist() == [0] * 8 + [1] * 8
        assert torch.equal(x[n:n + 8], x[n + 8:])  # one generated batch, once per past task
        with torch.no_grad():
            for k in (0, 1):
                rows = slice(n + 8 * k, n + 8 * (k + 1))
                q = avalanche_forward(p.teacher, x[rows], t[rows])
                assert torch.equal(rec["y"][rows], q.argmax(1))  # head k's labels
        checked.append(rec["exp"])

    checked = []
    p = GenerativeReplayPlugin(replay_mb_size=8, seed=0, **SMALL_VAE)
    st, info = digits_strategy([p, StepRecorder(check)], scenario="task")
    for e in list(info.benchmark.train_stream)[:3]:
        st.train(e)
    assert len(checked) == 8


class SpyVAE(VAE):
    """The default VAE, recording each ``train_step``'s replayed inputs and current weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def train_step(self, x, x_replay=None, current_weight=1.0, rng=None):
        self.calls.append((x.shape[0], None if x_replay is None else x_replay.clone(),
                           current_weight))
        return super().train_step(x, x_replay, current_weight, rng)


def test_the_generator_trains_on_the_incoming_and_the_replayed_inputs_weighted_1_over_t():
    torch.manual_seed(0)
    spy = SpyVAE((1, 8, 8), fc_layers=2, fc_units=32, z_dim=8, lr=0.003, x_range=[0.0, 1.0])
    p = GenerativeReplayPlugin(generator=spy, replay_mb_size=16, seed=0)
    rec = StepRecorder()
    st, info = digits_strategy([p, rec])
    for e in list(info.benchmark.train_stream)[:3]:
        st.train(e)
    calls = p.generator.calls
    assert len(calls) == 24  # 8 steps per experience, one generator step each
    assert all(r is None and w == 1.0 for _, r, w in calls[:8])  # experience 1: nothing replayed
    for i, step in enumerate(rec.steps):  # experiences 2 and 3, in order
        n, x_rep, w = calls[8 + i]
        assert n == step["n"] and torch.equal(x_rep, step["x"][step["n"]:])
        assert w == pytest.approx(1 / (step["exp"] + 1))


def test_exact_resume_from_a_saved_state():
    a, b = check_exact_resume(lambda seed: GenerativeReplayPlugin(distill=True, seed=seed,
                                                                  **SMALL_VAE))
    assert b.n_experiences == 2 and b.generator.optimizer.state  # Adam's moments came along
    wrong = GenerativeReplayPlugin(distill=False, **SMALL_VAE)
    with pytest.raises(ValueError, match="distill=True, this plugin has distill=False"):
        wrong.load_state_dict(reload(a.state_dict()))


@pytest.mark.parametrize("kwargs, match", [
    ({"distill": 1}, r"distill must be one of True, False; got 1"),
    ({"temperature": 0.0}, r"temperature must be in \(0, inf\)"),
    ({"scale_t2": "yes"}, r"scale_t2 must be one of True, False"),
    ({"replay_mb_size": 0}, r"replay_mb_size must be in \[1, inf\)"),
    ({"loss_weighting": "mean"}, r"loss_weighting must be one of 'vandeven', 'batch'"),
    ({"vae_fc_layers": 1}, r"vae_fc_layers must be in \[2, inf\)"),
    ({"vae_z_dim": 0}, r"vae_z_dim must be in \[1, inf\)"),
    ({"vae_lr": -1.0}, r"vae_lr must be in \(0, inf\)"),
    ({"x_range": [1.0, 0.0]}, r"x_range must be None, \[lo, hi\]"),
    ({"seed": -1}, r"seed must be in \[0, inf\)"),
    ({"generator": nn.Linear(2, 2)}, r"generator must be None .* it lacks sample, train_step"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerativeReplayPlugin(**kwargs)


def test_x_range_fixed_refuses_normalised_inputs_and_none_follows_the_data():
    from cl_plugins.benchmarks import build_benchmark
    normalised = build_benchmark("split_digits", "class").benchmark.train_stream[0]
    st, _ = digits_strategy([GenerativeReplayPlugin(seed=0, x_range=[0.0, 1.0], **SMALL_VAE)])
    with pytest.raises(ValueError, match="outside x_range"):
        st.train(normalised)
    p = GenerativeReplayPlugin(seed=0, **SMALL_VAE)
    st, _ = digits_strategy([p])
    st.train(normalised)
    ds = normalised.dataset
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    # the running min / max of the batches seen: the data's own range
    assert p.generator.lo.item() == pytest.approx(float(x.min()))
    assert p.generator.hi.item() == pytest.approx(float(x.max()))


# ---------------------------------------------------------------------------- end to end

E2E_VAE = dict(vae_fc_units=100, vae_z_dim=20, vae_lr=0.003)


def _old_class_accuracy(plugins, seed=0, n_exp=2, epochs=10):
    """Accuracy on the test sets of the experiences before the last, after training on the
    first ``n_exp`` experiences of split_digits (class-IL)."""
    _, preds = train_and_predict_old(plugins, seed, n_exp, epochs)
    return float(np.mean([float((pred == y).float().mean()) for pred, y in preds]))


def test_dgr_keeps_old_classes_that_naive_forgets():
    # seeds 0-2, two experiences (docs/methods/generative_replay.md): naive 0.00; DGR ...
    naive = _old_class_accuracy([])
    dgr = _old_class_accuracy([GenerativeReplayPlugin(seed=0, **E2E_VAE)])
    assert naive < 0.05 and dgr > 0.4, (naive, dgr)


@pytest.mark.slow
def test_dgr_and_dgr_distill_forget_less_than_naive_through_the_runner(digits_cfg,
                                                                       register_methods):
    register_methods(MethodSpec.from_plugin(GenerativeReplayPlugin))
    digits_cfg["benchmark"].update(scenario="class", normalize=False)
    # five experiences need more generator steps than two: 20 epochs = 160 steps each (with
    # 10 epochs hard-label DGR ends below naive's ACC: docs/methods/generative_replay.md)
    digits_cfg["model"] = {"name": "mlp", "hidden": [64]}
    digits_cfg["strategy"]["epochs"] = 20
    digits_cfg["seeds"] = [0, 1, 2]
    digits_cfg["methods"] = [
        "naive", {"name": "generative_replay", "label": "dgr", "params": E2E_VAE},
        {"name": "generative_replay", "label": "dgr_distill",
         "params": {**E2E_VAE, "distill": True}}]
    runs = run_experiment(digits_cfg, echo=lambda *a: None)
    by = {}
    for r in runs:
        assert r["status"] == "finished", r.get("error")
        by.setdefault(r.get("label") or r["method"], []).append(r["summary"])
    for label, sums in by.items():  # shown with pytest -s (docs/methods/generative_replay.md)
        print(label, [(round(s["acc"], 3), round(s["bwt"], 3)) for s in sums])
    naive_bwt = np.mean([s["bwt"] for s in by["naive"]])
    for label in ("dgr", "dgr_distill"):
        assert np.mean([s["bwt"] for s in by[label]]) > naive_bwt + 0.3, by[label]
        assert np.mean([s["acc"] for s in by[label]]) > np.mean(
            [s["acc"] for s in by["naive"]]) + 0.2, by[label]
