"""The tensor-batch rows against Avalanche's per-sample reads, on every protocol's benchmark.

``TensorBatchesPlugin`` (cl_plugins/core/tensor_batches.py) serves every single-process run's
minibatches from rows it gathers once per loader. Its tests use split_digits; the protocols of
RESULTS.md use the stored MNIST-family benchmarks (split, permuted, rotated, FashionMNIST,
padded to 32, seeded class orders, task labels). A wrong row there changes results silently, as
the class-mapping lookup did until aac0819 (joint and cumulative concatenations). This check
builds each protocol variant's benchmark as its config reads today, for benchmark seeds 0 and 2
(two class orders where the config draws one), and compares, for

- each experience's training and test data, in the train and eval transform groups,
- the concatenation of all training experiences (joint's data, and what ER's and the other
  buffers' subsets of it are made of) and of all test experiences,

``dataset_rows`` (every field: input, label, task label) with ``dataset[i]`` read one by one, on
``--samples`` random indices of each (all of them where fewer). Every row is gathered before
any sample is read one by one, which is stricter than a run (``read_all`` reads sample 0 through
the loader first): on the code before aac0819 it flags S2's single experiences too, not only the
concatenations that were wrong in runs. A benchmark whose data is not here (CIFAR,
TinyImageNet) is listed as skipped. Exit status 1 when any row differs.

    python experiments/checks/tensor_rows_every_protocol.py --data-root DATA [--samples 400]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

from reproduce import PROTOCOLS, config_for  # noqa: E402

from avalanche.benchmarks.utils import concat_datasets  # noqa: E402
from cl_plugins.benchmarks import build_benchmark, resolve_scenario  # noqa: E402
from cl_plugins.core import tensor_batches as tb  # noqa: E402
from cl_plugins.experiment.cli import parse_args  # noqa: E402
from cl_plugins.experiment.config import apply_override, expand_paths, load_config  # noqa: E402


def bench_cfg(proto, variant, data_root):
    _, overrides, _, _, _ = parse_args(list(proto["variants"][variant]))
    cfg = load_config(REPO / config_for(proto, variant))
    for key, value in overrides:
        apply_override(cfg, key, value)
    cfg["benchmark"]["data_root"] = data_root
    expand_paths(cfg)
    cfg["benchmark"]["scenario"] = resolve_scenario(cfg["benchmark"]["scenario"])
    return dict(cfg["benchmark"])


def sampled_rows(ds, samples: int, gen: torch.Generator):
    """(indices, ``dataset_rows`` at those indices) where the plugin would use the rows, else
    None (it keeps the per-sample path). Only the sampled rows are kept: all of them for a
    20-experience rotated MNIST took 20 GB."""
    rows = tb.dataset_rows(ds) if tb.fixed_samples(ds) else None
    if rows is None:
        return None
    n = len(ds)
    idx = torch.randperm(n, generator=gen)[:samples] if n > samples else torch.arange(n)
    return idx, [f[idx] for f in rows]


def compare(ds, idx, rows) -> str:
    """'' when ``rows`` equal the per-sample reads at ``idx``, else why not."""
    for j, i in enumerate(idx.tolist()):
        item = ds[i]
        if len(item) != len(rows):
            return f"item {i}: {len(item)} fields per sample, {len(rows)} in the rows"
        for k, (a, b) in enumerate(zip(item, rows)):
            a = torch.as_tensor(a)
            if not torch.equal(a.to(b.dtype), b[j]):
                return f"item {i}, field {k}: per-sample {a.flatten()[:4].tolist()}, " \
                       f"rows {b[j].flatten()[:4].tolist()}"
    return ""


def check_benchmark(info, samples, gen):
    """All rows are gathered before any sample is read one by one, as in a run (a per-sample
    read fills lookups that a row reader could otherwise miss: the bug aac0819 fixed)."""
    views = []
    for name, stream in (("train", info.benchmark.train_stream),
                         ("test", info.benchmark.test_stream)):
        parts = [e.dataset for e in stream]
        sets = {f"{name}[{k}]": d for k, d in enumerate(parts)}
        sets[f"{name}[all, concatenated]"] = concat_datasets([d.train() for d in parts])
        for what, ds in sets.items():
            views += [(f"{what} ({g} group)", v) for g, v in (("train", ds.train()),
                                                               ("eval", ds.eval()))]
    gathered = [(what, v, sampled_rows(v, samples, gen)) for what, v in views]
    failures = [f"{what}: {why}" for what, v, got in gathered if got is not None
                for why in [compare(v, *got)] if why]
    return sum(got is not None for _, _, got in gathered), len(gathered), failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--seeds", default="0,2")
    ap.add_argument("--protocols", default=None, help="comma-separated; default: all")
    ap.add_argument("--skip-variants", default="",
                    help="comma-separated PROTOCOL/VARIANT already checked (a resumed check)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    names = args.protocols.split(",") if args.protocols else list(PROTOCOLS)
    seen, bad = {}, 0
    for name in names:
        proto = PROTOCOLS[name]
        for variant in proto["variants"]:
            if f"{name}/{variant}" in args.skip_variants.split(","):
                continue
            cfg = bench_cfg(proto, variant, args.data_root)
            for seed in [int(s) for s in args.seeds.split(",")]:
                key = repr(sorted(cfg.items())) + f"|{seed}"
                label = f"{name}/{variant} seed {seed}"
                if key in seen:
                    print(f"{label}: same benchmark as {seen[key]}")
                    continue
                seen[key] = label
                b = dict(cfg)
                bench_seed = b.pop("seed")
                try:
                    info = build_benchmark(**b, seed=seed if bench_seed is None else bench_seed)
                except (FileNotFoundError, OSError) as e:
                    print(f"{label}: skipped, its data is not here ({type(e).__name__})")
                    continue
                checked, total, failures = check_benchmark(info, args.samples, gen)
                bad += bool(failures)
                print(f"{label} ({cfg['name']}, {cfg['scenario']}): rows of {checked} of "
                      f"{total} datasets, "
                      + ("all rows equal" if not failures else f"{len(failures)} DIFFER"))
                for f in failures:
                    print("    " + f)
    print(f"{bad} benchmark(s) with differing rows")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
