"""DER/DER++ (Buzzega et al. 2020): the loss terms by hand and the stored logits, the variants in
task- and domain-IL, state round trip, arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cl_plugins.core.buffer import ReplayBuffer
from cl_plugins.replay.der import DERPlugin

from helpers import (check_replay_state_round_trip, check_stream_replay_refuses_a_dataloader_owner,
                     er_der_strategy)


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
    st, info = er_der_strategy([spy, der, check])
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
        st, info = er_der_strategy([der], scenario=scenario)
        for e in list(info.benchmark.train_stream)[:2]:
            st.train(e)
        assert der.buffer.stores_logits and len(der.buffer) == 40
        assert der.buffer.logits.shape[1] == 2  # the two outputs of the (per-task) head
        if scenario == "task":
            assert set(der.buffer.t.tolist()) == {0, 1}


def test_stream_replay_refuses_a_dataloader_owner():
    check_stream_replay_refuses_a_dataloader_owner(DERPlugin)


# ---------------------------------------------------------------------------- state

def test_state_round_trip_resumes_identically():
    check_replay_state_round_trip(lambda: DERPlugin(mem_size=40, seed=1))


# ---------------------------------------------------------------------------- arguments

def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        DERPlugin(alpha=-0.1)
    with pytest.raises(ValueError, match="beta"):
        DERPlugin(beta=-1)
    with pytest.raises(ValueError, match="seed"):
        DERPlugin(seed=-3)
