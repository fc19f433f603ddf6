"""multihead: the header and arguments; on Avalanche's MultiHeadClassifier it is naive; a user's
single Linear head gets per-task heads that train and evaluate exactly like a
MultiHeadClassifier's (and resume through the runner's checkpoint); class-IL row heads (no
gradient to other experiences' rows, the task view); the frozen backbone; the refusals; the
state and the cost report."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_plugins.architectural.multihead import MultiHeadPlugin
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.models import build_model
from cl_plugins.registry import signature_defaults

from helpers import param_copies, train_both_equal


@functools.lru_cache(maxsize=None)
def benchmark(scenario):
    return build_benchmark("split_digits", scenario)


def strategy(plugins, scenario="task", head="auto", seed=0, momentum=0.9, batch_norm=False):
    torch.manual_seed(seed)
    info = benchmark(scenario)
    model = build_model({"name": "mlp", "hidden": [16], "head": head,
                         "batch_norm": batch_norm}, info)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    st = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=32,
               train_epochs=1, eval_mb_size=256, device="cpu", plugins=plugins,
               evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    return st, list(info.benchmark.train_stream), list(info.benchmark.test_stream), model


def accuracies(st, test):
    res = st.eval(test)  # also holds the last value of every experience evaluated before
    return [res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{e.task_label:03d}/"
                f"Exp{e.current_experience:03d}"] for e in test]


def test_registry_header_and_arguments():
    defaults = signature_defaults(MultiHeadPlugin)
    assert defaults == {"freeze_backbone": False}
    assert MultiHeadPlugin.METHOD_NAME == "multihead"
    assert MultiHeadPlugin.SCENARIOS == ("task", "class") and not MultiHeadPlugin.NEEDS_TASK_LABELS
    assert set(MultiHeadPlugin.SWEEP) <= set(defaults)
    with pytest.raises(ValueError, match="freeze_backbone"):
        MultiHeadPlugin(freeze_backbone="yes")


def test_on_a_multihead_classifier_it_trains_exactly_what_naive_trains():
    runs = []
    for plugins in ([], [MultiHeadPlugin()]):
        st, train, test, model = strategy(plugins)
        for exp in train[:3]:
            st.train(exp)
        runs.append((param_copies(model), accuracies(st, test[:3])))
    (pa, aa), (pb, ab) = runs
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert aa == ab


def test_single_linear_head_gets_per_task_heads_equal_to_a_multihead_classifier():
    """SGD with momentum: a new task's head must start without the old head's momentum."""
    mh, slot = MultiHeadPlugin(), MultiHeadPlugin()
    accs, models = [], []
    for plugin, head in ((mh, "auto"), (slot, "linear")):  # the same random draws, in order
        st, train, test, model = strategy([plugin], head=head)
        for exp in train[:3]:
            st.train(exp)
        accs.append(accuracies(st, test[:3]))
        models.append(model)
    model_a, model_b = models
    assert mh.mode == "heads" and slot.mode == "slot"
    for n, p in model_a.backbone.named_parameters():
        assert torch.equal(p, dict(model_b.backbone.named_parameters())[n]), n
    for t in range(3):
        clf = model_a.head.classifiers[str(t)].classifier
        assert torch.equal(clf.weight, slot.heads[t]["weight"])
        assert torch.equal(clf.bias, slot.heads[t]["bias"])
    assert accs[0] == accs[1] and min(accs[1]) > 0.8
    assert torch.equal(model_b.head.weight, slot.heads[2]["weight"])  # put back after eval
    assert slot.cost_per_task() == mh.cost_per_task() == {t: {"params": 34, "bytes": 136}
                                                          for t in range(3)}


def _by_hand(model, head, exp):
    """Accuracy of backbone + ``head`` (a stored weight/bias pair) on a test experience."""
    loader = torch.utils.data.DataLoader(exp.dataset.eval(), batch_size=10_000)
    x, y = next(iter(loader))[:2]
    with torch.no_grad():
        pred = (model.backbone(x) @ head["weight"].T + head["bias"]).argmax(1)
    return (pred == y).float().mean().item()


def test_slot_evaluation_uses_each_tasks_head_and_old_heads_stay():
    slot = MultiHeadPlugin()
    st, train, test, model = strategy([slot], head="linear")
    st.train(train[0])
    head0 = copy.deepcopy(slot.heads[0])
    st.train(train[1])
    assert torch.equal(slot.heads[0]["weight"], head0["weight"])  # kept while task 1 trained
    assert not torch.equal(model.head.weight, head0["weight"])  # the Linear holds task 1's
    acc = accuracies(st, test[:2])
    assert acc[0] == pytest.approx(_by_hand(model, head0, test[0]), abs=1e-6)
    assert acc[1] == pytest.approx(_by_hand(model, slot.heads[1], test[1]), abs=1e-6)
    assert acc[0] != pytest.approx(_by_hand(model, slot.heads[1], test[0]), abs=1e-6)
    slot.heads[1] = {k: torch.zeros_like(v) for k, v in slot.heads[1].items()}
    assert accuracies(st, test[1:2])[0] == acc[1]  # the active task: the live Linear is read


def test_class_il_rows_other_experiences_get_no_gradient_and_task_view():
    plugin = MultiHeadPlugin()
    st, train, _, model = strategy([plugin], scenario="class", momentum=0.0)
    st.train(train[0])
    lin = model.head.linear
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    st.train(train[1])
    assert plugin.mode == "rows" and plugin.classes == [[0, 1], [2, 3]]
    old = torch.tensor([0, 1])
    assert torch.equal(lin.weight[old], w0[old]) and torch.equal(lin.bias[old], b0[old])
    assert not torch.equal(lin.weight[2:4], w0[2:4])
    assert plugin.cost_per_task() == {0: {"params": 34, "bytes": 136},
                                      1: {"params": 34, "bytes": 136}}
    naive, _, _, model_n = strategy([], scenario="class", momentum=0.0)
    for exp in train[:2]:
        naive.train(exp)
    assert not torch.equal(model_n.head.linear.weight[old], w0[old])  # naive moves them


def test_refusals():
    st, train, _, _ = strategy([MultiHeadPlugin()], scenario="domain")
    st.train(train[0])
    with pytest.raises(ValueError, match=r"holds classes \[0, 1\] trained before"):
        st.train(train[1])
    plugin = MultiHeadPlugin()
    st, train, _, _ = strategy([plugin], head="linear")
    st.train(train[0])
    with pytest.raises(ValueError, match=r"task label\(s\) \[0\], already trained"):
        st.train(train[0])


def test_freeze_backbone_keeps_the_backbone_and_its_statistics():
    plugin = MultiHeadPlugin(freeze_backbone=True)
    st, train, _, model = strategy([plugin], batch_norm=True)
    st.train(train[0])
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head0 = model.head.classifiers["0"].classifier.weight.detach().clone()
    for exp in train[1:3]:
        st.train(exp)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert torch.equal(model.head.classifiers["0"].classifier.weight, head0)
    assert not torch.equal(model.head.classifiers["2"].classifier.weight,
                           torch.zeros_like(head0))


@pytest.mark.parametrize("head", ["linear", "auto"])
def test_state_round_trip_resumes_exactly(head):
    a = MultiHeadPlugin()
    st_a, train, _, model_a = strategy([a], head=head, momentum=0.0)
    for exp in train[:2]:
        st_a.train(exp)
    state = copy.deepcopy(a.state_dict())
    b = MultiHeadPlugin()
    b.load_state_dict(state)
    st_b, _, _, _ = strategy([b], head=head, seed=5, momentum=0.0)
    for exp in train[:2]:  # grow the MultiHeadClassifier as the runner's restore does
        avalanche_model_adaptation(st_b.model, exp)
    train_both_equal(st_a, st_b, train[2], (), copy.deepcopy(model_a.state_dict()))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.heads[t]["weight"], b.heads[t]["weight"]) for t in a.heads)
    with pytest.raises(ValueError, match="freeze_backbone"):
        MultiHeadPlugin(freeze_backbone=True).load_state_dict(state)


# ----------------------------------------------------- through the runner: checkpoint, resume

class _Stop(RuntimeError):
    pass


@pytest.mark.parametrize("scenario,head", [("task", "linear"), ("class", "auto")])
def test_runner_checkpoint_resumes_into_the_uninterrupted_run(digits_cfg, monkeypatch, scenario,
                                                             head):
    from cl_plugins.experiment.config import validate
    from cl_plugins.experiment.runner import run_single

    def cfg(suffix):
        c = copy.deepcopy(digits_cfg)
        c["benchmark"]["scenario"] = scenario
        c["model"]["head"] = head
        c["strategy"]["epochs"] = 1
        c["optimizer"].update(name="sgd", lr=0.05, momentum=0.9)
        c["output_dir"] += suffix
        return validate(c)

    entry = {"name": "multihead", "params": {}, "plus": []}
    ref_cfg = cfg("_ref")
    ref = run_single(ref_cfg, entry, 0, Path(ref_cfg["output_dir"]), progress=False)
    assert ref["status"] == "finished" and ref["checkpoint"].endswith(".ckpt.pt")
    owner = next(c for c in Naive.__mro__ if "train" in vars(c))
    original, calls = owner.train, {"n": 0}

    def train(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Stop()
        return original(self, *args, **kwargs)

    c = cfg("")
    monkeypatch.setattr(owner, "train", train)
    with pytest.raises(_Stop):
        run_single(c, entry, 0, Path(c["output_dir"]), progress=False)
    monkeypatch.setattr(owner, "train", original)
    resumed = run_single(c, entry, 0, Path(c["output_dir"]), progress=False)
    assert [r["after_experiences"] for r in resumed["resumed"]] == [2]
    assert resumed["matrix"] == ref["matrix"]
    assert resumed["matrix_task_view"] == ref["matrix_task_view"]
    if scenario == "class":  # the task view is the multi-head evaluation: task 0 kept
        assert ref["matrix_task_view"][-1][0] > 0.9 > ref["matrix"][-1][0]
