"""avalanche_packnet: Avalanche 0.6's PackNetPlugin on the runner's ClassifierNet (its backbone
packed, per-task heads kept), reading the epochs an iteration budget sets."""

import pytest
import torch
from avalanche.models.packnet import PackNetModel
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from cl_plugins.baselines.avalanche_packnet import AvalanchePackNet
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.iterations import IterationBudgetPlugin
from cl_plugins.models import build_model
from cl_plugins.registry import get_method
from helpers import eval_outputs


def make(plugins, epochs=3, bias=True):
    torch.manual_seed(0)
    info = build_benchmark("split_digits", "task")
    model = build_model({"name": "mlp", "hidden": [16], "bias": bias}, info)
    st = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
               train_mb_size=32, train_epochs=epochs, eval_mb_size=512, device="cpu",
               plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    return st, info


def test_runs_on_our_model_and_keeps_the_first_task_outputs():
    plugin = AvalanchePackNet(post_prune_epochs=1, prune_proportion=0.5)
    st, info = make([plugin])
    train, test = info.benchmark.train_stream, info.benchmark.test_stream
    st.train(train[0])
    assert isinstance(st.model.backbone, PackNetModel)
    layer = st.model.backbone.wrappee.layers[0]
    assert layer.task_index.eq(0).float().mean() == 0.5  # half of it kept by task 0
    first = eval_outputs(st, test[0])
    for e in list(train)[1:3]:
        st.train(e)
    assert torch.equal(eval_outputs(st, test[0]), first)
    assert layer.task_index.eq(1).any()  # the second task packed into the freed half
    spec = get_method("avalanche_packnet")
    assert spec.reference and spec.scenarios == ("task",) and spec.needs_task_labels


def test_epochs_are_read_per_experience_and_too_few_are_refused():
    budget = IterationBudgetPlugin(3 * 8)  # 251 samples: 8 batches, 3 epochs in the budget
    plugin = AvalanchePackNet(post_prune_epochs=2)  # Avalanche alone reads 1 epoch: refused
    st, info = make([plugin, budget], epochs=1)
    st.train(info.benchmark.train_stream[0])
    assert plugin.total_epochs == 3 and st.model.backbone.wrappee.layers[0].task_index.eq(0).any()
    st, info = make([AvalanchePackNet(post_prune_epochs=3)], epochs=3)
    with pytest.raises(ValueError, match="post_prune_epochs=3 must be below the experience's 3"):
        st.train(info.benchmark.train_stream[0])


def test_a_bias_free_backbone_runs_despite_avalanches_has_bias_test():
    """Avalanche's WeightAndBiasPackNetModule tests the weight for has_bias; unpatched, its
    freeze_pruned fails on bias=False layers after the first experience."""
    st, info = make([AvalanchePackNet(post_prune_epochs=1, prune_proportion=0.5)], bias=False)
    train, test = info.benchmark.train_stream, info.benchmark.test_stream
    st.train(train[0])
    packed = [m for m in st.model.backbone.modules() if hasattr(m, "has_bias")]
    assert packed and not any(m.has_bias for m in packed)
    first = eval_outputs(st, test[0])
    st.train(train[1])
    assert torch.equal(eval_outputs(st, test[0]), first)
