"""core.distributed and core.data_parallel: the collectives, sharded dataset means (EWC's
Fisher, MAS's importance) and the data-parallel plugin, each checked on two gloo processes
against the same computation in one process.

The two-process checks run in one spawned pair (torch.multiprocessing, a file rendezvous) to pay
the start-up once; each check returns what rank 0 and rank 1 computed, compared here."""

from __future__ import annotations

import pickle
import traceback

import pytest
import torch
import torch.distributed as tdist
from avalanche.core import SupervisedPlugin

from cl_plugins.core import distributed as dist
from cl_plugins.core.data_parallel import DataParallelPlugin
from helpers import run_two_ranks


# ------------------------------------------------------------------ one process: no-ops

def test_shard_range_covers_everything_once_in_near_equal_blocks():
    for n in (0, 1, 2, 7, 10, 101):
        for parts in (1, 2, 3, 4):
            blocks = [dist.shard_range(n, parts, i) for i in range(parts)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            sizes = [b - a for a, b in blocks]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_single_process_helpers_leave_values_alone():
    t = torch.arange(5.0)
    dist.all_reduce_sum_([t])
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert dist.gather_rows(t) is t and dist.broadcast_object({"a": 1}) == {"a": 1}
    assert (dist.rank(), dist.world_size(), dist.is_main_process()) == (0, 1, True)
    assert dist.shard_range(9) == (0, 9)


def test_unsafe_plugins_names_each_unmarked_plugin_with_its_reason():
    class Marked(SupervisedPlugin, supports_distributed=True):
        pass

    class Unmarked(SupervisedPlugin):
        distributed_note = "keeps a per-rank buffer"

    class Silent(SupervisedPlugin):
        pass

    assert dist.unsafe_plugins([Marked(), DataParallelPlugin()]) == []
    assert dist.unsafe_plugins([Marked(), Unmarked(), Silent()]) == [
        "Unmarked (keeps a per-rank buffer)", "Silent (not checked under torch.distributed)"]


def test_launched_world_size_reads_torchrun_then_the_nproc_check(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("CL_RUN_NPROC", raising=False)
    assert dist.launched_world_size() == 1
    monkeypatch.setenv("CL_RUN_NPROC", "3")
    assert dist.launched_world_size() == 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.launched_world_size() == 2


# ------------------------------------------------------------------ two processes

def _fisher_and_mas():
    """EWC's 'true' Fisher and MAS's importance on 37 digits-like samples (a fixed model)."""
    from torch.utils.data import TensorDataset

    from cl_plugins.regularization.ewc import EWCPlugin
    from cl_plugins.regularization.mas import MASPlugin
    from cl_plugins.core.params import shared_parameters

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(37, 6, generator=g), torch.randint(0, 3, (37,), generator=g)
    data = TensorDataset(x, y, torch.zeros(37, dtype=torch.long))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ewc = EWCPlugin(ewc_lambda=1.0, fisher="true", fisher_batch_size=5, seed=3)
    fisher = ewc.estimate_fisher(model, data)
    mas = MASPlugin(importance_batch_size=4)
    imp = mas.importance(model, shared_parameters(model), data, [0, 1, 2], 0, torch.device("cpu"))
    return {"fisher": fisher, "mas": imp}


class _RankLocalNudge(SupervisedPlugin, supports_distributed=True):
    """Wrongly marked safe: moves a parameter on rank 1 only (the checksum must see it)."""

    def after_training_exp(self, strategy, **kwargs):
        if dist.rank() == 1:
            with torch.no_grad():
                next(strategy.model.parameters()).add_(1e-3)


class _NanOnRankOne(SupervisedPlugin, supports_distributed=True):
    """Makes rank 1's loss NaN at the third step."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def before_backward(self, strategy, **kwargs):
        self.steps += 1
        if dist.rank() == 1 and self.steps == 3:
            strategy.loss = strategy.loss * float("nan")


def _naive(plugins, batch: int):
    from avalanche.training import Naive

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                 train_mb_size=batch, train_epochs=1, eval_mb_size=256, device="cpu",
                 plugins=plugins, evaluator=None)


def _digits_stream():
    from cl_plugins.benchmarks import build_benchmark

    return build_benchmark(name="split_digits", scenario="class", n_experiences=2, seed=0).benchmark


def _train_one(plugins, batch: int):
    """Train on the first experience and evaluate; the parameters."""
    torch.manual_seed(1)
    bench = _digits_stream()
    strategy = _naive(plugins, batch)
    strategy.train(bench.train_stream[0])
    strategy.eval(bench.test_stream[:1])
    return [p.detach().clone() for p in strategy.model.parameters()]


def _checks(rank: int):
    out = {}
    t = torch.tensor([1.0 + rank, 10.0 * rank])
    d = torch.tensor([rank], dtype=torch.float64)
    dist.all_reduce_sum_([t, d])
    out["sum"] = (t.tolist(), d.tolist())
    out["gather"] = dist.gather_rows(torch.full((rank + 1, 2), float(rank))).tolist()
    out["broadcast"] = dist.broadcast_object({"from": rank})
    out["means"] = _fisher_and_mas()
    # 2 ranks at batch 16 (a global 32) against the one-process batch 32 run below
    out["params"] = _train_one([DataParallelPlugin()], 32)
    for name, plugin in (("nudge", _RankLocalNudge()), ("nan", _NanOnRankOne())):
        from cl_plugins.core.divergence import DivergenceGuard

        try:
            _train_one([DataParallelPlugin(), plugin, DivergenceGuard("probe", 0)], 32)
            out[name] = "no error"
        except Exception as err:  # noqa: BLE001  (the message is what the test checks)
            out[name] = f"{type(err).__name__}: {err}"
    return out


def _worker(rank: int, store: str, queue):  # run_two_ranks' signature
    try:
        tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        torch.set_num_threads(1)
        queue.put((rank, pickle.dumps(_checks(rank))))  # plain bytes, no shared memory
    except Exception:  # noqa: BLE001
        queue.put((rank, traceback.format_exc()))
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_two_ranks(_worker, str(tmp_path_factory.mktemp("ddp") / "store"))


def test_collectives_sum_gather_and_broadcast(two_ranks):
    for r in range(2):
        assert two_ranks[r]["sum"] == ([3.0, 10.0], [1.0])
        assert two_ranks[r]["gather"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert two_ranks[r]["broadcast"] == {"from": 0}


def test_sharded_fisher_and_mas_importance_equal_one_process(two_ranks):
    one = _fisher_and_mas()
    for r in range(2):
        for which in ("fisher", "mas"):
            for n, v in one[which].items():
                # per-batch sums are float32 and the ranks' batches start elsewhere: float32
                # agreement (the totals and the count are float64)
                torch.testing.assert_close(two_ranks[r]["means"][which][n], v, rtol=1e-6,
                                           atol=1e-9)


def test_two_ranks_at_half_batch_train_like_one_process(two_ranks):
    one = _train_one([], 32)
    for r in range(2):
        for a, b in zip(two_ranks[r]["params"], one):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - b).abs().max() > 0 for a, b in zip(one, _train_one([], 16)))  # batch matters


def test_rank_local_parameter_change_is_caught_at_the_end_of_the_experience(two_ranks):
    for r in range(2):
        assert two_ranks[r]["nudge"].startswith("RuntimeError: the ranks' parameters differ "
                                                "after 1 training experience(s)")


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(two_ranks):
    for r in range(2):
        assert two_ranks[r]["nan"].startswith("DivergenceError: probe seed 0: training "
                                              "diverged at experience 0, epoch 0, step 3")


def test_plugin_does_nothing_in_one_process():
    base = _train_one([], 32)
    for a, b in zip(_train_one([DataParallelPlugin()], 32), base):
        assert torch.equal(a, b)
