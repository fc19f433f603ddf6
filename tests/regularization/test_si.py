"""SI (Zenke et al. 2017): the path integral against closed forms, task and full gradients,
accumulation, the penalty gradient, state round trips, arguments; and, for SI, MAS and RWalk
together, less forgetting than naive on split_digits and their composition."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cl_plugins.core.path_integral import loss_gradients as _loss_gradients
from cl_plugins.core.quadratic import QuadraticPenalty
from cl_plugins.registry import signature_defaults
from cl_plugins.regularization.mas import MASPlugin
from cl_plugins.regularization.rwalk import RWalkPlugin
from cl_plugins.regularization.si import SIPlugin

from helpers import (Driver, Vec, check_penalty_gradient_matches_finite_differences,
                     check_registry_header, check_state_round_trip_in_the_middle_of_a_task,
                     check_state_round_trip_resumes_identically, quad_loss, trained_plugin)


# ------------------------------------------------------------------------------------- SI

def test_si_path_integral_plain_sgd_matches_closed_form():
    a, b = np.array([1.0, 3.0, 0.5]), np.array([0.5, -1.0, 2.0])
    theta0, lr, steps, xi = np.array([2.0, 1.0, -1.0]), 0.1, 7, 0.1
    model = Vec(theta0)
    si = SIPlugin(si_lambda=2.0, xi=xi)
    drv = Driver(model, [si], torch.optim.SGD(model.parameters(), lr=lr))
    drv.task(quad_loss(a, b), steps)
    # theta_t - b = r^t (theta_0 - b), r = 1 - lr a; g_t = a (theta_t - b); step = -lr g_t
    r = 1 - lr * a
    omega = lr * a**2 * (theta0 - b) ** 2 * sum(r ** (2 * t) for t in range(steps))
    total = (r**steps - 1) * (theta0 - b)
    importance, anchor = si.quadratic_penalty.terms[0]
    np.testing.assert_allclose(importance["theta"].numpy(), omega / (total**2 + xi), rtol=1e-12)
    np.testing.assert_allclose(anchor["theta"].numpy(), b + r**steps * (theta0 - b), rtol=1e-12)
    assert si.omega is None  # reset for the next task


def test_si_with_momentum_uses_the_real_displacement():
    a, b, theta0, lr, mu, steps = np.array([2.0, 0.7]), np.array([0.0, 1.0]), \
        np.array([1.0, -2.0]), 0.05, 0.9, 6
    model = Vec(theta0)
    si = SIPlugin(xi=0.1)
    drv = Driver(model, [si], torch.optim.SGD(model.parameters(), lr=lr, momentum=mu))
    drv.call("before_training_exp")
    for _ in range(steps):
        drv.step(quad_loss(a, b))
    # heavy-ball by hand: v <- mu v + g; theta <- theta - lr v
    theta, v, omega, naive = theta0.copy(), np.zeros(2), np.zeros(2), np.zeros(2)
    for _ in range(steps):
        g = a * (theta - b)
        v = mu * v + g
        new = theta - lr * v
        omega += -g * (new - theta)
        naive += lr * g * g
        theta = new
    np.testing.assert_allclose(si.omega["theta"].numpy(), omega, rtol=1e-12)
    assert not np.allclose(omega, naive, rtol=1e-3)  # -lr g would be wrong under momentum


def _two_task_si(gradient, extra=()):
    model = Vec([1.0, -1.0, 0.5])
    si = SIPlugin(si_lambda=3.0, gradient=gradient)
    drv = Driver(model, [si, *extra], torch.optim.SGD(model.parameters(), lr=0.1))
    drv.task(quad_loss([1.0, 2.0, 0.5], [0.0, 1.0, -1.0]), 5)
    return model, si, drv


def test_si_task_and_full_gradients_differ_by_the_penalty_gradient():
    class OtherPenalty(QuadraticPenalty):  # another method's penalty, found by penalties_of
        pass

    other = SimpleNamespace(quadratic_penalty=OtherPenalty(coef=0.7))
    model, si, drv = _two_task_si("task", extra=[other])
    other.quadratic_penalty.add({"theta": torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)},
                                {"theta": torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)})
    task_loss = quad_loss([2.0, 0.5, 1.0], [1.0, 1.0, 1.0])
    drv.call("before_training_exp")
    drv.optimizer.zero_grad()
    drv.loss = task_loss(model)
    si.before_backward(drv)
    drv.loss = drv.loss + other.quadratic_penalty.loss({"theta": model.theta})
    drv.loss.backward()
    drv.call("after_backward")
    params = {"theta": model.theta}
    full = _loss_gradients(drv, params, "full", {"theta": torch.zeros_like(model.theta)})["theta"]
    (want_task,) = torch.autograd.grad(task_loss(model), model.theta)
    assert torch.allclose(si._steps.grads["theta"], want_task, atol=1e-12)
    pen = si.quadratic_penalty.loss(params) + other.quadratic_penalty.loss(params)
    (want_pen,) = torch.autograd.grad(pen, model.theta)
    assert want_pen.abs().min() > 1e-3  # the two gradients really differ
    assert torch.allclose(full - si._steps.grads["theta"], want_pen, atol=1e-12)
    # gradient="full" integrates exactly param.grad
    model_f, si_f, drv_f = _two_task_si("full")
    drv_f.call("before_training_exp")
    drv_f.optimizer.zero_grad()
    drv_f.loss = task_loss(model_f)
    si_f.before_backward(drv_f)
    drv_f.loss.backward()
    si_f.after_backward(drv_f)
    assert torch.allclose(si_f._steps.grads["theta"], model_f.theta.grad, atol=0)


def test_si_importance_accumulates_over_tasks():
    model, si, drv = _two_task_si("task")
    first = si.quadratic_penalty.terms[0][0]["theta"].clone()
    drv.call("before_training_exp")
    for _ in range(4):
        drv.step(quad_loss([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]))
    omega, start = si.omega["theta"].clone(), si.start["theta"].clone()
    drv.call("after_training_exp")
    second = omega / ((model.theta.detach() - start) ** 2 + si.xi)
    importance, anchor = si.quadratic_penalty.terms[0]
    assert len(si.quadratic_penalty) == 1
    assert torch.allclose(importance["theta"], first + second, atol=1e-12)
    assert torch.equal(anchor["theta"], model.theta.detach())


# ------------------------------------------------------------------- penalties, state, args

def test_penalty_gradient_matches_finite_differences():
    check_penalty_gradient_matches_finite_differences(SIPlugin)


def test_state_round_trip_resumes_identically():
    check_state_round_trip_resumes_identically(SIPlugin)


def test_state_round_trip_in_the_middle_of_a_task():
    check_state_round_trip_in_the_middle_of_a_task(SIPlugin)


def test_load_rejects_other_hyperparameters():
    _, plugin, _, _ = trained_plugin(SIPlugin)
    with pytest.raises(ValueError, match="coef"):
        SIPlugin(si_lambda=1.0).load_state_dict(plugin.state_dict())


@pytest.mark.parametrize("kwargs, pattern", [
    ({"si_lambda": -1.0}, r"si_lambda must be in \[0, inf\)"),
    ({"xi": 0.0}, r"xi must be in \(0, inf\)"),
    ({"gradient": "total"}, r"gradient must be one of 'task', 'full'"),
])
def test_bad_arguments_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SIPlugin(**kwargs)


def test_registry_header():
    check_registry_header(SIPlugin)
    # the protocol defaults the docstring names (S1 task-IL)
    assert signature_defaults(SIPlugin) == {"si_lambda": 300.0, "xi": 0.1, "gradient": "task"}


# ------------------------------------------------------------- end to end: SI, MAS and RWalk

PLUGINS = (SIPlugin, MASPlugin, RWalkPlugin)


def _check_registered():
    """The runner builds these methods from the built-in registry: it must hold these classes."""
    from cl_plugins.registry import get_method

    for cls in PLUGINS:
        spec = get_method(cls.METHOD_NAME)
        assert spec.factory is cls and spec.defaults == signature_defaults(cls)


def test_less_forgetting_than_naive_domain_il(digits_cfg):
    from cl_plugins.experiment.runner import run_experiment

    digits_cfg["benchmark"]["scenario"] = "domain"
    digits_cfg["loggers"]["json"] = False
    digits_cfg["methods"] = [
        "naive",
        {"name": "si", "params": {"si_lambda": 1000.0}},
        {"name": "mas", "params": {"mas_lambda": 10.0}},
        {"name": "rwalk", "params": {"ewc_lambda": 30.0}},
    ]
    _check_registered()
    runs = run_experiment(digits_cfg, echo=lambda *a: None)
    assert [r["status"] for r in runs] == ["finished"] * 4, [r.get("error") for r in runs]
    naive, *methods = runs
    assert naive["summary"]["bwt"] < -0.05  # naive clearly forgets here
    for r in methods:
        assert r["summary"]["bwt"] > naive["summary"]["bwt"] + 0.03, r["method"]
        assert r["summary"]["acc"] > naive["summary"]["acc"] - 0.02, r["method"]


def test_all_three_compose_on_a_multihead_model(digits_cfg):
    from cl_plugins.experiment.runner import run_experiment

    digits_cfg["strategy"]["epochs"] = 1
    digits_cfg["benchmark"]["n_experiences"] = 2
    digits_cfg["loggers"]["json"] = False
    digits_cfg["methods"] = [{"name": "si", "plus": [{"name": "mas"}, {"name": "rwalk"}]}]
    _check_registered()
    (r,) = run_experiment(digits_cfg, echo=lambda *a: None)
    assert r["status"] == "finished", r.get("error")
    assert r["summary"]["acc"] > 0.5  # 5 classes per task: chance is 0.2
