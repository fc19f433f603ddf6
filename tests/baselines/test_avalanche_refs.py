"""Avalanche's own LwFPlugin (``avalanche_lwf``) on our ClassifierNet in every scenario.

Avalanche's ``LearningWithoutForgetting`` calls ``avalanche_forward(model, x, None)`` on a
``MultiTaskModule`` and expects ``{task: logits}``; ClassifierNet honours that for an explicit
``None`` while ``model(x)`` stays a plain classifier call (see models/classifier.py).
"""

from __future__ import annotations

import pytest
import torch
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training.regularization import LearningWithoutForgetting

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import build_model


@pytest.mark.parametrize("scenario", ["domain", "class"])
def test_avalanche_lwf_runs_two_experiences(digits_cfg, scenario):
    # naive and Avalanche's LwF under the same seed: during the first experience there is no
    # teacher, so LwF trains exactly as naive; from the second on, its KD term changes training
    digits_cfg["benchmark"].update(scenario=scenario, n_experiences=2)
    digits_cfg["strategy"]["epochs"] = 1
    digits_cfg["methods"] = ["naive", "avalanche_lwf"]
    naive, run = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == run["status"] == "finished", run.get("error")
    assert len(run["matrix"]) == 2 and run["matrix"][0] == naive["matrix"][0]
    assert run["matrix"][1] != naive["matrix"][1]


@pytest.mark.parametrize("scenario", ["domain", "class", "task"])
def test_avalanche_lwf_penalty_is_its_kd_on_our_model(scenario):
    # the value Avalanche computes equals its KD over the old classes, computed by hand
    info = build_benchmark("split_digits", scenario)
    exps = info.benchmark.train_stream
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [8]}, info).double()
    model.train()
    avalanche_model_adaptation(model, exps[0])
    lwf = LearningWithoutForgetting(alpha=1.0, temperature=2.0)
    lwf.post_adapt(type("Agent", (), {"model": model})(), exps[0])
    avalanche_model_adaptation(model, exps[1])
    model.double()
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.stack([exps[1].dataset[i][0] for i in range(16)]).double()
    out = model(x, int(exps[1].task_labels[0]))  # what the strategy's forward returns
    got = lwf(x, out, model)

    old = sorted(lwf.prev_classes_by_task[0])
    student, teacher = model(x, 0), lwf.prev_model(x, 0)
    log_p = torch.log_softmax(student[:, old] / 2.0, dim=1)
    q = torch.softmax(teacher[:, old] / 2.0, dim=1)
    want = (q * (q.log() - log_p)).sum(1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-10) and want.item() > 1e-6


def test_single_head_forward_contract():
    info = build_benchmark("split_digits", "class")
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [8]}, info)
    x = torch.randn(5, *info.input_shape)
    assert model(x, None).keys() == {0}  # never trained: task 0
    model.train()
    for e in list(info.benchmark.train_stream)[:2]:
        avalanche_model_adaptation(model, e)
    plain = model(x)
    assert torch.is_tensor(plain) and plain.shape == (5, info.n_outputs)
    all_tasks = model(x, None)
    assert set(all_tasks) == {0} and torch.equal(all_tasks[0], plain)
    assert torch.equal(model(x, 0), plain) and torch.equal(model(x, torch.zeros(5)), plain)

    task_info = build_benchmark("split_digits", "task")  # multi-head: the head's own dict
    mh = build_model({"name": "mlp", "hidden": [8]}, task_info)
    mh.train()
    for e in list(task_info.benchmark.train_stream)[:2]:
        avalanche_model_adaptation(mh, e)
    x = torch.randn(5, *task_info.input_shape)
    for out in (mh(x), mh(x, None)):
        assert set(out) == {0, 1} and torch.equal(out[1], mh(x, 1))


def test_avalanche_generative_replay_is_its_template_with_the_b1_replay_size():
    # B1's reference (continual-learning-baselines split_mnist/generative_replay.py): Avalanche's
    # GenerativeReplay with replay_size 100 and its default MlpVAE for 1x28x28 inputs
    from avalanche.training import GenerativeReplay
    from avalanche.training.plugins import GenerativeReplayPlugin

    from cl_plugins.registry import get_method

    spec = get_method("avalanche_generative_replay")
    assert spec.reference and spec.kind == "template" and "task" not in spec.scenarios
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    st = spec.factory(model=model, optimizer=torch.optim.Adam(model.parameters()),
                      criterion=torch.nn.CrossEntropyLoss(), train_mb_size=16, eval_mb_size=16,
                      **spec.defaults)
    assert isinstance(st, GenerativeReplay)
    replay = [p for p in st.plugins if isinstance(p, GenerativeReplayPlugin)]
    assert len(replay) == 1 and replay[0].untrained_solver
    vae = st.generator_strategy.model
    with torch.no_grad():
        assert vae.generate(3).shape == (3, 1, 28, 28)
