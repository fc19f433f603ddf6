"""MIR (Aljundi et al. 2019): the retrieval against a brute-force deepcopy loop, batch-norm
statistics untouched, the appended rows and the experience exclusion, state round trip,
arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_plugins.models import MLP, ClassifierNet
from cl_plugins.replay.mir import MIRPlugin, interference_scores

from helpers import gdumb_mir_strategy, param_copies


def _tiny(seed=0, bn=False):
    torch.manual_seed(seed)
    backbone = MLP(4, hidden=[6])
    if bn:
        backbone.layers.insert(1, nn.BatchNorm1d(6))
    return ClassifierNet(backbone, nn.Linear(6, 3)).double()


def _brute_force(model, x, y, cx, cy, groups):
    """Explicit deepcopy + SGD step, then one candidate at a time."""
    virtual = copy.deepcopy(model)
    names = dict(virtual.named_parameters())
    opt = torch.optim.SGD([{"params": [names[n] for n in ns], "lr": lr} for ns, lr in groups])
    opt.zero_grad()
    F.cross_entropy(virtual(x), y).backward()
    opt.step()
    model.eval()
    virtual.eval()
    scores = []
    with torch.no_grad():
        for i in range(cx.shape[0]):
            pre = F.cross_entropy(model(cx[i:i + 1]), cy[i:i + 1])
            post = F.cross_entropy(virtual(cx[i:i + 1]), cy[i:i + 1])
            scores.append(float(post - pre))
    model.train()
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("two_groups", [False, True])
def test_mir_retrieves_exactly_the_top_k_loss_increases(two_groups):
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    cx = torch.randn(12, 4, generator=g, dtype=torch.float64)
    cy = torch.randint(0, 3, (12,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    groups = ([(names[:2], 0.7), (names[2:], 0.2)] if two_groups else [(names, 0.5)])
    expected = _brute_force(model, x, y, cx, cy, groups)
    before = param_copies(model)
    lrs = {n: lr for ns, lr in groups for n in ns}
    t0, ct = torch.zeros(5, dtype=torch.long), torch.zeros(12, dtype=torch.long)
    scores = interference_scores(model, x, y, t0, cx, cy, ct, lrs)
    assert torch.allclose(scores, expected, atol=1e-12)
    for n, p in model.named_parameters():  # untouched, no gradient left behind
        assert torch.equal(p, before[n]) and p.grad is None
    assert model.training
    # the plugin's retrieval from a memory holding exactly these candidates
    mir = MIRPlugin(mem_size=12, subsample=12, mem_mb_size=4, seed=0,
                    exclude_current_experience=False)
    mir.buffer.add(cx, cy, ct)
    opt = torch.optim.SGD([{"params": [dict(model.named_parameters())[n] for n in ns], "lr": lr}
                           for ns, lr in groups])
    xm, ym, tm, slots = mir.retrieve(model, opt, x, y, t0, "cpu")
    top4 = set(torch.topk(expected, 4).indices.tolist())
    assert set(slots.tolist()) == top4 and len(top4) == 4
    assert torch.equal(xm, cx[slots]) and torch.equal(ym, cy[slots])
    # not just any 4: the bottom candidates are never chosen
    assert not top4 & set(torch.topk(-expected, 4).indices.tolist())


def test_mir_scores_leave_batchnorm_statistics_untouched():
    model = _tiny(bn=True)
    bn = model.backbone.layers[1]
    rm, rv, nb = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    cx, cy = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    lrs = {n: 0.3 for n, _ in model.named_parameters()}
    s = interference_scores(model, x, y, torch.zeros(6, dtype=torch.long), cx, cy,
                            torch.zeros(9, dtype=torch.long), lrs)
    assert torch.isfinite(s).all()
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)
    assert int(bn.num_batches_tracked) == nb and model.training and bn.training


class _MirSpy(SupervisedPlugin):
    """Placed after MIR: checks the appended rows against the memory slots MIR reports."""

    def __init__(self, mir):
        super().__init__()
        self.mir, self.sizes, self.retrieved_exps = mir, [], []

    def before_forward(self, strategy, **kwargs):
        n = self.mir._incoming[0].shape[0]
        x = strategy.mbatch[0]
        self.sizes.append((self.mir._experience, n, x.shape[0]))
        if self.mir.last_retrieved is not None:
            mem = self.mir.buffer.get(self.mir.last_retrieved)
            assert torch.equal(x[n:], mem.x) and torch.equal(strategy.mbatch[1][n:], mem.y)
            self.retrieved_exps.append(set(self.mir.slot_experience[
                self.mir.last_retrieved].tolist()))


@pytest.mark.parametrize("exclude", [True, False])
def test_mir_appends_k_rows_from_earlier_experiences(exclude):
    mir = MIRPlugin(mem_size=100, subsample=30, mem_mb_size=8, seed=0,
                    exclude_current_experience=exclude)
    spy = _MirSpy(mir)
    st, info = gdumb_mir_strategy([mir, spy], mb=10, lr=0.1, momentum=0.0)
    stream = list(info.benchmark.train_stream)
    for e in stream[:3]:
        st.train(e)
    first = [s for s in spy.sizes if s[0] == 0]
    later = [s for s in spy.sizes if s[0] > 0]
    if exclude:  # nothing to retrieve during the first experience (official: rehearse=task>0)
        assert all(total == n for _, n, total in first)
        assert all(exps <= set(range(k)) for (k, _, _), exps in
                   zip([s for s in spy.sizes if s[2] > s[1]], spy.retrieved_exps))
    else:
        assert first[0][2] == first[0][1] and all(t == n + 8 for _, n, t in first[5:])
    assert all(total == n + 8 for _, n, total in later)
    assert mir.buffer.n_seen == sum(len(e.dataset) for e in stream[:3])
    assert set(mir.slot_experience.tolist()) == {0, 1, 2}


def test_mir_state_round_trip_resumes_identically():
    a = MIRPlugin(mem_size=60, subsample=20, mem_mb_size=5, seed=1)
    st_a, info = gdumb_mir_strategy([a], mb=10, lr=0.1, momentum=0.0)
    stream = list(info.benchmark.train_stream)
    for e in stream[:2]:
        st_a.train(e)
    state = copy.deepcopy(a.state_dict())
    b = MIRPlugin(mem_size=60, subsample=20, mem_mb_size=5, seed=9)
    b.load_state_dict(state)
    st_b, _ = gdumb_mir_strategy([b], mb=10, lr=0.1, momentum=0.0, seed=4)
    for e in stream[:2]:
        st_b.model.adaptation(e)
    st_b.model.load_state_dict(st_a.model.state_dict())
    for st in (st_a, st_b):
        torch.manual_seed(99)  # the strategy's own dataloader shuffling
        st.train(stream[2])
    for pa, pb in zip(st_a.model.parameters(), st_b.model.parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(a.buffer.x, b.buffer.x)
    assert torch.equal(a.slot_experience, b.slot_experience)


# ============================================================================ arguments

def test_bad_arguments():
    for kw, name in [({"mem_size": 0}, "mem_size"), ({"subsample": 0}, "subsample"),
                     ({"mem_mb_size": 0}, "mem_mb_size"),
                     ({"subsample": 5, "mem_mb_size": 6}, "mem_mb_size"),
                     ({"exclude_current_experience": "no"}, "exclude_current_experience"),
                     ({"policy": "fifo"}, "policy"), ({"seed": -2}, "seed")]:
        with pytest.raises(ValueError, match=name):
            MIRPlugin(**kw)
