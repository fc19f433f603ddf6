"""A-GEM (Chaudhry et al. 2019): the closed-form projection against the primal problem, the
plugin's step recomputed by hand inside a strategy, the per-class memory, state round trip,
arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_plugins.replay.agem import AGEMPlugin, agem_project
from cl_plugins.replay.gem import gem_project

from helpers import (check_episodic_state_round_trip, check_step_equals_the_projection_by_hand,
                     gem_agem_strategy, primal_by_active_sets)


# ---------------------------------------------------------------------------- projection

def test_agem_projection_closed_form_is_the_primal_projection():
    rng = np.random.default_rng(5)
    for _ in range(20):
        g_ref = rng.standard_normal(9)
        g = rng.standard_normal(9)
        if g @ g_ref >= 0:
            g = g - 2 * (g @ g_ref) / (g_ref @ g_ref) * g_ref  # reflect: now violated
        new, projected = agem_project(torch.from_numpy(g), torch.from_numpy(g_ref))
        expected = primal_by_active_sets(g, g_ref[None])
        assert projected and np.abs(new.numpy() - expected).max() < 1e-6
        assert new.numpy() @ g_ref >= -1e-8
        # A-GEM is GEM with the single averaged constraint (gamma = 0, eps = 0)
        gem, _ = gem_project(torch.from_numpy(g), torch.from_numpy(g_ref[None]), 0.0, 0.0)
        assert np.abs(new.numpy() - gem.numpy()).max() < 1e-8


# ---------------------------------------------------------------------------- plugins in a strategy

@pytest.mark.parametrize("kind", ["agem", "agem_vandeven"])
def test_plugin_step_equals_the_projection_by_hand(kind):
    check_step_equals_the_projection_by_hand(kind)


def test_agem_patterns_per_class_memory_grows_by_class():
    agem = AGEMPlugin(patterns_per_experience=None, patterns_per_class=7, sample_size=10, seed=0)
    st, info = gem_agem_strategy([agem], scenario="domain")
    stream = list(info.benchmark.train_stream)
    for k, e in enumerate(stream[:3]):
        st.train(e)
        assert agem.memory.sizes == [14] * (k + 1) and len(agem.memory.buffer) == 14 * (k + 1)
    off = agem.memory.offsets()
    for k, e in enumerate(stream[:3]):
        rows = slice(off[k], off[k + 1])
        # domain-IL: labels 0/1 in every experience, 7 of each per experience, from its data
        assert agem.memory.buffer.y[rows].tolist() == [0] * 7 + [1] * 7
        ds = e.dataset
        xs = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
        hit = (xs[None] == agem.memory.buffer.x[rows].flatten(1)[:, None]).all(-1)
        assert hit.any(1).all() and hit.float().argmax(1).unique().numel() == 14


@pytest.mark.parametrize("make", [
    lambda: AGEMPlugin(patterns_per_experience=30, sample_size=20, seed=1),
    lambda: AGEMPlugin(patterns_per_experience=None, patterns_per_class=10, sample_size=20,
                       batch_sampling="per_task", eps=1e-7, seed=1),
])
def test_state_round_trip_resumes_identically(make):
    check_episodic_state_round_trip(make)


# ---------------------------------------------------------------------------- arguments

def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of patterns_per_experience"):
        AGEMPlugin(patterns_per_experience=None, mem_size=None)
    with pytest.raises(ValueError, match="sample_size"):
        AGEMPlugin(sample_size=0)
    with pytest.raises(ValueError, match="patterns_per_experience"):
        AGEMPlugin(patterns_per_experience=2.5)
    with pytest.raises(ValueError, match="seed"):
        AGEMPlugin(seed="a")
    with pytest.raises(ValueError, match="patterns_per_class"):
        AGEMPlugin(patterns_per_experience=None, patterns_per_class=0)
    with pytest.raises(ValueError, match="exactly one of patterns_per_experience.*"
                                         "patterns_per_class=100"):
        AGEMPlugin(patterns_per_class=100)  # the default patterns_per_experience=250 is set
    with pytest.raises(ValueError, match="batch_sampling"):
        AGEMPlugin(batch_sampling="task_balanced")
    with pytest.raises(ValueError, match="eps"):
        AGEMPlugin(eps=-1e-7)
    with pytest.raises(ValueError, match="saved with patterns_per_experience=None"):
        AGEMPlugin(seed=0).load_state_dict(  # a state of another budget
            AGEMPlugin(patterns_per_experience=None, patterns_per_class=5, seed=0).state_dict())
