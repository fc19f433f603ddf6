"""core.weight_override.ParamWeights: parameters overridden by name (biases, a head created later),
put back, their gradients taken; and a WeightOverridePlugin that overrides them."""

import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.weight_override import ParamWeights, WeightOverridePlugin
from cl_plugins.models import build_model


def test_write_saves_each_parameter_once_and_restore_puts_all_back():
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    w0, b0, b1 = (net[0].weight.detach().clone(), net[0].bias.detach().clone(),
                  net[1].bias.detach().clone())
    pw = ParamWeights(net, ["0.weight"])
    assert torch.equal(pw.base()["0.weight"], w0) and pw.saved is None
    pw.write({"0.weight": torch.ones(2, 3), "1.bias": torch.full((2,), 7.0)})
    assert set(pw.saved) == {"0.weight", "1.bias"} and torch.equal(pw.base()["0.weight"], w0)
    pw.write({"1.bias": torch.zeros(2), "0.bias": torch.ones(2)})  # saved once: the originals
    assert torch.equal(pw.saved["1.bias"], b1) and torch.equal(net[1].bias, torch.zeros(2))
    net(torch.randn(4, 3)).sum().backward()
    grads = pw.take_grads()
    assert set(grads) == {"0.weight", "0.bias", "1.bias"} and grads["1.bias"].abs().sum() > 0
    assert net[0].weight.grad is None and net[1].bias.grad is None
    assert net[1].weight.grad is not None  # not overridden: left to the strategy
    pw.restore()
    assert torch.equal(net[0].weight, w0) and torch.equal(net[0].bias, b0)
    assert torch.equal(net[1].bias, b1) and pw.saved is None


class BiasShift(WeightOverridePlugin):
    """b_eff(t) = b0 + s_t for every bias of the model, the task's head included."""

    def __init__(self):
        super().__init__()
        self.shifts = {}

    def targets(self, model):
        return ParamWeights(model)

    def begin_task(self, strategy, task):
        names = [n for n, _ in strategy.model.named_parameters() if n.endswith("bias")]
        self.shifts[task] = {n: torch.zeros_like(strategy.model.get_parameter(n),
                                                 requires_grad=True) for n in names}

    def own_parameters(self, task):
        return list(self.shifts[task].values())

    def effective_weights(self, task, train):
        return {n: self._model.get_parameter(n).detach() + s
                for n, s in self.shifts.get(task, {}).items()}


def test_a_plugin_overriding_biases_by_name_trains_only_its_shifts():
    torch.manual_seed(0)
    info = build_benchmark("split_digits", "task")
    model = build_model({"name": "mlp", "hidden": [8]}, info)
    plugin = BiasShift()
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               train_mb_size=32, train_epochs=1, device="cpu", plugins=[plugin],
               evaluator=EvaluationPlugin(loggers=[]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    st.train(info.benchmark.train_stream[0])
    after = dict(model.named_parameters())
    for n, p in after.items():  # biases restored after each step, weights trained by SGD
        assert torch.equal(p, before[n]) == n.endswith("bias"), n
    assert "head.classifiers.0.classifier.bias" in plugin.shifts[0]
    assert all(s.abs().sum() > 0 for s in plugin.shifts[0].values())
