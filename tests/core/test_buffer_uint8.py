"""ReplayBuffer uint8 storage of inputs on a pixel grid (``x_dtype="uint8"`` with ``x_range``):
exact round trip against the benchmarks' own preprocessing, bytes per sample, off-grid inputs
refused, argument errors, state round trip, and every replay plugin training identically with
uint8 and with float32 storage on split_digits."""

from __future__ import annotations

import copy

import pytest
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

import cl_plugins.benchmarks.preprocess as pp
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.benchmarks.stored import UInt8ImageDataset
from cl_plugins.core.buffer import ReplayBuffer, _Grid, check_x_range, grid_range
from cl_plugins.models import build_model
from cl_plugins.registry import signature_defaults
from cl_plugins.replay.der import DERPlugin
from cl_plugins.replay.er import ERPlugin
from cl_plugins.replay.gdumb import GDumbPlugin
from cl_plugins.replay.icarl import ICaRLPlugin
from cl_plugins.replay.mir import MIRPlugin

MNIST = ([0.1307], [0.3081])
CIFAR100 = ([0.5071, 0.4866, 0.4409], [0.2673, 0.2564, 0.2762])


def _images(n, c, hw=28, seed=0):
    """Random uint8 images [n, c, hw, hw]; every level 0..255 occurs in every channel."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randint(0, 256, (c, n * hw * hw), generator=g, dtype=torch.uint8)
    flat[:, :256] = torch.arange(256, dtype=torch.uint8)
    return flat.view(c, n, hw, hw).transpose(0, 1).contiguous()


def _benchmark_values(v, norm):
    """The benchmarks' preprocessing of uint8 images: to_float, then normalize."""
    x = pp.to_float(v)
    return x if norm is None else pp.normalize(x, *norm)


def _u8(capacity, norm, **kw):
    rng = grid_range(*norm) if norm is not None else grid_range()
    return ReplayBuffer(capacity, x_dtype="uint8", x_range=rng, **kw)


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("norm", [MNIST, CIFAR100, None, ([0.1000], [0.2752])],
                         ids=["mnist", "cifar100", "unnormalised", "padded-mnist"])
def test_round_trip_is_bit_exact_on_every_read_path(norm):
    c = 1 if norm is None else len(norm[0])
    v = _images(40, c, hw=16, seed=c)
    x = _benchmark_values(v, norm)
    y = torch.arange(40) % 4
    t = torch.arange(40) // 20
    buf = _u8(40, norm, seed=0)
    for i in range(0, 40, 7):
        buf.add(x[i:i + 7], y[i:i + 7], t[i:i + 7])
    assert buf.x.dtype == torch.uint8 and torch.equal(buf.x, v)  # the pixel levels themselves
    got = buf.get(torch.arange(40))
    assert got.x.dtype == torch.float32 and torch.equal(got.x, x)
    s = buf.sample(13)
    assert torch.equal(s.x, x[s.index])
    p = buf.sample_per_task(10)
    assert torch.equal(p.x, x[p.index])
    b = torch.cat([b.x for b in buf.iter_batches(9)])
    assert torch.equal(b, x)
    sh = list(buf.iter_batches(9, shuffle=True))
    assert torch.equal(torch.cat([b.x for b in sh]), x[torch.cat([b.index for b in sh])])
    ds = buf.to_dataset()
    assert torch.equal(ds.tensors[0], x) and ds.tensors[0].dtype == torch.float32
    # the rotated benchmarks' uint8 lookup-table dataset gives the same values
    lut = UInt8ImageDataset(v, y, *(norm if norm is not None else (None, None)))
    assert torch.equal(torch.stack([lut[i][0] for i in range(40)]), got.x)
    # set_contents: read-back values go in again unchanged (GEM's and iCaRL's re-store)
    buf.set_contents(got.x[5:25], got.y[5:25], got.t[5:25])
    assert torch.equal(buf.get(torch.arange(20)).x, x[5:25]) and torch.equal(buf.x, v[5:25])


def test_flat_inputs_and_reservoir_overwrites():
    """Flattened MNIST-like rows [N, 784] with a single (lo, hi); a full buffer overwrites."""
    v = _images(300, 1, seed=3).flatten(1)
    x = (v.float() / 255 - 0.1307) / 0.3081  # the same float32 operations, done by hand
    buf = _u8(50, MNIST, seed=1)
    for i in range(0, 300, 32):
        buf.add(x[i:i + 32], torch.zeros(len(x[i:i + 32]), dtype=torch.long))
    assert buf.is_full and buf.n_seen == 300
    rows = buf.get(torch.arange(50)).x
    hit = (rows[:, None] == x[None]).all(-1)  # every stored row is one of the inputs, exactly
    assert hit.any(1).all()
    assert torch.equal(buf.x, v[hit.float().argmax(1)])


def test_mean_and_std_come_back_from_x_range():
    """The buffer recovers the float32 mean and std from x_range: exact for the configs'
    statistics, and for all but a tie in a million random pairs (then one float32 ulp)."""
    cifar10 = ([0.4914, 0.4824, 0.4467], [0.2470, 0.2435, 0.2616])
    for mean, std in (MNIST, CIFAR100, ([0.1000], [0.2752]), cifar10):
        grid = _Grid(check_x_range(grid_range(mean, std)))
        q = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(1, len(mean), 1, 1)
        assert torch.equal(grid.decode(q), _benchmark_values(q, (mean, std)))
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(3000, generator=g, dtype=torch.float64) * 2.5 - 1).tolist()
    s = (torch.rand(3000, generator=g, dtype=torch.float64) * 5 + 1e-3).tolist()
    levels = torch.arange(256, dtype=torch.uint8)
    differ = 0
    for mi, si in zip(m, s):
        got = _Grid(check_x_range(grid_range(mi, si))).decode(levels)
        want = (levels.float() / 255 - torch.tensor(mi, dtype=torch.float32)) / torch.tensor(
            si, dtype=torch.float32)
        if not torch.equal(got, want):
            differ += 1
            assert torch.allclose(got, want, rtol=2 ** -22, atol=0)
    assert differ <= 1, differ


def test_grid_range():
    assert grid_range() == (0.0, 1.0)
    lo, hi = grid_range(*MNIST)
    assert lo == [-0.1307 / 0.3081] and hi == [(1 - 0.1307) / 0.3081]
    assert grid_range(0.5, 0.5) == (-1.0, 1.0)
    lo, hi = grid_range(*CIFAR100)
    assert len(lo) == len(hi) == 3 and all(h > lw for lw, h in zip(lo, hi))
    info = build_benchmark("split_digits", "class")
    assert grid_range(info.options["mean"], info.options["std"])[0][0] < 0
    with pytest.raises(ValueError, match="together"):
        grid_range([0.1], None)
    with pytest.raises(ValueError, match="same length"):
        grid_range([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="std must be positive"):
        grid_range([0.1], [0.0])


# ---------------------------------------------------------------------------- memory


def test_bytes_per_sample():
    y = torch.zeros(4, dtype=torch.long)
    mnist = _u8(100, MNIST, seed=0)
    mnist.add(_benchmark_values(_images(4, 1), MNIST), y)
    assert mnist.bytes_per_sample == 28 * 28 + 8 == 792 and mnist.nbytes == 100 * 792
    with_t = _u8(100, MNIST, seed=0)
    with_t.add(_benchmark_values(_images(4, 1), MNIST), y, t=y)
    assert with_t.bytes_per_sample == 784 + 8 + 8
    cifar = _u8(100, CIFAR100, seed=0)
    cifar.add(_benchmark_values(_images(4, 3, hw=32), CIFAR100), y)
    assert cifar.bytes_per_sample == 32 * 32 * 3 + 8 == 3080
    float32 = ReplayBuffer(100, seed=0)
    float32.add(_benchmark_values(_images(4, 1), MNIST), y)
    assert float32.bytes_per_sample == 4 * 784 + 8


# ---------------------------------------------------------------------------- refusals


def test_off_grid_inputs_raise_and_leave_the_buffer_untouched():
    x = _benchmark_values(_images(8, 1), MNIST)
    y = torch.zeros(8, dtype=torch.long)
    spacing = 1 / 255 / 0.3081
    buf = _u8(10, MNIST, seed=0)
    buf.add(x[:4], y[:4])
    before = (buf.x.clone(), buf.n_seen, len(buf), buf.generator.get_state())
    lo = grid_range(*MNIST)[0][0]
    for value, found in ((float(x[5, 0, 0, 0]) + 0.3 * spacing, "not on the 256-level grid"),
                         (lo - spacing, "not on the 256-level grid"),  # below level 0
                         (float("nan"), "non-finite")):
        z = x[4:].clone()
        z[1, 0, 0, 0] = value
        with pytest.raises(ValueError, match="x_range") as err:
            buf.add(z, y[4:])
        assert found in str(err.value) and "1 of 3136" in str(err.value)
        with pytest.raises(ValueError, match="x_range"):
            buf.set_contents(z, y[4:])
        assert torch.equal(buf.x, before[0]) and buf.n_seen == before[1] == 4
        assert len(buf) == 4 and torch.equal(buf.generator.get_state(), before[3])
    # within a quarter of the spacing: accepted, stored as the nearest level
    z = x[4:].clone()
    z[2, 0, 5, 5] += 0.2 * spacing
    buf.add(z, y[4:])
    assert torch.equal(buf.get(torch.arange(4, 8)).x, x[4:])
    # inputs of another normalisation (here unnormalised values with MNIST's range)
    with pytest.raises(ValueError, match=r"x_range=\(-0.42"):
        _u8(10, MNIST, seed=0).add(pp.to_float(_images(2, 1)), y[:2])
    # a padded crop: the padding 0.0 lies between two levels of the normalised MNIST grid
    with pytest.raises(ValueError, match="augmented"):
        _u8(10, MNIST, seed=0).add(torch.nn.functional.pad(x[:2], (2, 0))[..., :28], y[:2])


def test_dtype_combinations():
    y = torch.zeros(3, dtype=torch.long)
    levels = _images(3, 1)
    # uint8 inputs without x_range: stored as they are (unchanged behaviour)
    raw = ReplayBuffer(5, seed=0, x_dtype="uint8")
    raw.add(levels, y)
    assert raw.sample(3).x.dtype == torch.uint8 and raw.bytes_per_sample == 792
    # float inputs into uint8 storage need x_range (a cast would truncate them)
    with pytest.raises(ValueError, match="x_range"):
        ReplayBuffer(5, seed=0, x_dtype=torch.uint8).add(pp.to_float(levels), y)
    # with x_range the inputs must be the float values, not the levels
    with pytest.raises(ValueError, match="floating point"):
        _u8(5, MNIST, seed=0).add(levels, y)
    # float16 inputs on the unnormalised grid are read back as float32
    half = _u8(5, None, seed=0)
    half.add(pp.to_float(levels).half(), y)
    assert torch.equal(half.get(torch.arange(3)).x, pp.to_float(levels))


def test_bad_arguments_name_x_range():
    ok = (0.0, 1.0)
    with pytest.raises(ValueError, match="x_range sets the value grid.*x_dtype='uint8'"):
        ReplayBuffer(5, x_range=ok)
    with pytest.raises(ValueError, match="x_range sets the value grid.*float16"):
        ReplayBuffer(5, x_dtype="float16", x_range=ok)
    for bad, msg in (((1.0, 1.0), "hi > lo"), ((2.0, -1.0), "hi > lo"),
                     (([0.0, 0.0], [1.0]), "the same length"), (([], []), "at least 1"),
                     ((0.0, 1.0, 2.0), r"must be \(lo, hi\)"), ("0,1", r"must be \(lo, hi\)"),
                     ((0.0, [1.0]), r"must be \(lo, hi\)"), ((0.0, float("inf")), "finite"),
                     (([0.0, "a"], [1.0, 1.0]), r"must be \(lo, hi\)")):
        with pytest.raises(ValueError, match=msg) as err:
            ReplayBuffer(5, x_dtype="uint8", x_range=bad)
        assert "x_range" in str(err.value)
    assert check_x_range([0, 1]) == ((0.0,), (1.0,))  # YAML lists and ints are fine
    three = ReplayBuffer(5, x_dtype="uint8", x_range=grid_range(*CIFAR100))
    with pytest.raises(ValueError, match="x_range gives 3 channels"):
        three.add(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------- state


def test_state_round_trip():
    x = _benchmark_values(_images(60, 3, hw=8), CIFAR100)
    y = torch.arange(60) % 3
    a = _u8(20, CIFAR100, seed=4, policy="class_balanced")
    a.add(x[:30], y[:30])
    state = copy.deepcopy(a.state_dict())
    assert state["x_range"] == [list(v) for v in grid_range(*CIFAR100)]
    assert state["data"]["x"].dtype == torch.uint8
    b = ReplayBuffer(20, policy="class_balanced")  # x_dtype and x_range come from the state
    b.load_state_dict(state)
    assert b.x_range == a.x_range and b.x_dtype == torch.uint8
    assert torch.equal(b.get(torch.arange(20)).x, a.get(torch.arange(20)).x)
    for buf in (a, b):
        buf.add(x[30:], y[30:])
    assert torch.equal(a.x, b.x) and torch.equal(a.sample(7).x, b.sample(7).x)
    # a state saved before x_range existed loads as no grid
    old = ReplayBuffer(5, seed=0)
    old.add(x[:2], y[:2])
    st = old.state_dict()
    del st["x_range"]
    fresh = _u8(5, CIFAR100)
    fresh.load_state_dict(st)
    assert fresh.x_range is None and torch.equal(fresh.get(torch.arange(2)).x, x[:2])


# ---------------------------------------------------------------------------- plugins


def _train(plugin, scenario="class", n_exp=3, seed=0):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": [32]}, info)
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
               train_mb_size=32, train_epochs=1, eval_mb_size=256, device="cpu",
               plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    for e in list(info.benchmark.train_stream)[:n_exp]:
        torch.manual_seed(100 + e.current_experience)  # same dataloader order in both runs
        st.train(e)
    return model, info


def _digits_range():
    info = build_benchmark("split_digits", "class")
    return grid_range(info.options["mean"], info.options["std"])


def _buffers(p):
    if isinstance(p, ERPlugin):
        return p.store
    return p.buffer


@pytest.mark.parametrize("make", [
    lambda **kw: ERPlugin(mem_size=60, replay_mb_size=16, seed=0, **kw),
    lambda **kw: ERPlugin(mem_size=None, mem_per_class=6, replay_mb_size=16, seed=0, **kw),
    lambda **kw: DERPlugin(mem_size=60, replay_mb_size=16, seed=0, **kw),
    lambda **kw: MIRPlugin(mem_size=60, subsample=20, mem_mb_size=8, seed=0, **kw),
    lambda **kw: GDumbPlugin(mem_size=60, epochs_on_memory=2, crop_padding=1, seed=0, **kw),
    lambda **kw: ICaRLPlugin(mem_size=4, fixed_memory=False, **kw),
], ids=["er", "er-mem_per_class", "der", "mir", "gdumb", "icarl-growing"])
def test_plugins_train_identically_with_uint8_storage(make):
    """split_digits inputs are (v / 255 - m) / s of uint8 levels: with x_dtype="uint8" and the
    benchmark's x_range every plugin replays exactly the inputs it stored, so training is
    bit-identical to float32 storage, at a quarter of the input bytes."""
    rng = _digits_range()
    ref, small = make(), make(x_dtype="uint8", x_range=rng)
    m_ref, _ = _train(ref)
    m_u8, info = _train(small)
    for (n, a), b in zip(m_ref.named_parameters(), m_u8.parameters()):
        assert torch.equal(a, b), n
    b_ref, b_u8 = _buffers(ref), _buffers(small)
    assert b_u8.x_range == check_x_range(rng) and b_u8.x.dtype == torch.uint8
    assert b_ref.x.dtype == torch.float32 and len(b_u8) == len(b_ref) > 0
    assert torch.equal(b_u8.get(torch.arange(len(b_u8))).x, b_ref.x)
    assert b_u8.bytes_per_sample == b_ref.bytes_per_sample - 3 * 64  # 8x8 digits: 256 -> 64
    # what is replayed is exactly training data
    xs = torch.cat([torch.stack([e.dataset[i][0] for i in range(len(e.dataset))])
                    for e in list(info.benchmark.train_stream)[:3]]).flatten(1)
    rows = b_u8.sample(min(20, len(b_u8))).x.flatten(1)
    assert (rows[:, None] == xs[None]).all(-1).any(1).all()


@pytest.mark.parametrize("cls, kw", [(ERPlugin, {}), (ERPlugin, {"mem_size": None,
                                                                 "mem_per_class": 5}),
                                     (DERPlugin, {}), (MIRPlugin, {}), (GDumbPlugin, {}),
                                     (ICaRLPlugin, {})])
def test_plugins_validate_x_range(cls, kw):
    assert signature_defaults(cls)["x_range"] is None
    with pytest.raises(ValueError, match="x_range.*x_dtype='uint8'"):
        cls(**kw, x_range=[0.0, 1.0])
    with pytest.raises(ValueError, match="x_range needs hi > lo"):
        cls(**kw, x_dtype="uint8", x_range=[1.0, 0.0])
    p = cls(**kw, x_dtype="uint8", x_range=[0.0, 1.0])
    holder = p.memory if getattr(p, "memory", None) is not None else p.buffer
    assert holder.x_range == ((0.0,), (1.0,))


def test_er_state_round_trip_keeps_the_grid():
    rng = _digits_range()
    a = ERPlugin(mem_size=None, mem_per_class=4, seed=0, x_dtype="uint8", x_range=rng)
    _train(a, n_exp=2)
    b = ERPlugin(mem_size=None, mem_per_class=4, seed=0, x_dtype="uint8", x_range=rng)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.store.x_range == a.store.x_range and b.store.x.dtype == torch.uint8
    assert torch.equal(b.store.get(torch.arange(len(b.store))).x,
                       a.store.get(torch.arange(len(a.store))).x)
