"""Online EWC (Schwarz et al. 2018): the running penalty's value and gradient, state round trip,
arguments. (Its bookkeeping against EWC's modes and the forgetting against naive are in
test_ewc.py.)"""

from __future__ import annotations

import pytest

from cl_plugins.regularization.online_ewc import OnlineEWCPlugin

from helpers import (check_ewc_penalty_value_and_gradient, check_ewc_registry_header,
                     check_ewc_state_round_trip)


def test_penalty_value_and_gradient():
    check_ewc_penalty_value_and_gradient(lambda: OnlineEWCPlugin(ewc_lambda=3.0, gamma=0.7))


def test_state_round_trip_resumes_identically():
    check_ewc_state_round_trip(
        lambda: OnlineEWCPlugin(ewc_lambda=50.0, gamma=0.8, fisher="true", fisher_samples=100))


@pytest.mark.parametrize("kwargs,match", [
    ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    ({"gamma": -0.1}, r"gamma must be in \[0, 1\]"),
    ({"fisher": "sample"}, "fisher must be one of"),
    ({"ewc_lambda": -2}, "ewc_lambda"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineEWCPlugin(**kwargs)


def test_registry_header():
    check_ewc_registry_header(OnlineEWCPlugin)
