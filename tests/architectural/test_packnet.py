"""PackNet (architectural/packnet.py): owned weights fixed bit for bit under SGD with momentum and
weight decay, exact per-layer pruning and its schedule, per-task masks at evaluation, resume."""

import copy

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from torch.func import functional_call

from cl_plugins.architectural.packnet import PackNetPlugin, prune_by_magnitude, visible
from helpers import eval_outputs, masking_strategy, train_both_equal

LAYERS = ("backbone.layers.0", "backbone.layers.3")  # Linear, BatchNorm1d, ReLU, Linear, ...


class Watch(SupervisedPlugin):
    """Listed after PackNet: after every update, the weights of task code 1 (and the shared
    parts) must equal their values at the end of the first experience."""

    def __init__(self, packnet):
        super().__init__()
        self.packnet, self.ref, self.checked, self.pressure = packnet, None, 0, 0.0

    def after_update(self, strategy, **kwargs):
        if self.ref is None:
            return
        sd = strategy.model.state_dict()
        for k, v in self.ref.items():
            if k.rsplit(".", 1)[0] in LAYERS and k.endswith("weight"):
                own = self.packnet.owner[k.rsplit(".", 1)[0]] == 1
                assert torch.equal(sd[k][own], v[own]), k
                buf = strategy.optimizer.state[strategy.model.get_parameter(k)]["momentum_buffer"]
                self.pressure += float(buf[own].abs().sum())  # what SGD would have applied
            else:
                assert torch.equal(sd[k], v), k  # biases, BatchNorm affine and statistics
        self.checked += 1


def test_old_task_weights_and_shared_parts_never_change_under_momentum_and_weight_decay():
    packnet = PackNetPlugin()
    watch = Watch(packnet)
    st, info = masking_strategy([packnet, watch])
    stream = info.benchmark.train_stream
    st.train(stream[0])
    watch.ref = {k: v.clone() for k, v in st.model.state_dict().items()
                 if k.startswith("backbone.")}
    for e in list(stream)[1:3]:
        st.train(e)
    assert watch.checked > 20
    assert watch.pressure > 0  # momentum and weight decay pushed those weights every step


def test_each_prune_frees_round_p_n_of_the_task_weights_with_the_smallest_magnitude():
    packnet = PackNetPlugin(prune_ratio=[0.5, 0.75])

    class Record(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.pruned_at, self.step, self.zeros_held = None, 0, 0

        def before_training_iteration(self, strategy, **kwargs):
            if packnet._pruned and self.pruned_at is None:
                self.pruned_at = self.step

        def after_update(self, strategy, **kwargs):
            if packnet._pruned:  # retraining: the freed weights stay exactly 0
                for n in LAYERS:
                    w = strategy.model.get_submodule(n).weight
                    assert torch.all(w[packnet.owner[n] == 0] == 0)
                self.zeros_held += 1

        def after_training_iteration(self, strategy, **kwargs):
            self.step += 1

    before = {}

    class Dense(SupervisedPlugin):  # listed first: the weights right before the prune
        def before_training_iteration(self, strategy, **kwargs):
            if not packnet._pruned:
                before.update({n: strategy.model.get_submodule(n).weight.detach().clone()
                               for n in LAYERS})

    record = Record()
    st, info = masking_strategy([Dense(), packnet, record], epochs=3)
    st.train(info.benchmark.train_stream[0])
    total = -(-len(info.benchmark.train_stream[0].dataset) // 32) * 3  # batches x epochs
    assert record.pruned_at == total - round(total / 3) and record.zeros_held == round(total / 3)
    for n in LAYERS:
        o, w0 = packnet.owner[n], before[n]
        assert int((o == 1).sum()) == o.numel() - round(0.5 * o.numel())
        assert w0[o == 0].abs().max() <= w0[o == 1].abs().min()  # the smallest magnitudes
    st.train(info.benchmark.train_stream[1])
    for n in LAYERS:
        o = packnet.owner[n]
        freed = o.numel() - int((o == 1).sum())
        assert int((o == 2).sum()) == freed - round(0.75 * freed)


def test_evaluation_uses_the_task_mask_and_old_outputs_are_reproduced_exactly():
    packnet = PackNetPlugin()
    st, info = masking_strategy([packnet])
    train, test = info.benchmark.train_stream, info.benchmark.test_stream
    for e in list(train)[:2]:
        st.train(e)
    x = torch.stack([test[0].dataset[i][0] for i in range(len(test[0].dataset))])
    out0, out1 = eval_outputs(st, test[0]), eval_outputs(st, test[1])
    st.model.eval()
    masked = {n + ".weight": st.model.get_submodule(n).weight * visible(packnet.owner[n], 1)
              for n in LAYERS}  # (K4) for the first task
    by_hand = functional_call(st.model, {**dict(st.model.named_parameters()), **masked},
                              (x, torch.zeros(len(x), dtype=torch.long)))
    assert torch.allclose(out0, by_hand, atol=1e-6)
    assert not torch.allclose(out0, st.model(x, torch.zeros(len(x), dtype=torch.long)))
    for e in list(train)[2:]:
        st.train(e)
    assert torch.equal(eval_outputs(st, test[0]), out0) and torch.equal(eval_outputs(st, test[1]), out1)


def test_prune_by_magnitude_counts_ties_by_position_and_only_the_task_weights():
    w = torch.tensor([[0.1, -0.1, 0.5], [0.1, 3.0, -0.2]])
    owner = torch.tensor([[2, 2, 1], [2, 2, 2]], dtype=torch.uint8)
    cut = prune_by_magnitude(w, owner, 2, 0.6)  # round(0.6 * 5) = 3 of the five owned by 2
    assert cut.tolist() == [[True, True, False], [True, False, False]]
    assert not prune_by_magnitude(w, owner, 2, 0.0).any()


def test_arguments_schedule_and_prune_ratio_list_are_checked():
    with pytest.raises(ValueError, match=r"prune_ratio must be in \[0, 1\); got 1.0"):
        PackNetPlugin(prune_ratio=1.0)
    with pytest.raises(ValueError, match=r"prune_ratio\[1\] must be in"):
        PackNetPlugin(prune_ratio=[0.5, -0.1])
    with pytest.raises(ValueError, match=r"retrain_fraction must be in"):
        PackNetPlugin(retrain_fraction=1.0)
    st, info = masking_strategy([PackNetPlugin()], epochs=1)
    st.train_mb_size = 10_000  # one step per experience: nothing left to retrain
    with pytest.raises(ValueError, match="needs 2 or more steps per experience.*has 1"):
        st.train(info.benchmark.train_stream[0])
    st, info = masking_strategy([PackNetPlugin(prune_ratio=[0.5], retrain_fraction=0.0)], epochs=1)
    st.train_mb_size = 10_000
    st.train(info.benchmark.train_stream[0])  # f = 0: the prune comes at the end
    with pytest.raises(ValueError, match="lists 1 values .* experience number 2"):
        st.train(info.benchmark.train_stream[1])


def test_state_round_trip_resume_and_cost():
    sgd = dict(lr=0.1)  # no optimizer state: the strategies differ in nothing else
    a = PackNetPlugin(prune_ratio=0.5)
    st_a, info = masking_strategy([a], sgd=sgd)
    stream = list(info.benchmark.train_stream)
    for e in stream[:2]:
        st_a.train(e)
    path = __import__("tempfile").mkdtemp() + "/state.pt"
    torch.save(a.state_dict(), path)
    b = PackNetPlugin(prune_ratio=0.5)
    b.load_state_dict(torch.load(path, weights_only=True))
    st_b, _ = masking_strategy([b], sgd=sgd, seed=5)
    for e in stream[:2]:  # the runner's resume: the fresh model grows its heads, then loads
        avalanche_model_adaptation(st_b.model, e)
    train_both_equal(st_a, st_b, stream[2], (), copy.deepcopy(st_a.model.state_dict()))
    assert a.tasks == b.tasks == [0, 1, 2]
    assert all(torch.equal(a.owner[n], b.owner[n]) for n in a.owner)
    n0 = sum(o.numel() for o in a.owner.values())  # 64 * 16 + 16 * 16
    assert a.cost_per_task() == {0: {"params": n0 // 2, "bytes": n0},
                                 1: {"params": n0 // 4, "bytes": n0},
                                 2: {"params": n0 // 8, "bytes": n0}}
    with pytest.raises(ValueError, match="saved with prune_ratio=0.5, this plugin has "
                                         "prune_ratio=0.75"):
        PackNetPlugin().load_state_dict(a.state_dict())
