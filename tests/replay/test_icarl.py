"""iCaRL: herding, exemplar reduction, NME, the BCE + distillation loss by hand, the training
set (current data + exemplars), state round trip, less forgetting than naive on split_digits."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from torch import nn

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import ClassifierNet, MaskedHead, build_model
from cl_plugins.replay.er import ERPlugin
from cl_plugins.core.exemplars import herding_order
from cl_plugins.replay.icarl import ICaRLPlugin, icarl_bce

from helpers import train_both_equal


def _strategy(plugins, seed=0, sgd=False, metrics=()):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", "class")
    model = build_model({"name": "mlp", "hidden": [32]}, info)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05) if sgd
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    st = Naive(model=model, optimizer=opt, train_mb_size=32, train_epochs=1, eval_mb_size=128,
               device="cpu", plugins=plugins, evaluator=EvaluationPlugin(*metrics, loggers=[]))
    return st, info


def _class_data(dataset, c):
    xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    ys = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return xs[ys == c]


# ---------------------------------------------------------------------------- herding


def test_herding_order_hand_examples():
    # Unit vectors a = (1, 0), b = (0.6, 0.8), c = (0, 1); mu = (8/15, 3/5).
    # k = 1: ||mu - a||^2 = 26/45, ||mu - b||^2 = 2/45, ||mu - c||^2 = 20/45  -> b
    # k = 2: ||mu - (b + a)/2||^2 = 5/45, ||mu - (b + c)/2||^2 = 6.5/45      -> a; then c.
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    assert herding_order(f, 3).tolist() == [1, 0, 2]
    assert herding_order(f, 2).tolist() == [1, 0]
    assert herding_order(f, 10).tolist() == [1, 0, 2]  # m > n: every sample, in order
    # normalize=True makes the scale of each feature irrelevant (phi is L2-normalised)
    assert herding_order(f * torch.tensor([[5.0], [0.5], [7.0]]), 3).tolist() == [1, 0, 2]
    # Raw features (normalize=False): (0, 0), (2, 0), (0, 3); mu = (2/3, 1).
    # k = 1: 13/9, 25/9, 40/9 -> index 0; k = 2: (1, 0) -> 10/9, (0, 1.5) -> 25/36 -> index 2.
    g = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert herding_order(g, 3, normalize=False).tolist() == [0, 2, 1]


def test_herding_matches_the_papers_objective_evaluated_directly():
    gen = torch.Generator().manual_seed(3)
    f = F.normalize(torch.randn(60, 6, generator=gen, dtype=torch.float64), dim=1)
    mu, chosen, s = f.mean(0), [], torch.zeros(6, dtype=torch.float64)
    for k in range(1, 26):  # Algorithm 4, literally
        d = ((mu - (s + f) / k) ** 2).sum(1)
        d[chosen] = float("inf")
        i = int(d.argmin())
        chosen.append(i)
        s = s + f[i]
    assert herding_order(f, 25).tolist() == chosen
    # the chosen prefix's mean approaches mu far faster than a random subset's
    assert (f[chosen[:10]].mean(0) - mu).norm() < 0.3 * (f[:10].mean(0) - mu).norm()


# ---------------------------------------------------------------------------- loss


def test_icarl_bce_hand_example():
    # one sample, 3 classes, label 2, class 0 old with previous logit 0 -> q = 0.5
    z = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    old = torch.tensor([[0.0, 5.0, -5.0]], dtype=torch.float64)  # only column 0 is used
    s = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    expected = (-(0.5 * math.log(s(2.0)) + 0.5 * math.log(1 - s(2.0)))  # q = 0.5
                - math.log(1 - s(-1.0))  # new class, not the label: target 0
                - math.log(s(0.5))) / 3  # the label: target 1
    got = icarl_bce(z, torch.tensor([2]), old, [0])
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # without old classes the target is the one-hot label everywhere
    plain = (-math.log(1 - s(2.0)) - math.log(1 - s(-1.0)) - math.log(s(0.5))) / 3
    assert float(icarl_bce(z, torch.tensor([2]))) == pytest.approx(plain, rel=1e-12)
    # a masked column (logit -1e4, target 0) adds exactly nothing: the mean is over N x C
    zm = torch.cat([z, torch.full((1, 1), -1e4, dtype=torch.float64)], 1)
    oldm = torch.cat([old, torch.zeros(1, 1, dtype=torch.float64)], 1)
    assert float(icarl_bce(zm, torch.tensor([2]), oldm, [0])) * 4 == \
        pytest.approx(expected * 3, rel=1e-12)


class _LossCheck(SupervisedPlugin):
    """First in the plugin list: at before_backward, strategy.loss is the criterion alone."""

    def __init__(self):
        super().__init__()
        self.old = None
        self.checked = 0

    def after_training_exp(self, strategy, **kwargs):
        self.old = copy.deepcopy(strategy.model).eval()

    def before_backward(self, strategy, **kwargs):
        if self.old is None:
            return
        z = strategy.mb_output.detach().double()
        with torch.no_grad():
            q = torch.sigmoid(self.old(strategy.mb_x, strategy.mb_task_id).double())
        n, c = z.shape
        target = torch.zeros(n, c, dtype=torch.float64)
        target[torch.arange(n), strategy.mb_y] = 1.0
        target[:, :2] = q[:, :2]  # classes 0, 1 of the first experience: distilled
        p = torch.sigmoid(z).clamp(1e-300, 1 - 1e-16)
        ent = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
        ent[z <= -1e3] = 0.0  # masked columns: BCE(-1e4, 0) = 0 exactly
        assert float(strategy.loss.detach()) == pytest.approx(float(ent.mean()), rel=1e-5)
        self.checked += 1


def test_training_loss_is_bce_with_distillation_and_the_criterion_is_restored():
    check, icarl = _LossCheck(), ICaRLPlugin(mem_size=40)
    st, info = _strategy([check, icarl])
    crit = st._criterion
    st.train(info.benchmark.train_stream[0])
    assert st._criterion is crit
    st.train(info.benchmark.train_stream[1])
    assert check.checked > 5 and st._criterion is crit
    # the exemplars took part: mb_y held old classes in the second experience
    assert icarl.old_model is not None and not icarl.old_model.training


# ---------------------------------------------------------------------------- NME


class _Flat(nn.Module):
    out_features = 2

    def forward(self, x):
        return x.flatten(1)


def _toy_model(n_classes=4):
    return ClassifierNet(_Flat(), MaskedHead(2, n_classes)).eval()


def test_nme_hand_example_through_after_eval_forward():
    plugin = ICaRLPlugin(mem_size=10)
    # exemplars: class 0 at (2, 0) and (0, 1) -> phi (1, 0), (0, 1) -> mu_0 = (1, 1)/sqrt 2;
    # class 1 at (0, -3) -> mu_1 = (0, -1); class 3 at (-1, 0) -> mu_3 = (-1, 0); no class 2.
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, -3.0], [-1.0, 0.0]]).view(4, 1, 1, 2)
    y = torch.tensor([0, 0, 1, 3])
    plugin.buffer.set_contents(x, y, torch.zeros(4, dtype=torch.long))
    plugin.seen_classes = [0, 1, 3]
    model = _toy_model()
    plugin.compute_class_means(model, "cpu", 2)
    r = 1 / math.sqrt(2)
    assert plugin.mean_classes == [0, 1, 3]
    assert torch.allclose(plugin.class_means, torch.tensor([[r, r], [0, -1.0], [-1.0, 0]]))

    q = torch.tensor([[1.0, 0.2], [0.1, -1.0], [-1.0, 0.5]]).view(3, 1, 1, 2)
    st = SimpleNamespace(model=model, mb_x=q, mb_output=torch.zeros(3, 4), device="cpu")
    plugin.after_eval_forward(st)
    f = F.normalize(q.flatten(1).double(), dim=1)
    means = {0: (r, r), 1: (0.0, -1.0), 3: (-1.0, 0.0)}
    for i in range(3):
        for c, mu in means.items():
            d = math.sqrt((f[i, 0] - mu[0]) ** 2 + (f[i, 1] - mu[1]) ** 2)
            assert float(st.mb_output[i, c]) == pytest.approx(-d, abs=1e-6)
        assert float(st.mb_output[i, 2]) == -1e4  # no exemplars: never predicted
    assert st.mb_output.argmax(1).tolist() == [0, 1, 3]
    assert plugin.predict(model, q).tolist() == [0, 1, 3]
    # classifier="head" leaves the head's outputs alone
    head = ICaRLPlugin(mem_size=10, classifier="head")
    head.class_means, head.mean_classes = plugin.class_means, plugin.mean_classes
    out = torch.randn(3, 4)
    st2 = SimpleNamespace(model=model, mb_x=q, mb_output=out, device="cpu")
    head.after_eval_forward(st2)
    assert st2.mb_output is out


def test_flipped_class_means():
    # backbone = flatten: x = [[3, 1]] -> phi (3, 1)/sqrt 10; its mirror image -> (1, 3)/sqrt 10.
    x = torch.tensor([[3.0, 1.0]]).view(1, 1, 1, 2)
    model = _toy_model(2)
    for flip, expected in ((False, [3 / math.sqrt(10), 1 / math.sqrt(10)]),
                           (True, [1 / math.sqrt(2), 1 / math.sqrt(2)])):
        plugin = ICaRLPlugin(mem_size=4, flip_means=flip)
        plugin.buffer.set_contents(x, torch.tensor([0]), torch.zeros(1, dtype=torch.long))
        plugin.seen_classes = [0]
        plugin.compute_class_means(model, "cpu", 8)
        assert torch.allclose(plugin.class_means[0], torch.tensor(expected))


# ---------------------------------------------------------------------------- memory


class _Spy(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.train_sizes = []

    def before_training_exp(self, strategy, **kwargs):
        self.train_sizes.append(len(strategy.adapted_dataset))


@torch.no_grad()
def _phi(model, x):
    return F.normalize(model.backbone(x).double(), dim=1)


def test_herding_selection_reduction_training_set_and_nme_eval():
    from avalanche.evaluation.metrics import accuracy_metrics

    icarl, spy = ICaRLPlugin(mem_size=40), _Spy()
    st, info = _strategy([icarl, spy], metrics=[accuracy_metrics(experience=True)])
    stream = list(info.benchmark.train_stream)
    st.train(stream[0])
    # 2 classes seen: m = 20 per class, chosen by herding with the trained network
    assert icarl.buffer.class_counts() == {0: 20, 1: 20}
    st.model.eval()
    first = {}
    for c in (0, 1):
        xc = _class_data(stream[0].dataset, c)
        order = herding_order(_phi(st.model, xc), 20)
        rows = icarl.buffer.x[icarl.buffer.y == c]
        assert torch.equal(rows, xc[order])
        first[c] = rows.clone()
    st.train(stream[1])
    # training set of experience 1 = its data + the 40 exemplars
    assert spy.train_sizes == [len(stream[0].dataset), len(stream[1].dataset) + 40]
    # 4 classes: m = 10; the old classes keep the first 10 of their herding order
    assert icarl.buffer.class_counts() == {c: 10 for c in range(4)}
    for c in (0, 1):
        assert torch.equal(icarl.buffer.x[icarl.buffer.y == c], first[c][:10])
    st.model.eval()
    for c in (2, 3):
        xc = _class_data(stream[1].dataset, c)
        assert torch.equal(icarl.buffer.x[icarl.buffer.y == c],
                           xc[herding_order(_phi(st.model, xc), 10)])
    # class means: normalised means of the exemplars' phi, with the current network
    assert icarl.mean_classes == [0, 1, 2, 3]
    for k, c in enumerate(icarl.mean_classes):
        mu = F.normalize(_phi(st.model, icarl.buffer.x[icarl.buffer.y == c]).mean(0), dim=0)
        assert torch.allclose(icarl.class_means[k].double(), mu, atol=1e-6)
    # evaluation reports NME accuracy
    res = st.eval(info.benchmark.test_stream[:2])
    for j in range(2):
        ds = info.benchmark.test_stream[j].dataset
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
        f = _phi(st.model, xs).float()
        pred = torch.cdist(f, icarl.class_means).argmin(1)
        acc = float((pred == ys).double().mean())
        key = [k for k in res if k.startswith("Top1_Acc_Exp/eval_phase/test_stream")
               and k.endswith(f"Exp{j:03d}")][0]
        assert res[key] == pytest.approx(acc, abs=1e-9)


def test_per_class_budget_grows_the_memory():
    icarl = ICaRLPlugin(mem_size=5, fixed_memory=False)
    st, info = _strategy([icarl])
    for e in list(info.benchmark.train_stream)[:3]:
        st.train(e)
    assert icarl.buffer.class_counts() == {c: 5 for c in range(6)}
    with pytest.raises(ValueError, match="mem_size=3 is smaller than the 4 classes"):
        ICaRLPlugin(mem_size=3).per_class(4)


# ---------------------------------------------------------------------------- ownership


def test_icarl_owns_the_dataloader():
    st, info = _strategy([ICaRLPlugin(mem_size=20), ReplayPlugin(mem_size=20)])
    with pytest.raises(ValueError, match=r"ICaRLPlugin \('icarl'\) and ReplayPlugin"):
        st.train(info.benchmark.train_stream[0])
    st, info = _strategy([ERPlugin(mem_size=20, seed=0), ICaRLPlugin(mem_size=20)])
    with pytest.raises(ValueError, match="ERPlugin.*ICaRLPlugin"):
        st.train(info.benchmark.train_stream[0])
    st, info = _strategy([ICaRLPlugin(mem_size=20), ICaRLPlugin(mem_size=20)])
    with pytest.raises(ValueError, match="ICaRLPlugin.*ICaRLPlugin"):
        st.train(info.benchmark.train_stream[0])


def test_incompatible_model_is_named():
    info = build_benchmark("split_digits", "task")
    model = build_model({"name": "mlp", "hidden": [8]}, info)
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               train_mb_size=32, device="cpu", plugins=[ICaRLPlugin(mem_size=20)],
               evaluator=EvaluationPlugin(loggers=[]))
    with pytest.raises(ValueError, match="MultiHeadClassifier"):
        st.train(info.benchmark.train_stream[0])


# ---------------------------------------------------------------------------- state


@pytest.mark.parametrize("kwargs", [{"mem_size": 30}, {"mem_size": 4, "fixed_memory": False}])
def test_state_round_trip_resumes_identically(kwargs):
    a = ICaRLPlugin(**kwargs)
    st_a, info = _strategy([a], sgd=True)
    stream = list(info.benchmark.train_stream)
    for e in stream[:2]:
        st_a.train(e)
    state = copy.deepcopy(a.state_dict())
    model_state = copy.deepcopy(st_a.model.state_dict())
    b = ICaRLPlugin(**kwargs)
    b.load_state_dict(state)
    assert torch.equal(b.class_means, a.class_means) and b.mean_classes == a.mean_classes
    assert torch.equal(b.buffer.x, a.buffer.x) and torch.equal(b.buffer.y, a.buffer.y)
    st_b, _ = _strategy([b], sgd=True, seed=7)
    train_both_equal(st_a, st_b, stream[2], model_state=model_state)
    assert torch.equal(a.buffer.x, b.buffer.x) and torch.equal(a.class_means, b.class_means)
    for (ka, va), (kb, vb) in zip(a.old_model.state_dict().items(),
                                  b.old_model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    ra, rb = st_a.eval(info.benchmark.test_stream[:3]), st_b.eval(info.benchmark.test_stream[:3])
    assert {k: v for k, v in ra.items() if "Top1_Acc_Exp" in k} == \
        {k: v for k, v in rb.items() if "Top1_Acc_Exp" in k}
    with pytest.raises(ValueError, match="mem_size"):
        ICaRLPlugin(mem_size=31).load_state_dict(state)


# ---------------------------------------------------------------------------- end to end


def test_icarl_forgets_much_less_than_naive(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "class"
    # seeds 0-2: naive ends near 0.29 ACC / -0.6 BWT, iCaRL near 0.84 / -0.05
    digits_cfg["methods"] = [
        "naive",
        {"name": "icarl", "params": {"mem_size": 200}},
        {"name": "icarl", "params": {"mem_size": 200}, "plus": [
            {"name": "si", "params": {"si_lambda": 1.0}}]},
    ]
    naive, icarl, icarl_si = run_experiment(digits_cfg, echo=lambda *a: None)
    for r in (naive, icarl, icarl_si):
        assert r["status"] == "finished", r.get("error")
    assert icarl["summary"]["bwt"] > naive["summary"]["bwt"] + 0.3, icarl["summary"]
    assert icarl["summary"]["acc"] > naive["summary"]["acc"] + 0.4, icarl["summary"]
    assert icarl_si["matrix"] != icarl["matrix"]  # the second plugin takes part
    assert icarl_si["summary"]["acc"] > naive["summary"]["acc"] + 0.3


# ---------------------------------------------------------------------------- arguments


def test_bad_arguments():
    with pytest.raises(ValueError, match="mem_size"):
        ICaRLPlugin(mem_size=0)
    with pytest.raises(ValueError, match="fixed_memory"):
        ICaRLPlugin(fixed_memory=1)
    with pytest.raises(ValueError, match="classifier"):
        ICaRLPlugin(classifier="ncm")
    with pytest.raises(ValueError, match="loss"):
        ICaRLPlugin(loss="softmax")
    with pytest.raises(ValueError, match="flip_means"):
        ICaRLPlugin(flip_means="yes")
    with pytest.raises(ValueError, match="x_dtype"):
        ICaRLPlugin(x_dtype="float8")
