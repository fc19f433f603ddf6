"""RWalk (Chaudhry et al. 2018): the Fisher and the path scores by hand, the second task, the
penalty gradient, state round trips (also in the middle of a task), arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_plugins.registry import signature_defaults
from cl_plugins.regularization.rwalk import RWalkPlugin

from helpers import (Driver, Vec, check_penalty_gradient_matches_finite_differences,
                     check_registry_header, check_state_round_trip_in_the_middle_of_a_task,
                     check_state_round_trip_resumes_identically, quad_loss)


# ---------------------------------------------------------------------------------- RWalk

def _rwalk_hand(theta0, a, b, lr, steps, delta_t, alpha, eps, fisher0=None):
    """RWalk's Fisher and scores for plain SGD on 0.5 sum a (theta - b)^2, step by step."""
    theta, fisher = theta0.copy(), np.zeros_like(theta0) if fisher0 is None else fisher0.copy()
    score, dl, sq, ckpt, k = np.zeros_like(theta0), 0.0, 0.0, theta0.copy(), 0
    for t in range(steps):
        g = a * (theta - b)
        new = theta - lr * g
        dl, sq, k = dl - g * (new - theta), sq + g * g, k + 1
        theta = new
        if k == delta_t or t == steps - 1:
            fisher = alpha * sq / k + (1 - alpha) * fisher
            score += np.maximum(dl / (0.5 * fisher * (theta - ckpt) ** 2 + eps), 0)
            dl, sq, ckpt, k = 0.0, 0.0, theta.copy(), 0
    return theta, fisher, score


@pytest.mark.parametrize("delta_t, steps", [(1, 2), (2, 2), (2, 5)])
def test_rwalk_fisher_and_scores_by_hand(delta_t, steps):
    a, b, theta0 = np.array([1.0, 4.0, 0.2]), np.array([0.0, 0.5, 1.0]), np.array([1.0, 1.0, -2.0])
    lr, alpha, eps = 0.1, 0.9, 1e-3
    model = Vec(theta0)
    rw = RWalkPlugin(ewc_lambda=1.0, alpha=alpha, delta_t=delta_t, eps=eps)
    drv = Driver(model, [rw], torch.optim.SGD(model.parameters(), lr=lr))
    drv.task(quad_loss(a, b), steps)
    theta, fisher, score = _rwalk_hand(theta0, a, b, lr, steps, delta_t, alpha, eps)
    if (delta_t, steps) == (1, 2):  # the 2-step example written out
        g0 = a * (theta0 - b)
        t1 = theta0 - lr * g0
        g1 = a * (t1 - b)
        f1, f2 = alpha * g0**2, alpha * g1**2 + (1 - alpha) * alpha * g0**2
        s = (lr * g0**2) / (0.5 * f1 * (lr * g0) ** 2 + eps) + \
            (lr * g1**2) / (0.5 * f2 * (lr * g1) ** 2 + eps)
        np.testing.assert_allclose(fisher, f2, rtol=1e-12)
        np.testing.assert_allclose(score, s, rtol=1e-12)
    np.testing.assert_allclose(rw.fisher["theta"].numpy(), fisher, rtol=1e-12)
    np.testing.assert_allclose(rw.scores["theta"].numpy(), score, rtol=1e-12)
    importance, anchor = rw.quadratic_penalty.terms[0]
    np.testing.assert_allclose(importance["theta"].numpy(),
                               fisher / fisher.max() + score / score.max(), rtol=1e-12)
    np.testing.assert_allclose(anchor["theta"].numpy(), theta, rtol=1e-12)


def test_rwalk_second_task_averages_scores_and_uses_task_gradient():
    a, b, theta0 = np.array([1.0, 2.0]), np.array([0.0, 1.0]), np.array([1.0, -1.0])
    model = Vec(theta0)
    rw = RWalkPlugin(ewc_lambda=5.0, delta_t=2, normalize="minmax")
    drv = Driver(model, [rw], torch.optim.SGD(model.parameters(), lr=0.1))
    drv.task(quad_loss(a, b), 4)
    first_scores, fisher = rw.scores["theta"].clone(), rw.fisher["theta"].clone()
    a2, b2 = torch.tensor([0.5, 3.0], dtype=torch.float64), torch.tensor([2.0, 2.0],
                                                                       dtype=torch.float64)
    task2 = quad_loss(a2, b2)
    drv.call("before_training_exp")
    sq = []
    for step in range(4):
        theta = model.theta.detach().clone()
        g_task = a2 * (theta - b2)  # the penalty's gradient is not part of it
        if step:  # away from the anchor, the penalty's gradient is not negligible
            pen = rw.quadratic_penalty.gradient({"theta": model.theta})["theta"]
            assert pen.abs().min() > 1e-4
        sq.append(g_task**2)
        drv.step(task2)
        if step == 0:
            assert torch.allclose(rw.interval_sq_grad["theta"], sq[0], atol=1e-12)
        if step == 1:  # the interval closes: EWC++ update of the Fisher carried over from task 1
            assert torch.allclose(rw.fisher["theta"], 0.9 * (sq[0] + sq[1]) / 2 + 0.1 * fisher,
                                  atol=1e-12)
    new_scores = rw.task_scores["theta"].clone()
    assert rw.interval_steps == 0
    drv.call("after_training_exp")
    assert torch.allclose(rw.scores["theta"], (first_scores + new_scores) / 2, atol=1e-12)
    s, f = rw.scores["theta"], rw.fisher["theta"]
    mm = (lambda v: (v - v.min()) / (v.max() - v.min() + 1e-32))
    assert torch.allclose(rw.quadratic_penalty.terms[0][0]["theta"], mm(f) + mm(s), atol=1e-12)
    assert len(rw.quadratic_penalty) == 1  # replaced, not accumulated
    assert torch.equal(rw.quadratic_penalty.terms[0][1]["theta"], model.theta.detach())


# ------------------------------------------------------------------- penalties, state, args

def test_penalty_gradient_matches_finite_differences():
    check_penalty_gradient_matches_finite_differences(RWalkPlugin)


def test_state_round_trip_resumes_identically():
    check_state_round_trip_resumes_identically(RWalkPlugin)


def test_state_round_trip_in_the_middle_of_a_task():
    check_state_round_trip_in_the_middle_of_a_task(RWalkPlugin)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"ewc_lambda": -0.1}, r"ewc_lambda must be in \[0, inf\)"),
    ({"alpha": 0.0}, r"alpha must be in \(0, 1\]"),
    ({"alpha": 1.5}, r"alpha must be in \(0, 1\]"),
    ({"delta_t": 2.5}, r"delta_t must be an integer"),
    ({"eps": -1.0}, r"eps must be in \(0, inf\)"),
    ({"normalize": "sum"}, r"normalize must be one of 'max', 'minmax'"),
])
def test_bad_arguments_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RWalkPlugin(**kwargs)


def test_registry_header():
    check_registry_header(RWalkPlugin)
    # the protocol defaults the docstring names (B1)
    assert signature_defaults(RWalkPlugin) == {"ewc_lambda": 0.1, "alpha": 0.9, "delta_t": 10,
                                               "eps": 1e-3, "normalize": "max"}
