"""cl_plugins.core.replay_loader: one plugin owns the training dataloader; two claimants are an
error naming both."""

from __future__ import annotations

import pytest
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import ReplayPlugin

from cl_plugins.core.replay_loader import claim_dataloader, dataloader_owners

from helpers import er_der_strategy


class _LoaderOwner(SupervisedPlugin):
    METHOD_NAME = "owner_a"
    SETS_DATALOADER = True

    def before_training_exp(self, strategy, **kwargs):
        claim_dataloader(strategy, self)


class _OtherOwner(_LoaderOwner):
    METHOD_NAME = "owner_b"


def test_two_dataloader_claimants_raise_naming_both():
    a, b = _LoaderOwner(), _OtherOwner()
    st, info = er_der_strategy([a, b])
    with pytest.raises(ValueError, match=r"_LoaderOwner \('owner_a'\) and _OtherOwner "
                                         r"\('owner_b'\)"):
        st.train(info.benchmark.train_stream[0])
    # Avalanche's own ReplayPlugin is recognised as a claimant
    replay = ReplayPlugin(mem_size=10)
    st, _ = er_der_strategy([_LoaderOwner(), replay])
    assert dataloader_owners(st)[-1] is replay
    with pytest.raises(ValueError, match="_LoaderOwner.*and ReplayPlugin"):
        claim_dataloader(st, st.plugins[0])
    st, _ = er_der_strategy([_LoaderOwner()])
    claim_dataloader(st, st.plugins[0])  # a single claimant is fine
