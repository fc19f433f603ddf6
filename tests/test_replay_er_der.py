"""ER and DER/DER++: the dataloader-ownership rule, the replayed minibatch, DER's loss terms by
hand, state round trip, less forgetting than naive on split_digits, composition with EWC/SI."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.buffer import ReplayBuffer
from cl_plugins.core.replay_loader import claim_dataloader, dataloader_owners
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import build_model
from cl_plugins.registry import MethodSpec, _REGISTRY, get_method
from cl_plugins.replay.der import DERPlugin
from cl_plugins.replay.er import ERPlugin


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and immune to a busy machine (two threads
    spin-waiting on shared cores made these runs ~20x slower there)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def registered():
    """Register er and der for run_experiment (restoring whatever was there before)."""
    get_method("naive")  # load the built-in registry first
    saved = {n: _REGISTRY.get(n) for n in ("er", "der")}
    _REGISTRY["er"] = MethodSpec.from_plugin(ERPlugin)
    _REGISTRY["der"] = MethodSpec.from_plugin(DERPlugin)
    try:
        yield
    finally:
        for n, spec in saved.items():
            if spec is None:
                _REGISTRY.pop(n, None)
            else:
                _REGISTRY[n] = spec


def _strategy(plugins, scenario="class", lr=1e-3, sgd=False, seed=0):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": [32]}, info)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05) if sgd
           else torch.optim.Adam(model.parameters(), lr=lr))
    st = Naive(model=model, optimizer=opt, train_mb_size=32, train_epochs=1, eval_mb_size=256,
               device="cpu", plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    return st, info


# ---------------------------------------------------------------------------- ownership


class _LoaderOwner(SupervisedPlugin):
    METHOD_NAME = "owner_a"
    SETS_DATALOADER = True

    def before_training_exp(self, strategy, **kwargs):
        claim_dataloader(strategy, self)


class _OtherOwner(_LoaderOwner):
    METHOD_NAME = "owner_b"


def test_two_dataloader_claimants_raise_naming_both():
    a, b = _LoaderOwner(), _OtherOwner()
    st, info = _strategy([a, b])
    with pytest.raises(ValueError, match=r"_LoaderOwner \('owner_a'\) and _OtherOwner "
                                         r"\('owner_b'\)"):
        st.train(info.benchmark.train_stream[0])
    # Avalanche's own ReplayPlugin is recognised as a claimant
    replay = ReplayPlugin(mem_size=10)
    st, _ = _strategy([_LoaderOwner(), replay])
    assert dataloader_owners(st)[-1] is replay
    with pytest.raises(ValueError, match="_LoaderOwner.*and ReplayPlugin"):
        claim_dataloader(st, st.plugins[0])
    st, _ = _strategy([_LoaderOwner()])
    claim_dataloader(st, st.plugins[0])  # a single claimant is fine


@pytest.mark.parametrize("cls", [ERPlugin, DERPlugin])
def test_stream_replay_refuses_a_dataloader_owner(cls):
    st, info = _strategy([cls(mem_size=20, seed=0), ReplayPlugin(mem_size=20)])
    with pytest.raises(ValueError, match=f"{cls.__name__}.*ReplayPlugin"):
        st.train(info.benchmark.train_stream[0])


# ---------------------------------------------------------------------------- ER


class _BatchSpy(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.sizes, self.tasks = [], []

    def after_forward(self, strategy, **kwargs):
        self.sizes.append((strategy.experience.current_experience, strategy.mb_x.shape[0],
                           strategy.mb_output.shape[0]))
        self.tasks.append(set(strategy.mb_task_id.tolist()))


def test_er_appends_a_memory_batch_and_stores_only_stream_samples():
    er, spy = ERPlugin(mem_size=100, replay_mb_size=16, seed=0), _BatchSpy()
    st, info = _strategy([er, spy], scenario="task")
    stream = list(info.benchmark.train_stream)
    n_train = [len(e.dataset) for e in stream[:3]]
    for e in stream[:3]:
        st.train(e)
    # first step trains on the incoming batch alone; every later step has 16 replayed samples
    assert spy.sizes[0] == (0, 32, 32)
    tails = {n % 32 for n in n_train}
    assert all(s[1] == s[2] and s[1] - 16 in {32} | tails for s in spy.sizes[1:]), spy.sizes
    assert er.buffer.n_seen == sum(n_train)  # replayed samples are never stored again
    assert len(er.buffer) == 100 and set(er.buffer.t.tolist()) == {0, 1, 2}
    # task-IL multi-head: mixed-task batches go through the per-task heads
    assert any(len(t) > 1 for t in spy.tasks[-5:])
    # every stored sample is a sample of its task's training data, with its label
    for k in range(0, 100, 9):
        ds = stream[int(er.buffer.t[k])].dataset
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
        hit = (xs == er.buffer.x[k]).flatten(1).all(1)
        assert hit.any() and int(ys[hit][0]) == int(er.buffer.y[k])


def test_er_stores_unaugmented_samples_and_augments_its_memory_batch():
    from cl_plugins.core.augment import BatchAugmentPlugin

    er, spy = ERPlugin(mem_size=40, replay_mb_size=8, seed=0), _BatchSpy()
    st, info = _strategy([BatchAugmentPlugin(padding=2), er, spy])  # augmenter runs first
    seen = []

    class _Rows(SupervisedPlugin):
        def after_forward(self, strategy, **kwargs):
            seen.append(strategy.mb_x[-8:].clone())

    st.plugins.append(_Rows())
    exp = info.benchmark.train_stream[0]
    st.train(exp)
    xs = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))]).flatten(1)
    # every stored sample is an exact (unaugmented) training sample
    assert all((xs == row).all(1).any() for row in er.buffer.x.flatten(1))
    # the appended memory rows were augmented by ER itself (crops shift pixels off the grid)
    replayed = torch.cat(seen[1:]).flatten(1)
    exact = torch.tensor([bool((xs == row).all(1).any()) for row in replayed])
    assert exact.float().mean() < 0.5


def test_er_class_balanced_policy_balances_classes():
    er = ERPlugin(mem_size=60, policy="class_balanced", seed=0)
    st, info = _strategy([er])
    for e in list(info.benchmark.train_stream)[:3]:
        st.train(e)
    assert er.buffer.class_counts() == {c: 10 for c in range(6)}


# ---------------------------------------------------------------------------- ER, van de Ven


def _dataset_rows(ds):
    xs = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
    ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    return xs, ys


def test_er_mem_per_class_fills_at_experience_end_and_grows():
    er, spy = ERPlugin(mem_size=None, mem_per_class=5, replay_mb_size=8, seed=0), _BatchSpy()
    st, info = _strategy([er, spy], scenario="class")
    stream = list(info.benchmark.train_stream)
    st.train(stream[0])
    # nothing is stored or replayed while the first experience is trained
    assert all(s[1] == s[2] and s[1] <= 32 for s in spy.sizes) and er.n_trained == 1
    assert er.store.class_counts() == {0: 5, 1: 5} and er.memory.sizes == [10]
    first = er.store.x.clone()
    spy.sizes.clear()
    st.train(stream[1])
    # every step of the second experience replays 8 samples, of the first experience's classes
    assert all(s[1] - 8 in {32, len(stream[1].dataset) % 32} for s in spy.sizes), spy.sizes
    assert er.store.class_counts() == {c: 5 for c in range(4)} and len(er.store) == 20
    assert torch.equal(er.store.x[:10], first)  # the first experience's samples stay
    for k, e in enumerate(stream[:2]):
        xs, ys = _dataset_rows(e.dataset)
        rows = er.store.x[10 * k:10 * (k + 1)].flatten(1)
        hit = (xs[None] == rows[:, None]).all(-1)
        assert hit.any(1).all() and hit.float().argmax(1).unique().numel() == 10  # distinct
        assert torch.equal(ys[hit.float().argmax(1)], er.store.y[10 * k:10 * (k + 1)])


class _LossRecorder(SupervisedPlugin):
    """Placed after ER: checks strategy.loss against the two weighted means by hand."""

    def __init__(self, er):
        super().__init__()
        self.er, self.checked = er, []

    def before_backward(self, strategy, **kwargs):
        n = self.er._incoming[0].shape[0]
        out, y = strategy.mb_output, strategy.mb_y
        if out.shape[0] == n:
            return
        t = strategy.experience.current_experience + 1
        cur, rep = F.cross_entropy(out[:n], y[:n]), F.cross_entropy(out[n:], y[n:])
        if self.er.loss_weighting == "vandeven":
            expected = cur / t + (1 - 1 / t) * rep
        else:
            expected = F.cross_entropy(out, y)
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        g = torch.autograd.grad(strategy.loss, params, retain_graph=True, allow_unused=True)
        g_exp = torch.autograd.grad(expected, params, retain_graph=True, allow_unused=True)
        for a, b, p in zip(g, g_exp, params):  # None: a head the loss does not touch
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
        assert float(strategy.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
        self.checked.append(t)


@pytest.mark.parametrize("weighting", ["vandeven", "batch"])
def test_er_loss_weighting_by_hand(weighting):
    er = ERPlugin(mem_size=None, mem_per_class=10, replay_mb_size=16, seed=0,
                  loss_weighting=weighting)
    rec = _LossRecorder(er)
    st, info = _strategy([er, rec], scenario="class")
    for e in list(info.benchmark.train_stream)[:3]:
        st.train(e)
    assert set(rec.checked) == {2, 3} and len(rec.checked) > 10
    # the weights themselves (ER takes them from cl_plugins.core.schedule)
    from cl_plugins.core.schedule import vandeven_weights
    assert vandeven_weights(1) == (1.0, 0.0)
    assert vandeven_weights(4) == (0.25, 0.75)


def test_er_per_task_sampling_balances_past_tasks():
    er = ERPlugin(mem_size=None, mem_per_class=5, replay_mb_size=8, seed=0,
                  batch_sampling="per_task")
    tails = []

    class _Tail(SupervisedPlugin):
        def after_forward(self, strategy, **kwargs):
            n = er._incoming[0].shape[0]
            tails.append((strategy.experience.current_experience,
                          strategy.mb_task_id[n:].tolist()))

    st, info = _strategy([er, _Tail()], scenario="task")
    for e in list(info.benchmark.train_stream)[:4]:
        st.train(e)
    for exp, t in tails:
        if exp == 0:
            assert t == []
        else:  # ceil(8 / exp) samples of each past task, grouped by task
            k = -(-8 // exp)
            assert t == sorted(t) and all(t.count(j) == k for j in range(exp)), (exp, t)
            assert len(t) == k * exp
    # an online memory with one task label per sample is left as it was
    online = ERPlugin(mem_size=30, replay_mb_size=8, seed=0, batch_sampling="per_task")
    st, info = _strategy([online], scenario="class")
    st.train(info.benchmark.train_stream[0])
    assert len(online.store) == 30


# ---------------------------------------------------------------------------- DER


class _LossSpy(SupervisedPlugin):
    """Placed before DER: records the loss and a copy of DER's memory before DER acts."""

    def __init__(self, der):
        super().__init__()
        self.der, self.records = der, []

    def before_training_iteration(self, strategy, **kwargs):
        m = strategy.model
        with torch.no_grad():  # the unmasked logits the step will compute (before the update)
            self.pre_logits = m.head.linear(m.backbone(strategy.mb_x)).clone()

    def before_backward(self, strategy, **kwargs):
        self.loss0 = float(strategy.loss.detach())
        self.state = copy.deepcopy(self.der.buffer.state_dict())


class _LossCheck(SupervisedPlugin):
    """Placed after DER: recomputes DER's terms by hand from the same memory draws."""

    def __init__(self, der, spy):
        super().__init__()
        self.der, self.spy, self.checked = der, spy, 0

    def before_backward(self, strategy, **kwargs):
        if not self.spy.state["size"]:
            assert float(strategy.loss.detach()) == self.spy.loss0
            return
        buf = ReplayBuffer(self.der.buffer.capacity, seed=0)
        buf.load_state_dict(self.spy.state)
        b1, b2 = buf.sample(16), buf.sample(16)
        m = strategy.model
        with torch.no_grad():
            x = torch.cat([b1.x, b2.x])
            raw = m.head.linear(m.backbone(x))
            out = m(x, torch.cat([b1.t, b2.t]))
        assert torch.all(out[:, 6:] == -1e4) or strategy.experience.current_experience > 2
        expected = (0.3 * ((raw[:16] - b1.logits) ** 2).mean()
                    + 0.7 * F.cross_entropy(out[16:], b2.y))
        added = float(strategy.loss.detach()) - self.spy.loss0
        assert added == pytest.approx(float(expected), rel=1e-4)
        self.checked += 1


def test_der_loss_terms_by_hand_and_stored_logits():
    der = DERPlugin(mem_size=50, alpha=0.3, beta=0.7, replay_mb_size=16, seed=0)
    spy = _LossSpy(der)
    check = _LossCheck(der, spy)
    st, info = _strategy([spy, der, check])
    first = []

    class _First(SupervisedPlugin):
        def after_training_iteration(self, strategy, **kwargs):
            if not first:  # runs after DER's memory update of the first step
                first.append((spy.pre_logits, der.buffer.logits.clone()))

    st.plugins.append(_First())
    st.train(info.benchmark.train_stream[0])
    # the first step's logits, computed before its update, are stored in slots 0..31; they are
    # the *unmasked* logits: classes 2..9 were masked in the output but are network values here
    pre, stored = first[0]
    assert stored.shape == (32, 10) and torch.allclose(stored, pre, atol=1e-6)
    assert der.buffer.logits.abs().max() < 100
    st.train(info.benchmark.train_stream[1])
    assert check.checked > 10


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_der_variants_run_in_task_and_domain_il(scenario):
    for alpha, beta in ((0.5, 0.0), (0.0, 1.0), (0.5, 1.0)):
        der = DERPlugin(mem_size=40, alpha=alpha, beta=beta, seed=0)
        st, info = _strategy([der], scenario=scenario)
        for e in list(info.benchmark.train_stream)[:2]:
            st.train(e)
        assert der.buffer.stores_logits and len(der.buffer) == 40
        assert der.buffer.logits.shape[1] == 2  # the two outputs of the (per-task) head
        if scenario == "task":
            assert set(der.buffer.t.tolist()) == {0, 1}


# ---------------------------------------------------------------------------- state


@pytest.mark.parametrize("make", [lambda: ERPlugin(mem_size=40, seed=1),
                                  lambda: ERPlugin(mem_size=40, seed=1, policy="class_balanced"),
                                  lambda: ERPlugin(mem_size=None, mem_per_class=8, seed=1,
                                                   loss_weighting="vandeven",
                                                   batch_sampling="per_task"),
                                  lambda: DERPlugin(mem_size=40, seed=1)])
def test_state_round_trip_resumes_identically(make):
    a = make()
    st_a, info = _strategy([a], sgd=True)
    stream = list(info.benchmark.train_stream)
    for e in stream[:2]:
        st_a.train(e)
    state = copy.deepcopy(a.state_dict())
    model_state = copy.deepcopy(st_a.model.state_dict())
    b = make()
    if getattr(b, "memory", None) is not None:  # ER's experience-end memory
        b.memory.generator.manual_seed(12345)  # must be overwritten by the state
        assert b.store is None and a.n_trained == 2
    else:
        b.buffer.generator.manual_seed(12345)  # must be overwritten by the state
    b.load_state_dict(state)
    st_b, _ = _strategy([b], sgd=True, seed=7)
    # the model must have the same heads/masks before loading its weights: adapt it first
    for e in stream[:2]:
        st_b.model.adaptation(e)
    st_b.model.load_state_dict(model_state)
    for st in (st_a, st_b):
        torch.manual_seed(99)  # same dataloader shuffling
        st.train(stream[2])
    for pa, pb in zip(st_a.model.parameters(), st_b.model.parameters()):
        assert torch.equal(pa, pb)
    sa, sb = (p.store if isinstance(p, ERPlugin) else p.buffer for p in (a, b))
    assert torch.equal(sa.x, sb.x) and sa.n_seen == sb.n_seen
    if isinstance(a, ERPlugin):
        assert a.n_trained == b.n_trained == 3


# ---------------------------------------------------------------------------- end to end


def test_er_and_derpp_forget_much_less_than_naive_and_compose(digits_cfg, registered):
    digits_cfg["benchmark"]["scenario"] = "class"
    # 5 epochs: naive ends near 0.19 ACC / -0.98 BWT, ER and DER++ near 0.75 / -0.25 (seeds 0-2)
    digits_cfg["strategy"]["epochs"] = 5
    digits_cfg["methods"] = [
        "naive",
        {"name": "er", "params": {"mem_size": 300}},
        {"name": "der", "params": {"mem_size": 300}},
        # composition through the runner's "plus": one strategy, two plugins
        {"name": "er", "params": {"mem_size": 300},
         "plus": [{"name": "ewc", "params": {"ewc_lambda": 1.0}}]},
        {"name": "der", "params": {"mem_size": 300},
         "plus": [{"name": "si", "params": {"si_lambda": 10.0}}]},
    ]
    naive, er, der, er_ewc, der_si = run_experiment(digits_cfg, echo=lambda *a: None)
    for r in (naive, er, der, er_ewc, der_si):
        assert r["status"] == "finished", r.get("error")
    assert er_ewc["method"] == "er+ewc" and der_si["method"] == "der+si"
    for r in (er, der):
        assert r["summary"]["bwt"] > naive["summary"]["bwt"] + 0.5, (r["method"], r["summary"])
        assert r["summary"]["acc"] > naive["summary"]["acc"] + 0.4, (r["method"], r["summary"])
        a = np.asarray(r["matrix"])
        assert a[-1, :4].mean() > 0.5  # old classes are still recognised at the end
    # the second plugin takes part (same seed, different training) and replay still works
    assert er_ewc["matrix"] != er["matrix"] and der_si["matrix"] != der["matrix"]
    for r in (er_ewc, der_si):
        assert r["summary"]["acc"] > naive["summary"]["acc"] + 0.3, (r["method"], r["summary"])


# ---------------------------------------------------------------------------- arguments


def test_bad_arguments():
    with pytest.raises(ValueError, match="mem_size"):
        ERPlugin(mem_size=0)
    with pytest.raises(ValueError, match="replay_mb_size"):
        ERPlugin(replay_mb_size=0)
    with pytest.raises(ValueError, match="policy"):
        ERPlugin(policy="ring")
    with pytest.raises(ValueError, match="x_dtype"):
        ERPlugin(x_dtype="float8")
    with pytest.raises(ValueError, match="mem_per_class"):
        ERPlugin(mem_size=None, mem_per_class=0)
    with pytest.raises(ValueError, match="set mem_size=None"):
        ERPlugin(mem_per_class=100)  # the default mem_size=500 is the online memory's
    with pytest.raises(ValueError, match="mem_size=None needs mem_per_class"):
        ERPlugin(mem_size=None)
    with pytest.raises(ValueError, match="leave policy"):
        ERPlugin(mem_size=None, mem_per_class=10, policy="class_balanced")
    with pytest.raises(ValueError, match="x_dtype"):
        ERPlugin(mem_size=None, mem_per_class=10, x_dtype="float8")
    with pytest.raises(ValueError, match="loss_weighting"):
        ERPlugin(loss_weighting="1/t")
    with pytest.raises(ValueError, match="batch_sampling"):
        ERPlugin(batch_sampling="balanced")
    with pytest.raises(ValueError, match="mem_per_class"):  # a state of the other memory kind
        ERPlugin(mem_size=10, seed=0).load_state_dict(
            ERPlugin(mem_size=None, mem_per_class=3, seed=0).state_dict())
    with pytest.raises(ValueError, match="alpha"):
        DERPlugin(alpha=-0.1)
    with pytest.raises(ValueError, match="beta"):
        DERPlugin(beta=-1)
    with pytest.raises(ValueError, match="seed"):
        DERPlugin(seed=-3)


def test_per_experience_policy_replays_only_past_experiences_with_an_equal_split():
    # Hsu et al.'s Naive_Rehearsal memory: filled at the end of each experience, mem_size split
    # equally over the experiences seen, never the current experience's samples.
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    plugin = ERPlugin(mem_size=10, policy="per_experience", seed=0)
    assert plugin.store is None  # nothing before the first experience ends
    for k in range(3):
        x = torch.full((20, 2), float(k))
        ds = TensorDataset(x, torch.full((20,), k), torch.zeros(20, dtype=torch.long))
        st = SimpleNamespace(experience=SimpleNamespace(dataset=ds))
        plugin.after_training_exp(st)
        xs = plugin.store.get(torch.arange(len(plugin.store))).x
        counts = torch.bincount(xs[:, 0].long(), minlength=k + 1).tolist()
        assert counts == [10 // (k + 1)] * (k + 1), counts  # 10 // k per experience
    state = plugin.state_dict()
    other = ERPlugin(mem_size=10, policy="per_experience", seed=5)
    other.load_state_dict(state)
    assert len(other.store) == len(plugin.store)
    with pytest.raises(ValueError, match="experience-end memory"):
        ERPlugin(mem_size=10, policy="reservoir").load_state_dict(state)
