"""NegativeReplayPlugin: the negative-replay loss (Eq. N) on a hand example and its gradient,
the pseudo-labels among the old classes, the loss inside a strategy, errors, an exact resume,
and its effect on split_digits (class-IL); docs/methods/negative_replay.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from avalanche.models.utils import avalanche_forward
from torch import nn

from cl_plugins.generative.negative_replay import NegativeReplayPlugin, negative_replay_loss
from cl_plugins.registry import signature_defaults
from generative_common import (SMALL_VAE, StepRecorder, check_exact_resume, digits_strategy,
                               train_and_predict_old)


def test_registry_header():
    defaults = signature_defaults(NegativeReplayPlugin)
    NegativeReplayPlugin(**defaults)
    assert NegativeReplayPlugin.SCENARIOS == ("class",)
    assert not NegativeReplayPlugin.NEEDS_TASK_LABELS
    assert set(NegativeReplayPlugin.SWEEP) <= set(defaults)
    assert NegativeReplayPlugin.PAPER and NegativeReplayPlugin.SUMMARY
    assert defaults["loss_weighting"] == "batch" and defaults["vae_z_dim"] == 100


def test_negative_loss_on_a_hand_example_and_its_gradient():
    # 5 classes: 0, 1, 2 old; 3, 4 current. Two replayed rows labelled 1 and 0.
    out = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.0],
                        [1.0, 0.0, 3.0, -0.5, 2.5]], requires_grad=True)
    y = torch.tensor([1, 0])
    loss = negative_replay_loss(out, y, [3, 4])
    want, grads = 0.0, []
    for n, row in enumerate(out.tolist()):
        a, cur = row[int(y[n])], [row[3], row[4]]
        z = math.exp(a) + sum(math.exp(c) for c in cur)
        want += -math.log(math.exp(a) / z) / 2
        grads.append([0.0, 0.0, 0.0] + [math.exp(c) / z / 2 for c in cur])
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # only the current classes' logits move (pushed down); no old logit, the label's included
    assert torch.allclose(out.grad, torch.tensor(grads), atol=1e-7)
    assert (out.grad[:, 3:] > 0).all() and (out.grad[:, :3] == 0).all()


def test_pseudo_labels_are_the_previous_solvers_best_old_class():
    p = NegativeReplayPlugin()
    p.old_classes = [0, 1, 4]
    q = torch.tensor([[0.0, 1.0, 9.0, 0.5, 0.2], [3.0, 1.0, 0.0, 0.0, 5.0]])
    assert p.label(q).tolist() == [1, 4]  # class 2 is not old: never a label


def test_the_loss_inside_a_strategy():
    def check(strategy, rec):
        n, out = rec["n"], strategy.mb_output
        with torch.no_grad():
            q = avalanche_forward(p.teacher, rec["x"][n:], rec["t"][n:])
        old = torch.tensor(p.old_classes)
        assert torch.equal(rec["y"][n:], old[q[:, old].argmax(1)])
        r = out.shape[0] - n
        want = (n * nn.functional.cross_entropy(out[:n], rec["y"][:n])
                + r * negative_replay_loss(out[n:], rec["y"][n:], p.current_classes)) / (n + r)
        assert strategy.loss.item() == pytest.approx(want.item(), rel=1e-5)

    p = NegativeReplayPlugin(replay_mb_size=16, seed=0, **SMALL_VAE)
    rec = StepRecorder(check)
    st, info = digits_strategy([p, rec])
    for e in list(info.benchmark.train_stream)[:3]:
        st.train(e)
    assert {r["exp"] for r in rec.steps} == {1, 2} and p.current_classes == [4, 5]


def test_refuses_per_task_heads():
    st, info = digits_strategy([NegativeReplayPlugin(seed=0, **SMALL_VAE)], scenario="task")
    with pytest.raises(ValueError, match="one head over all classes"):
        st.train(info.benchmark.train_stream[0])


def test_exact_resume_from_a_saved_state():
    check_exact_resume(lambda seed: NegativeReplayPlugin(seed=seed, **SMALL_VAE))


@pytest.mark.parametrize("kwargs, match", [
    ({"replay_mb_size": 0}, r"replay_mb_size must be in \[1, inf\)"),
    ({"loss_weighting": "sum"}, r"loss_weighting must be one of 'vandeven', 'batch'"),
    ({"vae_fc_units": 0}, r"vae_fc_units must be in \[1, inf\)"),
    ({"x_range": "0-1"}, r"x_range must be None"),
    ({"generator": "vae"}, r"generator must be None .* not an nn.Module"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NegativeReplayPlugin(**kwargs)


# ---------------------------------------------------------------------------- end to end

def _old_inputs_taken_for_current_classes(plugins, seed=0, n_exp=2, epochs=10):
    """Share of the earlier experiences' test inputs that the model assigns to the classes of
    experience ``n_exp`` after training on the first ``n_exp`` experiences (class-IL), and
    their accuracy."""
    exps, preds = train_and_predict_old(plugins, seed, n_exp, epochs)
    current = torch.tensor(exps[n_exp - 1].classes_in_this_experience)
    shares = [float(torch.isin(pred, current).float().mean()) for pred, _ in preds]
    accs = [float((pred == y).float().mean()) for pred, y in preds]
    return float(np.mean(shares)), float(np.mean(accs))


def test_old_class_inputs_are_taken_less_often_for_current_classes_than_naive():
    # seeds 0-2, two experiences (docs/methods/negative_replay.md): naive 1.00 each; negative
    # replay 0.22, 0.01, 0.18 (accuracy 0.78, 0.99, 0.82)
    vae = dict(vae_fc_units=100, vae_z_dim=20, vae_lr=0.003)
    naive, _ = _old_inputs_taken_for_current_classes([])
    nr, nr_acc = _old_inputs_taken_for_current_classes([NegativeReplayPlugin(seed=0, **vae)])
    assert naive > 0.95 and nr < 0.5 and nr_acc > 0.4, (naive, nr, nr_acc)
