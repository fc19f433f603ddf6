"""Build an Avalanche benchmark from a name, a scenario and options.

Every benchmark is assembled the same way: read raw uint8 arrays once (cached per process),
preprocess them to float tensors up front (pad, normalise), cut them into one tensor dataset
per experience (by class, by pixel permutation or by rotation), then hand the list to
Avalanche's ``nc_benchmark`` generator with ``one_dataset_per_exp=True``. The scenario only
changes the labels Avalanche assigns:

- ``task``   (task-IL): task label t on experience t, labels 0..k-1 inside each experience
  (one head per task);
- ``domain`` (domain-IL): task label 0 everywhere, labels 0..k-1 inside each experience
  (one shared k-way head);
- ``class``  (class-IL): task label 0, labels continue across experiences (one head over all
  classes; unseen classes can be masked, see ``cl_plugins.models.heads``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cl_plugins.core.checks import check_choice, check_int, unknown_name_error

from . import preprocess as pp
from .arrays import ImageArrays
from .stored import PixelPermutedDataset, UInt8ImageDataset

SCENARIOS = ("task", "domain", "class")
_SCENARIO_ALIASES = {"task-il": "task", "til": "task", "domain-il": "domain", "dil": "domain",
                     "class-il": "class", "cil": "class"}
DEFAULT_DATA_ROOT = "data"


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    kind: str  # 'split' | 'permuted' | 'rotated'
    source: str  # key of _SOURCES
    default_n_experiences: int
    description: str


@dataclass
class BenchmarkInfo:
    """An Avalanche benchmark plus what models, metrics and results need to know about it."""

    benchmark: object
    name: str
    scenario: str
    n_experiences: int
    input_shape: tuple
    classes_per_exp: List[List[int]]  # class ids as the model sees them, per experience
    original_classes_per_exp: List[List[int]]  # the dataset's own labels, per experience
    n_outputs: int  # head width: per task (task-IL), shared (domain-IL), total (class-IL)
    options: Dict = field(default_factory=dict)

    @property
    def task_labels(self) -> bool:
        return self.scenario == "task"

    def describe(self) -> Dict:
        return {"name": self.name, "scenario": self.scenario, "n_experiences": self.n_experiences,
                "input_shape": list(self.input_shape), "n_outputs": self.n_outputs,
                "classes_per_exp": self.classes_per_exp,
                "original_classes_per_exp": self.original_classes_per_exp, **self.options}


def _load_digits(root, split):
    from .digits import load_digits_arrays
    return load_digits_arrays(split)


# Each loader first checks the files of both splits, so a missing test file is reported (with
# every expected file) before the training files are read.
def _load_idx(name):
    def load(root, split):
        from .mnist_files import find_idx_files, load_idx_dataset
        find_idx_files(root, name, ("train", "test"))
        return load_idx_dataset(root, name, split)
    return load


def _load_cifar(name):
    def load(root, split):
        from .cifar_files import find_cifar_files, load_cifar
        find_cifar_files(root, name, ("train", "test"))
        return load_cifar(root, name, split)
    return load


def _load_tiny(root, split):
    from .tinyimagenet_files import find_tinyimagenet_files, load_tinyimagenet
    find_tinyimagenet_files(root, ("train", "test"))
    return load_tinyimagenet(root, split)


_SOURCES: Dict[str, Callable[[str, str], ImageArrays]] = {
    "digits": _load_digits, "mnist": _load_idx("MNIST"), "fmnist": _load_idx("FashionMNIST"),
    "cifar10": _load_cifar("cifar10"), "cifar100": _load_cifar("cifar100"),
    "tinyimagenet": _load_tiny,
}

BENCHMARKS: Dict[str, BenchmarkSpec] = {s.name: s for s in [
    BenchmarkSpec("split_digits", "split", "digits", 5,
                  "scikit-learn 8x8 digits, 2 classes per experience (embedded, no files)"),
    BenchmarkSpec("split_mnist", "split", "mnist", 5, "MNIST, 2 digits per experience"),
    BenchmarkSpec("permuted_mnist", "permuted", "mnist", 10, "MNIST, one pixel permutation per experience"),
    BenchmarkSpec("rotated_mnist", "rotated", "mnist", 20, "MNIST, one rotation angle per experience"),
    BenchmarkSpec("split_fmnist", "split", "fmnist", 5, "FashionMNIST, 2 classes per experience"),
    BenchmarkSpec("split_cifar10", "split", "cifar10", 5, "CIFAR-10, 2 classes per experience"),
    BenchmarkSpec("split_cifar100", "split", "cifar100", 10, "CIFAR-100, 100/n classes per experience"),
    BenchmarkSpec("split_tinyimagenet", "split", "tinyimagenet", 10, "TinyImageNet, 200/n classes per experience"),
]}


def resolve_scenario(scenario: str) -> str:
    s = _SCENARIO_ALIASES.get(str(scenario).lower(), str(scenario).lower())
    return check_choice("benchmark.scenario", s, SCENARIOS)


def resolve_data_root(data_root: Optional[str]) -> str:
    return str(data_root or os.environ.get("CL_DATA_ROOT") or DEFAULT_DATA_ROOT)


@functools.lru_cache(maxsize=8)
def _raw(source: str, root: str, split: str) -> ImageArrays:
    # Cached: reproduce.py builds the same benchmark once per seed.
    return _SOURCES[source](root, split)


def _class_order(n_classes: int, class_order, seed: int) -> List[int]:
    if class_order in (None, "fixed"):
        return list(range(n_classes))
    if class_order == "seeded":
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n_classes, generator=g).tolist()
    if class_order == "vandeven2022":
        # van de Ven et al.'s code (GMvandeVen/continual-learning, data/load.py): seed 0 keeps
        # the digits in order; any other seed relabels digit y as p[y], p the first draw of
        # numpy's global RNG after np.random.seed(seed), and task t holds new labels 2t, 2t+1.
        # Position i of our order is the original class of new label i, i.e. the inverse of p.
        if seed == 0:
            return list(range(n_classes))
        p = np.random.RandomState(seed).permutation(n_classes)
        return np.argsort(p).tolist()
    if isinstance(class_order, (list, tuple)):
        if sorted(int(c) for c in class_order) != list(range(n_classes)):
            raise ValueError(f"benchmark.class_order must be a permutation of 0..{n_classes - 1}; "
                             f"got {list(class_order)}")
        return [int(c) for c in class_order]
    raise ValueError("benchmark.class_order must be 'fixed', 'seeded', 'vandeven2022' or an "
                     "explicit list of "
                     f"class ids; got {class_order!r}")


def _angles(n_exp: int, angles, angle_range, angle_sampling: str, seed: int) -> List[float]:
    if angles is not None:
        if len(angles) != n_exp:
            raise ValueError(f"benchmark.angles must give one angle per experience ({n_exp}); "
                             f"got {len(angles)}")
        return [float(a) for a in angles]
    lo, hi = (float(a) for a in angle_range)
    if not hi > lo:
        raise ValueError(f"benchmark.angle_range must be [low, high) with high > low; got {angle_range}")
    u = torch.rand(n_exp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if angle_sampling == "uniform":  # DER/Mammoth: each task's angle anywhere in the range
        a = lo + (hi - lo) * u
    else:  # stratified (RGO): task t in [lo + w t, lo + w (t + 1)), w = (hi - lo) / T
        w = (hi - lo) / n_exp
        a = lo + w * (torch.arange(n_exp, dtype=torch.float64) + u)
    return a.tolist()


def build_benchmark(
    name: str = "split_digits",
    scenario: str = "task",
    n_experiences: Optional[int] = None,
    *,
    seed: int = 0,
    class_order: Union[str, Sequence[int], None] = "fixed",
    pad_to_32: bool = False,
    normalize: bool = True,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    samples_per_task: Optional[int] = None,
    test_samples_per_task: Optional[int] = None,
    first_task_identity: bool = True,
    angles: Optional[Sequence[float]] = None,
    angle_range: Sequence[float] = (0.0, 180.0),
    angle_sampling: str = "uniform",
    data_root: Optional[str] = None,
    first_exp_classes: Optional[int] = None,
) -> BenchmarkInfo:
    """Build benchmark ``name`` in ``scenario``; see the module docstring and README for options.

    ``seed`` drives everything random about the benchmark (seeded class order, permutations,
    angles, sample caps). ``normalize`` uses ``mean``/``std`` when given, else the per-channel
    statistics of the (padded) training images, which for padded MNIST are Hsu et al.'s
    (0.1000, 0.2752). ``first_exp_classes`` (split benchmarks): the first experience holds that
    many classes and the others share the rest evenly (PODNet's 50 CIFAR-100 classes, then
    steps of 5); None: every experience the same number.
    """
    spec, scenario, n_exp, root, train_raw, test_raw, n_classes = _open(
        name, scenario, n_experiences, seed, samples_per_task, test_samples_per_task,
        angle_sampling, mean, std, data_root)

    def prep(a: ImageArrays) -> torch.Tensor:
        x = pp.to_float(a.x)
        return pp.pad_to(x, 32) if pad_to_32 else x

    x_train, x_test = prep(train_raw), prep(test_raw)
    if normalize:
        if mean is None:
            mean, std = pp.channel_stats(x_train)
        if len(mean) != x_train.shape[1] or len(std) != x_train.shape[1]:
            raise ValueError(f"benchmark.mean/std need {x_train.shape[1]} values (one per channel)")
        if any(s <= 0 for s in std):
            raise ValueError(f"benchmark.std must be positive; got {list(std)}")
    options = {"seed": seed, "pad_to_32": pad_to_32, "normalize": normalize,
               "mean": list(mean) if normalize else None, "std": list(std) if normalize else None,
               "samples_per_task": samples_per_task, "test_samples_per_task": test_samples_per_task,
               "data_root": root if spec.source != "digits" else None}

    g = torch.Generator().manual_seed(seed + 1)  # independent of the class-order stream
    train_sets, test_sets, orig_classes = [], [], []

    def check_cap(y, cap, what):
        n_cls = int(torch.unique(y).numel())
        if cap is not None and cap < n_cls:
            raise ValueError(f"benchmark.{what}={cap} is smaller than the {n_cls} classes of an "
                             "experience; every class needs at least one sample")

    def finish(x, y, cap, what="samples_per_task"):
        check_cap(y, cap, what)
        idx = pp.subsample(y, cap, g)
        x = x[idx]
        if normalize:
            x = pp.normalize(x, mean, std)
        return TensorDataset(x.contiguous(), y[idx])

    if spec.kind == "split":
        sizes = _check_split(name, n_classes, n_exp, first_exp_classes)
        order = _class_order(n_classes, class_order, seed)
        options["class_order"] = order
        if first_exp_classes is not None:
            options["first_exp_classes"] = first_exp_classes
        for t in range(n_exp):
            cls = sorted(order[sum(sizes[:t]):sum(sizes[:t + 1])])
            orig_classes.append(cls)
            sel = torch.tensor(cls)
            mtr, mte = torch.isin(train_raw.y, sel), torch.isin(test_raw.y, sel)
            train_sets.append(finish(x_train[mtr], train_raw.y[mtr], samples_per_task))
            test_sets.append(finish(x_test[mte], test_raw.y[mte], test_samples_per_task,
                                   "test_samples_per_task"))
    elif first_exp_classes is not None:
        raise ValueError(f"benchmark.first_exp_classes splits the classes of a split benchmark; "
                         f"{name} is {spec.kind} (every experience holds every class)")
    elif spec.kind == "permuted":
        # One normalised source shared by every experience (pixel-wise normalisation commutes
        # with a pixel permutation); each experience keeps only its permutation and indices.
        n_pix = x_train.shape[-1] * x_train.shape[-2]
        gp = torch.Generator().manual_seed(seed)
        perms = [None if (t == 0 and first_task_identity) else torch.randperm(n_pix, generator=gp)
                 for t in range(n_exp)]
        options["first_task_identity"] = first_task_identity
        sources = []
        for x in (x_train, x_test):
            sources.append(pp.normalize(x, mean, std).contiguous() if normalize else x)
        for perm in perms:
            orig_classes.append(list(range(n_classes)))
            for source, raw, cap, what, sets in (
                    (sources[0], train_raw, samples_per_task, "samples_per_task", train_sets),
                    (sources[1], test_raw, test_samples_per_task, "test_samples_per_task",
                     test_sets)):
                check_cap(raw.y, cap, what)
                sets.append(PixelPermutedDataset(source, raw.y, pp.subsample(raw.y, cap, g), perm))
    else:  # rotated: rotate the raw images, then pad, so corners are not cut by the padding
        # Stored as uint8 (a quarter of float32) and normalised per sample by a lookup table.
        degs = _angles(n_exp, angles, angle_range, angle_sampling, seed)
        options.update(angles=degs, angle_sampling=angle_sampling, angle_range=list(angle_range))
        for a in degs:
            orig_classes.append(list(range(n_classes)))
            for raw, cap, what, sets in (
                    (train_raw, samples_per_task, "samples_per_task", train_sets),
                    (test_raw, test_samples_per_task, "test_samples_per_task", test_sets)):
                check_cap(raw.y, cap, what)
                idx = pp.subsample(raw.y, cap, g)
                x = pp.rotate(raw.x[idx], a)
                if pad_to_32:
                    x = pp.pad_to(x, 32)
                sets.append(UInt8ImageDataset(x.contiguous(), raw.y[idx],
                                              mean if normalize else None,
                                              std if normalize else None))

    from avalanche.benchmarks import nc_benchmark

    bm = nc_benchmark(
        train_sets, test_sets, n_experiences=n_exp, task_labels=scenario == "task",
        shuffle=False, one_dataset_per_exp=True,
        class_ids_from_zero_in_each_exp=scenario in ("task", "domain"),
        class_ids_from_zero_from_first_exp=scenario == "class")
    classes_per_exp = [sorted(int(c) for c in e.classes_in_this_experience) for e in bm.train_stream]
    n_outputs = (sum(len(c) for c in classes_per_exp) if scenario == "class"
                 else max(len(c) for c in classes_per_exp))
    return BenchmarkInfo(benchmark=bm, name=name, scenario=scenario, n_experiences=n_exp,
                         input_shape=tuple(train_sets[0][0][0].shape),
                         classes_per_exp=classes_per_exp, original_classes_per_exp=orig_classes,
                         n_outputs=n_outputs, options=options)


def _check_options(name, scenario, n_experiences, seed, samples_per_task, test_samples_per_task,
                   angle_sampling, mean, std):
    """The checks that need no data: (spec, canonical scenario, number of experiences)."""
    if name not in BENCHMARKS:
        raise unknown_name_error("benchmark", name, BENCHMARKS)
    spec = BENCHMARKS[name]
    scenario = resolve_scenario(scenario)
    n_exp = spec.default_n_experiences if n_experiences is None else n_experiences
    check_int("benchmark.n_experiences", n_exp, 1)
    check_int("benchmark.seed", seed)
    if samples_per_task is not None:
        check_int("benchmark.samples_per_task", samples_per_task, 1)
    if test_samples_per_task is not None:
        check_int("benchmark.test_samples_per_task", test_samples_per_task, 1)
    check_choice("benchmark.angle_sampling", angle_sampling, ("uniform", "stratified"))
    if (mean is None) != (std is None):
        raise ValueError("benchmark.mean and benchmark.std must be given together")
    return spec, scenario, n_exp


def _open(name, scenario, n_experiences, seed, samples_per_task, test_samples_per_task,
          angle_sampling, mean, std, data_root):
    """The option checks that need no data, then the raw arrays: (spec, canonical scenario,
    number of experiences, data root, train arrays, test arrays, number of classes)."""
    spec, scenario, n_exp = _check_options(name, scenario, n_experiences, seed,
                                           samples_per_task, test_samples_per_task,
                                           angle_sampling, mean, std)
    root = resolve_data_root(data_root)
    train_raw, test_raw = _raw(spec.source, root, "train"), _raw(spec.source, root, "test")
    n_classes = len(train_raw.classes) or int(train_raw.y.max()) + 1
    return spec, scenario, n_exp, root, train_raw, test_raw, n_classes


def _check_split(name: str, n_classes: int, n_exp: int,
                 first: Optional[int] = None) -> List[int]:
    """The number of classes of each experience: ``n_classes / n_exp`` each, or ``first`` in
    the first experience and the rest evenly over the others."""
    if first is None:
        if n_exp > n_classes or n_classes % n_exp:
            valid = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
            raise ValueError(f"benchmark.n_experiences must divide the {n_classes} classes of "
                             f"{name}; valid values: {valid}; got {n_exp}")
        return [n_classes // n_exp] * n_exp
    check_int("benchmark.first_exp_classes", first, 1, n_classes)
    rest = n_classes - first
    if (n_exp == 1 and rest) or (n_exp > 1 and (rest < n_exp - 1 or rest % (n_exp - 1))):
        valid = [1 + d for d in range(1, rest + 1) if rest % d == 0] if rest else [1]
        raise ValueError(f"benchmark.first_exp_classes={first} leaves {rest} of the {n_classes} "
                         f"classes of {name} for the other experiences, which n_experiences - 1 "
                         f"must divide; valid n_experiences: {valid}; got {n_exp}")
    return [first] + ([rest // (n_exp - 1)] * (n_exp - 1) if n_exp > 1 else [])


def describe_benchmark(name: str = "split_digits", scenario: str = "task",
                       n_experiences: Optional[int] = None, *, seed: int = 0,
                       class_order="fixed", pad_to_32: bool = False, normalize: bool = True,
                       mean=None, std=None, samples_per_task=None, test_samples_per_task=None,
                       first_task_identity: bool = True, angles=None,
                       angle_range=(0.0, 180.0), angle_sampling: str = "uniform",
                       data_root: Optional[str] = None,
                       first_exp_classes: Optional[int] = None) -> Dict:
    """Check every option of :func:`build_benchmark` and read the raw files, without building
    the benchmark: the runner's up-front check of a config. Returns what a model needs to
    know (``n_experiences``, ``input_shape``, ``n_outputs``). Raises what ``build_benchmark``
    would raise for the same arguments (the checks are the same functions); a missing or
    corrupt data file raises here. The raw arrays stay in the per-process cache, so the runs
    that follow do not read the files again."""
    spec, scenario, n_exp, root, train_raw, test_raw, n_classes = _open(
        name, scenario, n_experiences, seed, samples_per_task, test_samples_per_task,
        angle_sampling, mean, std, data_root)
    c, h, w = train_raw.x.shape[1:]
    shape = (c, 32, 32) if pad_to_32 else (c, h, w)
    if pad_to_32 and (h > 32 or w > 32):
        raise ValueError(f"benchmark.pad_to_32: {name}'s images are {h}x{w}, larger than 32")
    if normalize and mean is not None and (len(mean) != c or len(std) != c):
        raise ValueError(f"benchmark.mean/std need {c} values (one per channel)")
    if normalize and std is not None and any(s <= 0 for s in std):
        raise ValueError(f"benchmark.std must be positive; got {list(std)}")
    if spec.kind == "split":
        sizes = _check_split(name, n_classes, n_exp, first_exp_classes)
        _class_order(n_classes, class_order, seed)
        per_exp = max(sizes)
    else:
        if first_exp_classes is not None:
            raise ValueError(f"benchmark.first_exp_classes splits the classes of a split "
                             f"benchmark; {name} is {spec.kind} (every experience holds every "
                             "class)")
        per_exp = n_classes
        if spec.kind == "rotated":
            _angles(n_exp, angles, angle_range, angle_sampling, seed)
    for cap, what in ((samples_per_task, "samples_per_task"),
                      (test_samples_per_task, "test_samples_per_task")):
        if cap is not None and cap < per_exp:
            raise ValueError(f"benchmark.{what}={cap} is smaller than the {per_exp} classes of "
                             "an experience; every class needs at least one sample")
    n_outputs = per_exp * n_exp if scenario == "class" else per_exp
    if spec.kind == "split" and scenario == "class":
        n_outputs = n_classes
    return {"n_experiences": n_exp, "input_shape": shape, "n_outputs": n_outputs}
