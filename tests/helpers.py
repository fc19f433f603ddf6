"""Helpers shared by several test files (one place, no copies). Fixtures live in conftest.py;
this module holds plain functions and classes, imported as ``from helpers import ...`` (pytest
puts tests/, the folder of the top-level conftest.py, on sys.path)."""

from __future__ import annotations

import copy
import itertools
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.params import shared_parameters
from cl_plugins.models import build_model
from cl_plugins.registry import signature_defaults
from cl_plugins.regularization.ewc import EWCPlugin
from cl_plugins.regularization.lwf import LwFPlugin
from cl_plugins.regularization.online_ewc import OnlineEWCPlugin
from cl_plugins.regularization.rwalk import RWalkPlugin
from cl_plugins.regularization.scp import SCPPlugin
from cl_plugins.replay.agem import AGEMPlugin
from cl_plugins.replay.er import ERPlugin
from cl_plugins.replay.gem import GEMPlugin

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ models, strategies

def use_conv_model_if_needed(cfg, plugin_cls):
    """A plugin class with ``NEEDS_SPATIAL = True`` (distillation on spatial feature maps: NST,
    attention) gets a LeNet on split_digits padded to 32x32 in ``cfg`` instead of the MLP the
    generic tests build; the others keep ``cfg`` as it is. A class with ``NEEDS_HEAD`` (PODNet:
    "lsc") also gets that ``model.head``. Returns ``cfg``."""
    if getattr(plugin_cls, "NEEDS_SPATIAL", False):
        cfg["model"] = {"name": "lenet"}
        cfg["benchmark"]["pad_to_32"] = True
    if getattr(plugin_cls, "NEEDS_HEAD", None):
        cfg["model"]["head"] = plugin_cls.NEEDS_HEAD
    return cfg


def param_copies(model):
    """{name: detached copy} of every parameter."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def naive_sgd(model, plugin):
    """A Naive strategy (SGD lr 0.1, minibatch 32, one epoch) around one plugin."""
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=1,
                 device="cpu", plugins=[plugin], evaluator=EvaluationPlugin())


# ------------------------------------------------------- tiny CIFAR / TinyImageNet files on disk

def continue_both(strategy, model, plugin, restored, exp):
    """Train ``strategy`` (with ``plugin``) and a copy of ``model`` with ``restored`` (a fresh
    plugin loaded from ``plugin``'s state) on ``exp`` with the same shuffle; assert the two
    models end equal, and return both plugins' states afterwards."""
    model2 = copy.deepcopy(model)
    strategy2 = naive_sgd(model2, restored)
    for s in (strategy, strategy2):
        torch.manual_seed(1)  # the training data loader's shuffle
        s.train(exp)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    return plugin.state_dict(), restored.state_dict()


def train_both_equal(st_a, st_b, exp, seen=(), model_state=None):
    """Resume ``st_b`` as ``st_a``: adapt its model to the experiences ``seen`` (heads, masks),
    load ``model_state``, then train both on ``exp`` with the same shuffle and assert their
    parameters end equal."""
    for e in seen:
        st_b.model.adaptation(e)
    if model_state is not None:
        st_b.model.load_state_dict(model_state)
    for st in (st_a, st_b):
        torch.manual_seed(99)  # same dataloader shuffling
        st.train(exp)
    for pa, pb in zip(st_a.model.parameters(), st_b.model.parameters()):
        assert torch.equal(pa, pb)


def snapshot(root: Path):
    """Every path under root with its size and mtime, to check that a reader wrote nothing."""
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def dump_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def rgb_pattern() -> np.ndarray:
    """One CIFAR row: red plane all 10, green all 20, blue all 30."""
    return np.concatenate([np.full(1024, v, dtype=np.uint8) for v in (10, 20, 30)])


def index_pattern() -> np.ndarray:
    """One CIFAR row whose value at (c, h, w) is (c*1024 + h*32 + w) % 256."""
    return (np.arange(3072) % 256).astype(np.uint8)


# deliberately not in alphabetical order: class id must follow wnids.txt line order
WNIDS = ["n03000001", "n01000002", "n02000003"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # one per class
VAL = [("val_0.JPEG", 2), ("val_1.JPEG", 0), ("val_2.JPEG", 1)]


def save_jpeg(path: Path, colour, mode: str = "RGB", size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format="JPEG", quality=95)


# ------------------------------------------- LwF and SCP: split_digits models, by hand

def digits_model(info, hidden=(7,), seed=0):
    torch.manual_seed(seed)
    return build_model({"name": "mlp", "hidden": list(hidden)}, info).double()


def first_inputs(info, exp, n=16):
    ds = info.benchmark.train_stream[exp].dataset
    return torch.stack([ds[i][0] for i in range(n)]).double()


def adapt_double(model, exp):
    avalanche_model_adaptation(model, exp)
    model.double()  # new heads are created in float32


def finish_experience(plugin, model, exp):
    """Run the plugin's end-of-experience hook as the strategy would."""
    plugin.after_training_exp(SimpleNamespace(model=model, experience=exp, device="cpu",
                                              eval_mb_size=64))


def naive_with(model, plugin, epochs=1):
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=epochs,
                 eval_mb_size=128, device="cpu", plugins=[plugin], evaluator=None,
                 eval_every=-1)


def check_state_round_trip_and_identical_continuation(bench, method):
    """LwF's teacher or SCP's penalty survive a state round trip; training goes on identically."""
    info = bench["task"]
    exps = info.benchmark.train_stream
    make = {"lwf": lambda seed: LwFPlugin(alpha=2.0),
            "scp": lambda seed: SCPPlugin(scp_lambda=50.0, n_slices=3, seed=seed)}[method]
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [16]}, info)
    plugin = make(1)
    strat = naive_with(model, plugin)
    for e in range(2):
        strat.train(exps[e])
    state = plugin.state_dict()
    tensors = [v for v in (state.get("teacher") or {}).values()] + \
        [t for term in state.get("penalty", {}).get("terms", []) for d in term for t in d.values()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)

    fresh = make(99)  # another seed: the restored generator state must take over
    fresh.load_state_dict(copy.deepcopy(state))
    x = torch.stack([exps[2].dataset[i][0] for i in range(16)])
    avalanche_model_adaptation(model, exps[2])  # the next task's head exists already
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_b = copy.deepcopy(model)
    if method == "lwf":
        v_a, v_b = plugin.distillation_term(model, x), fresh.distillation_term(model_b, x)
        assert v_a.item() > 0
        restored = fresh.teacher.state_dict()
        for n, a in plugin.teacher.state_dict().items():
            assert torch.equal(a, restored[n]), n
    else:
        v_a, v_b = plugin.penalty(model), fresh.penalty(model_b)
        assert v_a.item() > 0
    assert v_a.item() == v_b.item()

    # identical continuation on the next experience (SGD without momentum: no optimizer state)
    strat_b = naive_with(model_b, fresh)
    torch.manual_seed(5)
    strat.train(exps[2])
    torch.manual_seed(5)
    strat_b.train(exps[2])
    pa, pb = param_copies(model), param_copies(model_b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    sa, sb = plugin.state_dict(), fresh.state_dict()
    assert sa["n_experiences"] == sb["n_experiences"] == 3
    if method == "scp":
        assert torch.equal(sa["generator"], sb["generator"])
        for (ia, aa), (ib, ab) in zip(sa["penalty"]["terms"], sb["penalty"]["terms"]):
            assert all(torch.equal(ia[n], ib[n]) and torch.equal(aa[n], ab[n]) for n in ia)


# ------------------------------------- SI, MAS and RWalk: a tiny driver of the training hooks

class Vec(nn.Module):
    """One parameter vector theta; the 'task loss' is a function of theta alone."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone())


def quad_loss(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return lambda model: 0.5 * (a * (model.theta - b).pow(2)).sum()


class Driver:
    """Calls the plugins' hooks in the order of Avalanche's training loop (SGDUpdate)."""

    def __init__(self, model, plugins, optimizer, experience=None):
        self.model, self.plugins, self.optimizer = model, list(plugins), optimizer
        self.device = torch.device("cpu")
        self.experience = experience
        self.loss = None

    def call(self, hook):
        for p in self.plugins:
            fn = getattr(p, hook, None)
            if fn is not None:
                fn(self)

    def step(self, task_loss):
        self.optimizer.zero_grad()
        self.loss = task_loss(self.model)
        self.call("before_backward")
        self.loss.backward()
        self.call("after_backward")
        self.call("before_update")
        self.optimizer.step()
        self.call("after_update")

    def task(self, task_loss, steps):
        self.call("before_training_exp")
        for _ in range(steps):
            self.step(task_loss)
        self.call("after_training_exp")


def toy_experience(n=12, d=5, classes=(0, 1), task=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    ds = TensorDataset(x, y, torch.full((n,), task))
    return SimpleNamespace(dataset=ds, classes_in_this_experience=list(classes),
                           task_labels=[task])


def trained_plugin(cls, **kwargs):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    exp = toy_experience(n=10, d=5, classes=(0, 1, 2))
    plugin = cls(**kwargs)
    drv = Driver(model, [plugin], torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5), exp)
    x, y = exp.dataset.tensors[0], exp.dataset.tensors[1]
    task = (lambda m: nn.functional.cross_entropy(m(x), y))
    drv.task(task, 7)
    return model, plugin, drv, task


def check_penalty_gradient_matches_finite_differences(cls):
    model, plugin, drv, _ = trained_plugin(cls)
    with torch.no_grad():  # move away from the anchor
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = shared_parameters(model)
    drv.loss = torch.zeros((), dtype=torch.float64)
    plugin.before_backward(drv)
    grads = torch.autograd.grad(drv.loss, list(params.values()))
    closed = plugin.quadratic_penalty.gradient(params)
    h = 1e-6
    for (n, p), g in zip(params.items(), grads):
        assert torch.allclose(g, closed[n], atol=1e-10)
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                old = p[idx].item()
                p[idx] = old + h
                up = plugin.quadratic_penalty.loss(params).item()
                p[idx] = old - h
                down = plugin.quadratic_penalty.loss(params).item()
                p[idx] = old
            assert (up - down) / (2 * h) == pytest.approx(g[idx].item(), rel=1e-5, abs=1e-9)
    assert drv.loss.item() > 0


def check_state_round_trip_resumes_identically(cls):
    kwargs = {"delta_t": 3} if cls is RWalkPlugin else {}
    model, plugin, drv, task = trained_plugin(cls, **kwargs)
    fresh = cls(**kwargs)
    fresh.load_state_dict(copy.deepcopy(plugin.state_dict()))
    torch.manual_seed(2)  # evaluate both penalties away from the anchor
    moved = {n: p.detach() + 0.1 * torch.randn_like(p)
             for n, p in shared_parameters(model).items()}
    value = plugin.quadratic_penalty.loss(moved).item()
    assert value > 0 and value == fresh.quadratic_penalty.loss(moved).item()
    twin = copy.deepcopy(model)
    runs = []
    for m, p in ((model, plugin), (twin, fresh)):
        d = Driver(m, [p], torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5), drv.experience)
        d.task(task, 5)
        runs.append((m, p))
    (m1, p1), (m2, p2) = runs
    for a_, b_ in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a_, b_)
    s1, s2 = p1.state_dict(), p2.state_dict()
    for (i1, a1), (i2, a2) in zip(s1["penalty"]["terms"], s2["penalty"]["terms"]):
        for n in i1:
            assert torch.equal(i1[n], i2[n]) and torch.equal(a1[n], a2[n])


def check_state_round_trip_in_the_middle_of_a_task(cls):
    kwargs = {"delta_t": 2} if cls is RWalkPlugin else {}
    model, plugin, drv, task = trained_plugin(cls, **kwargs)
    drv.call("before_training_exp")
    for _ in range(3):  # RWalk: one closed interval and one open
        drv.step(task)
    twin, fresh = copy.deepcopy(model), cls(**kwargs)
    fresh.load_state_dict(copy.deepcopy(plugin.state_dict()))
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.2, momentum=0.5)
    opt2.load_state_dict(copy.deepcopy(drv.optimizer.state_dict()))
    d2 = Driver(twin, [fresh], opt2, drv.experience)
    d2.call("before_training_exp")
    for d in (drv, d2):
        for _ in range(3):
            d.step(task)
        d.call("after_training_exp")
    i1, i2 = plugin.quadratic_penalty.terms[0][0], fresh.quadratic_penalty.terms[0][0]
    for n in i1:
        assert torch.equal(i1[n], i2[n])


def check_registry_header(cls):
    """A regulariser's registry header: every scenario, no task labels, valid defaults, a sweep
    over real parameters, a paper and a summary."""
    defaults = signature_defaults(cls)
    cls(**defaults)
    assert cls.SCENARIOS == ("task", "domain", "class") and not cls.NEEDS_TASK_LABELS
    assert set(cls.SWEEP) <= set(defaults) and cls.PAPER and cls.SUMMARY


# ------------------------------------------------------- ER and DER: a strategy on split_digits

def er_der_strategy(plugins, scenario="class", lr=1e-3, sgd=False, seed=0):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": [32]}, info)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05) if sgd
           else torch.optim.Adam(model.parameters(), lr=lr))
    st = Naive(model=model, optimizer=opt, train_mb_size=32, train_epochs=1, eval_mb_size=256,
               device="cpu", plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    return st, info


def check_stream_replay_refuses_a_dataloader_owner(cls):
    st, info = er_der_strategy([cls(mem_size=20, seed=0), ReplayPlugin(mem_size=20)])
    with pytest.raises(ValueError, match=f"{cls.__name__}.*ReplayPlugin"):
        st.train(info.benchmark.train_stream[0])


def check_replay_state_round_trip(make):
    a = make()
    st_a, info = er_der_strategy([a], sgd=True)
    stream = list(info.benchmark.train_stream)
    for e in stream[:2]:
        st_a.train(e)
    state = copy.deepcopy(a.state_dict())
    model_state = copy.deepcopy(st_a.model.state_dict())
    b = make()
    if getattr(b, "memory", None) is not None:  # ER's experience-end memory
        b.memory.generator.manual_seed(12345)  # must be overwritten by the state
        assert b.store is None and a.n_experiences == 2
    else:
        b.buffer.generator.manual_seed(12345)  # must be overwritten by the state
    b.load_state_dict(state)
    st_b, _ = er_der_strategy([b], sgd=True, seed=7)
    # the model must have the same heads/masks before loading its weights: adapt it first
    train_both_equal(st_a, st_b, stream[2], stream[:2], model_state)
    sa, sb = (p.store if isinstance(p, ERPlugin) else p.buffer for p in (a, b))
    assert torch.equal(sa.x, sb.x) and sa.n_seen == sb.n_seen
    if isinstance(a, ERPlugin):
        assert a.n_experiences == b.n_experiences == 3



def check_plugins_resume_exactly(make):
    """``make()`` -> a list of plugins (e.g. ER plus a distillation term, the last one owning a
    ``generator``). Train two experiences, load the states into a fresh list (whose generator
    was reseeded, so the state must restore it), and check the third experience trains
    identically. Returns (first list, second list, the states)."""
    a = make()
    st_a, info = er_der_strategy(a, sgd=True)
    stream = list(info.benchmark.train_stream)
    for exp in stream[:2]:
        st_a.train(exp)
    states = [copy.deepcopy(p.state_dict()) for p in a]
    model_state = copy.deepcopy(st_a.model.state_dict())
    b = make()
    b[-1].generator.manual_seed(999)  # must be overwritten by the state
    for p, s in zip(b, states):
        p.load_state_dict(s)
    st_b, _ = er_der_strategy(b, sgd=True, seed=7)
    train_both_equal(st_a, st_b, stream[2], stream[:2], model_state)
    return a, b, states

# ---------------------------------------------------- GDumb and MIR: a strategy on split_digits

def gdumb_mir_strategy(plugins, scenario="class", lr=0.05, mb=16, epochs=1, seed=0,
                       momentum=0.9):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": [32]}, info)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    st = Naive(model=model, optimizer=opt, train_mb_size=mb, train_epochs=epochs,
               eval_mb_size=256, device="cpu", plugins=plugins,
               evaluator=EvaluationPlugin(loggers=[]))
    return st, info


# ------------------------------------------------ GEM and A-GEM: brute force and by-hand steps

def primal_by_active_sets(g: np.ndarray, G: np.ndarray) -> np.ndarray:
    """argmin_z ||z - g||^2 s.t. G z >= 0, by enumerating active sets S: z = g + G_S^T mu with
    G_S z = 0, kept when mu >= 0 and G z >= 0 (the KKT point of a strictly convex problem is
    unique); the closest feasible KKT candidate wins."""
    best, best_d = None, np.inf
    K = G.shape[0]
    for r in range(K + 1):
        for S in itertools.combinations(range(K), r):
            S = list(S)
            if S:
                GS = G[S]
                mu = np.linalg.solve(GS @ GS.T, -GS @ g)
                if (mu < -1e-12).any():
                    continue
                z = g + GS.T @ mu
            else:
                z = g.copy()
            if (G @ z < -1e-10).any():
                continue
            d = np.sum((z - g) ** 2)
            if d < best_d:
                best, best_d = z, d
    assert best is not None
    return best


def violating_case(rng, K, P):
    """Random g, G (float64) with at least one <g, g_k> < 0 (and one >= 0 when K > 1)."""
    while True:
        G = rng.standard_normal((K, P))
        g = rng.standard_normal(P)
        bad = G @ g < 0
        if bad.any() and (K == 1 or not bad.all()):
            return g, G


def gem_agem_strategy(plugins, scenario="task", seed=0, lr=0.05):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": [16]}, info)
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
               train_mb_size=32, train_epochs=1, eval_mb_size=256, device="cpu",
               plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    return st, info


class GradSpy(SupervisedPlugin):
    """Records every parameter's gradient (None kept) at before_update."""

    def __init__(self):
        super().__init__()
        self.records = []

    def before_update(self, strategy, **kwargs):
        self.records.append([None if p.grad is None else p.grad.detach().clone()
                             for p in strategy.model.parameters()])


class ByHand(SupervisedPlugin):
    """Placed after the plugin: recomputes its step from the gradient recorded before it."""

    def __init__(self, plugin, before, kind):
        super().__init__()
        self.plugin, self.spy, self.kind = plugin, before, kind
        self.checked, self.projected, self.head_writes = 0, 0, 0
        self.state = None

    def before_training_iteration(self, strategy, **kwargs):  # the sampler's state (A-GEM)
        if self.plugin.memory.buffer is not None:
            self.state = copy.deepcopy(self.plugin.memory.buffer.generator.get_state())

    def before_update(self, strategy, **kwargs):
        mem = self.plugin.memory
        if mem.n_experiences == 0:
            return
        model, params = strategy.model, list(strategy.model.parameters())
        g0 = self.spy.records[-1]
        if self.kind == "gem":
            batches = [(x, y, t) for x, y, t in mem.experiences("cpu")]
        else:
            gen = torch.Generator()
            gen.set_state(self.state)
            n, buf = self.plugin.sample_size, mem.buffer
            if self.plugin.batch_sampling == "per_task" and buf.t.unique().numel() > 1:
                k = -(-n // buf.t.unique().numel())
                idx = []
                for label in buf.t.unique().tolist():
                    slots = torch.nonzero(buf.t == label).flatten()
                    idx.append(slots[torch.randperm(slots.numel(), generator=gen)[:k]])
                idx = torch.cat(idx)
                assert idx.numel() == k * buf.t.unique().numel()
            else:
                idx = torch.randperm(len(buf), generator=gen)[:n]
            b = buf.get(idx)
            batches = [(b.x, b.y, b.t)]
        rows = []
        for x, y, t in batches:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x, t), y).backward()
            rows.append([None if p.grad is None else p.grad.clone() for p in params])
        keep = [i for i in range(len(params))
                if g0[i] is not None or any(r[i] is not None for r in rows)]

        def flat(gs):
            return torch.cat([(gs[i] if gs[i] is not None else torch.zeros_like(params[i]))
                              .reshape(-1) for i in keep]).double()

        g, G = flat(g0), torch.stack([flat(r) for r in rows])
        if self.kind == "gem":
            # each memory gradient touches the shared layers and its own head only
            heads = [i for i in range(len(params)) if i >= 2]
            for r in rows:
                assert sum(r[i] is not None for i in heads) == 2  # weight + bias of one head
            dots = G @ g
            if (dots < 0).any():
                P = G @ G.T + self.plugin.eps * torch.eye(len(rows), dtype=torch.float64)
                import quadprog
                v = quadprog.solve_qp(P.numpy(), -dots.numpy(), np.eye(len(rows)),
                                      np.full(len(rows), self.plugin.memory_strength))[0]
                expected = g + G.T @ torch.from_numpy(v)
                self.projected += 1
            else:
                expected = g
        else:
            d = g @ G[0]
            expected = g - d / (G[0] @ G[0] + self.plugin.eps) * G[0] if d < 0 else g
            self.projected += int(d < 0)
        # what the plugin left in .grad (restored: our backward passes overwrote it)
        model.zero_grad(set_to_none=True)
        for p, gp in zip(params, self.written):
            p.grad = gp
        found = flat(self.written)
        assert torch.allclose(found, expected, rtol=1e-4, atol=1e-6)
        self.head_writes += sum(1 for i in keep if g0[i] is None and self.written[i] is not None)
        self.checked += 1


class AfterSpy(SupervisedPlugin):
    """Between the plugin and ByHand: keeps the gradients the plugin wrote."""

    def __init__(self, by_hand):
        super().__init__()
        self.by_hand = by_hand

    def before_update(self, strategy, **kwargs):
        self.by_hand.written = [None if p.grad is None else p.grad.detach().clone()
                                for p in strategy.model.parameters()]


def check_step_equals_the_projection_by_hand(kind):
    if kind == "gem":
        plugin = GEMPlugin(patterns_per_experience=40, memory_strength=0.5, seed=0)
    elif kind == "agem":
        plugin = AGEMPlugin(patterns_per_experience=40, sample_size=50, seed=0)
    else:  # van de Ven et al.'s settings: per-class memory, per-task reference batch, eps
        plugin = AGEMPlugin(patterns_per_experience=None, patterns_per_class=20, sample_size=50,
                            batch_sampling="per_task", eps=0.5, seed=0)
        kind = "agem"
    before = GradSpy()
    by_hand = ByHand(plugin, before, kind)
    st, info = gem_agem_strategy([before, plugin, AfterSpy(by_hand), by_hand], scenario="task")
    for e in list(info.benchmark.train_stream)[:3]:
        st.train(e)
    assert by_hand.checked == 16 and by_hand.projected > 0  # 8 steps per experience, 2 exps
    assert plugin.n_steps == 16 and plugin.n_projected == by_hand.projected
    # projections wrote into the heads of past tasks, which the current loss did not touch
    assert by_hand.head_writes > 0


def check_episodic_state_round_trip(make):
    a = make()
    st_a, info = gem_agem_strategy([a], scenario="class")
    stream = list(info.benchmark.train_stream)
    for e in stream[:2]:
        st_a.train(e)
    state = copy.deepcopy(a.state_dict())
    model_state = copy.deepcopy(st_a.model.state_dict())
    b = make()
    b.memory.generator.manual_seed(999)  # must be overwritten by the state
    b.load_state_dict(state)
    st_b, _ = gem_agem_strategy([b], scenario="class", seed=7)
    train_both_equal(st_a, st_b, stream[2], stream[:2], model_state)
    assert a.n_projected == b.n_projected > state["n_projected"]
    assert torch.equal(a.memory.buffer.x, b.memory.buffer.x)
    assert a.memory.sizes == b.memory.sizes
    assert torch.equal(a.memory.buffer.generator.get_state(), b.memory.buffer.generator.get_state())


# ------------------------------------------------------- EWC and online EWC: shared checks

def add_random_terms(plugin, params, k, seed=0):
    """k random (importance, anchor) terms on ``params``, one importance entry zero."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(k):
        imp = {n: torch.rand(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        imp["w"][0, 0] = 0.0  # an unimportant element: must not break the collapsed form
        anc = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        plugin.quadratic_penalty.add(imp, anc)


def check_ewc_penalty_value_and_gradient(make):
    plugin = make()
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True),
              "b": torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)}
    add_random_terms(plugin, params, 3)
    by_hand = sum(1.5 * (imp[n] * (params[n] - anc[n]) ** 2).sum()
                  for imp, anc in plugin.quadratic_penalty.terms for n in params)
    value = plugin.penalty(params)
    torch.testing.assert_close(value, by_hand, rtol=1e-12, atol=0)
    (grad_w, grad_b) = torch.autograd.grad(value, [params["w"], params["b"]])
    analytic = plugin.quadratic_penalty.gradient(params)
    torch.testing.assert_close(grad_w, analytic["w"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_b, analytic["b"], rtol=1e-12, atol=1e-14)
    # central finite differences on every coordinate
    eps = 1e-6
    with torch.no_grad():
        for name, grad in (("w", grad_w), ("b", grad_b)):
            flat = params[name].view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                up = plugin.penalty(params).item()
                flat[i] = old - eps
                down = plugin.penalty(params).item()
                flat[i] = old
                assert (up - down) / (2 * eps) == pytest.approx(grad.view(-1)[i].item(),
                                                                rel=1e-6, abs=1e-8)


def check_ewc_state_round_trip(make):
    info = build_benchmark("split_digits", "domain")
    exps = list(info.benchmark.train_stream)
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [16]}, info)
    plugin = make()
    strategy = naive_sgd(model, plugin)
    for e in exps[:2]:
        strategy.train(e)
    state = plugin.state_dict()
    assert all(t.device.type == "cpu" for imp, anc in state["penalty"]["terms"]
               for t in list(imp.values()) + list(anc.values()))
    restored = make()
    restored.load_state_dict(copy.deepcopy(state))
    params = shared_parameters(model)
    assert plugin.penalty(params).item() == restored.penalty(params).item()
    a, b = continue_both(strategy, model, plugin, restored, exps[2])
    assert torch.equal(a["generator"], b["generator"])
    for (i1, a1), (i2, a2) in zip(a["penalty"]["terms"], b["penalty"]["terms"]):
        assert all(torch.equal(i1[n], i2[n]) and torch.equal(a1[n], a2[n]) for n in i1)
    other = {"gamma": plugin.gamma} if isinstance(plugin, OnlineEWCPlugin) else {}
    with pytest.raises(ValueError,
                       match="saved with ewc_lambda=50.0, this plugin has ewc_lambda=1.0"):
        type(plugin)(ewc_lambda=1.0, **other).load_state_dict(state)


def check_ewc_registry_header(cls):
    defaults = signature_defaults(cls)
    assert set(cls.SWEEP) <= set(defaults)
    protocol = {EWCPlugin: {"ewc_lambda": 1e5, "fisher": "exact"},  # S2
                OnlineEWCPlugin: {"ewc_lambda": 800.0, "fisher": "predicted", "gamma": 1.0}}  # S1
    assert {k: defaults[k] for k in protocol[cls]} == protocol[cls]
    plugin = cls(**defaults)
    assert plugin.quadratic_penalty.coef == defaults["ewc_lambda"] / 2
    assert set(cls.SCENARIOS) == {"task", "domain", "class"} and not cls.NEEDS_TASK_LABELS


# ------------------------------------------------- subspace_kd, erg_kd: accuracy per experience

def stream_accuracies(model, stream):
    """Accuracy of ``model`` (put in eval mode) on each experience of ``stream``, as floats."""
    from avalanche.models.utils import avalanche_forward

    model.eval()
    out = []
    with torch.no_grad():
        for exp in stream:
            loader = torch.utils.data.DataLoader(exp.dataset.eval(), batch_size=512)
            right = total = 0
            for x, y, t in ((b[0], b[1], b[2]) for b in loader):
                right += int((avalanche_forward(model, x, t).argmax(1) == y).sum())
                total += int(y.shape[0])
            out.append(right / total)
    return out


def digits_strategy(plugins, hidden=(32,), scenario="class", epochs=1, sgd=True, seed=0,
                    batch_norm=False):
    """A Naive strategy on split_digits with an MLP ClassifierNet (SGD 0.05 or Adam 1e-3,
    batch 32): (strategy, train experiences, benchmark info)."""
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": list(hidden), "batch_norm": batch_norm}, info)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05) if sgd
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    st = Naive(model=model, optimizer=opt, train_mb_size=32, train_epochs=epochs,
               eval_mb_size=256, device="cpu", plugins=plugins,
               evaluator=EvaluationPlugin(loggers=[]))
    return st, list(info.benchmark.train_stream), info


def final_mean_accuracy(plugins, **strategy_kwargs):
    """Train ``digits_strategy(plugins, **strategy_kwargs)`` on its whole stream; the mean test
    accuracy over the experiences at the end."""
    st, stream, info = digits_strategy(plugins, **strategy_kwargs)
    for e in stream:
        st.train(e)
    accs = stream_accuracies(st.model, info.benchmark.test_stream)
    return sum(accs) / len(accs)


class HeadInputSpy(SupervisedPlugin):
    """Listed after a plugin that appends rows inside the forward pass (latent replay,
    ExStream): records, for every step, (experience, stream rows n, the backbone's own output
    on the stream rows, the head's input, mb_y, mb_task_id, loss, mb_output) plus
    ``extra()``, which a subclass may fill (taken before the forward)."""

    def __init__(self, plugin):
        super().__init__()
        self.plugin, self.steps = plugin, []

    def extra(self):
        return ()

    def before_forward(self, strategy, **kwargs):
        self.before = self.extra()
        self.n = strategy.mb_x.shape[0]
        self.handle = strategy.model.head.register_forward_hook(
            lambda m, i, o: setattr(self, "head_in", i[0].detach()))

    def before_backward(self, strategy, **kwargs):
        self.handle.remove()
        with torch.no_grad():
            own = strategy.model.backbone(strategy.mb_x)
        self.steps.append((strategy.experience.current_experience, self.n, own, self.head_in,
                           strategy.mb_y.clone(), strategy.mb_task_id.clone(),
                           float(strategy.loss.detach()), strategy.mb_output.detach(),
                           *self.before))


# ------------------------------------------------ architectural methods: task-IL on split_digits

def eval_outputs(st, exp):
    """The model's outputs on a test experience, as the strategy's evaluation computes them."""
    seen = []
    handle = st.model.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    st.eval([exp])
    handle.remove()
    return torch.cat(seen)


def masking_strategy(plugins, batch_norm=True, sgd=None, epochs=2, seed=0):
    """Naive on split_digits task-IL, an MLP 16-16 (with batch norm by default), SGD with
    momentum 0.9 and weight decay 0.05 unless ``sgd`` says otherwise: what a mask must resist."""
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", "task")
    model = build_model({"name": "mlp", "hidden": [16, 16], "batch_norm": batch_norm}, info)
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=0.05) if sgd is None else sgd
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), **sgd),
               train_mb_size=32, train_epochs=epochs, eval_mb_size=512, device="cpu",
               plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    return st, info


def run_two_ranks(worker, store: str, *args, timeout: float = 300):
    """Run ``worker(rank, store, queue, *args)`` in two spawned processes (a torch.distributed
    file rendezvous at ``store``); {rank: what it put in the queue}, pickled bytes unpickled
    (plain bytes: no shared memory to outlive the process). A rank that put a string (its
    traceback) fails the test with both reports."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, store, queue, *args)) for r in range(2)]
    for p in procs:
        p.start()
    got = {r: pickle.loads(v) if isinstance(v, bytes) else v
           for r, v in (queue.get(timeout=timeout) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    assert not any(isinstance(v, str) for v in got.values()), got
    return got


def rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Reference for RKD's angle loss (``core.rkd_angle.rkd_angle_loss``, which has its own
    backward): the Huber loss between the cosines of every triplet angle of the student's and
    the teacher's features (``core.distill_losses._all_angles``), over all N^3 entries (those
    with i = j or k = j, 0 in both, included, as lenscloth/RKD's ``RKdAngle``), by autograd;
    0 for fewer than 3 samples."""
    import torch.nn.functional as F

    from cl_plugins.core.distill_losses import _all_angles

    if s.shape[0] != t.shape[0]:
        raise ValueError("rkd_angle: the student and the teacher need one row per sample")
    if s.shape[0] < 3:
        return s.sum() * 0
    return F.smooth_l1_loss(_all_angles(s.flatten(1)), _all_angles(t.detach().flatten(1)))
