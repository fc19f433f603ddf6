"""Latent replay and ExStream against ER at the same memory in bytes, split_digits class-IL,
through the runner (cl_plugins.experiment.runner.run_experiment).

The two plugins are registered here at run time (registry.register) until they are listed in
registry.PLUGIN_CLASSES. Model: MLP 64-64 (``ClassifierNet``), split after the first hidden
layer's ReLU (``backbone.layers.1``), so the second hidden layer and the head learn on replayed
rows. Memory: ER 300 samples = 300 x (64 x 4 + 16) = 81,600 bytes; latent replay
``mem_bytes=81600`` (64-unit activations: 272 bytes a slot, 300 slots); ExStream 30 clusters a
class (``capacity_for_bytes(81600, 10, 64)``: 10 x (30 x 264 + 16) = 79,360 bytes).

    python experiments/checks/same_bytes_latent_exstream.py OUT_DIR [EPOCHS] [SEEDS...]
    python experiments/checks/same_bytes_latent_exstream.py OUT_DIR EPOCHS SEEDS... --variants

``--variants`` runs, at the same bytes, latent replay replaying 128 rows a step and with
``lower_lr_scale=0.1``, both methods split at ``backbone`` (the head alone above), and ExStream
replaying 32 centroids a step (both ExStream variants with ``training="joint_step"``, the
rule of the table they were measured for in docs/methods/exstream.md). Prints, per method, the mean over seeds of the final average
accuracy and BWT, and each seed's.
"""
import copy
import sys

import torch

from cl_plugins import registry
from cl_plugins.experiment.config import DEFAULT_CONFIG
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.replay.exstream import ExStreamPlugin
from cl_plugins.replay.latent_replay import LatentReplayPlugin

torch.set_num_threads(1)
variants = "--variants" in sys.argv
args = [a for a in sys.argv[1:] if a != "--variants"]
out = args[0]
epochs = int(args[1]) if len(args) > 1 else 5
seeds = [int(s) for s in args[2:]] or [0, 1, 2]
registry.list_methods()
for cls in (LatentReplayPlugin, ExStreamPlugin):
    if cls.METHOD_NAME not in registry._REGISTRY:
        registry.register(registry.MethodSpec.from_plugin(cls))

cfg = copy.deepcopy(DEFAULT_CONFIG)
cfg.update(name="same_bytes", output_dir=out, seeds=seeds)
cfg["benchmark"]["scenario"] = "class"
cfg["model"] = {"name": "mlp", "hidden": [64, 64]}
cfg["strategy"].update(epochs=epochs, device="cpu")
cfg["loggers"].update(progress=False, plots=False)
cfg["methods"] = [
    "naive",
    {"name": "er", "params": {"mem_size": 300}},
    {"name": "latent_replay", "params": {"layer": "backbone.layers.1", "mem_size": None,
                                         "mem_bytes": 81600}},
    {"name": "exstream", "params": {"layer": "backbone.layers.1", "mem_per_class": 30}},
]
if variants:
    lat = {"layer": "backbone.layers.1", "mem_size": None, "mem_bytes": 81600}
    cfg["methods"] = [
        {"name": "latent_replay", "label": "lr_m128", "params": {**lat, "replay_mb_size": 128}},
        {"name": "latent_replay", "label": "lr_scale0.1", "params": {**lat,
                                                                    "lower_lr_scale": 0.1}},
        {"name": "latent_replay", "label": "lr_backbone", "params": {**lat, "layer": "backbone"}},
        {"name": "exstream", "label": "ex_backbone", "params": {"layer": "backbone",
                                                                "mem_per_class": 30,
                                                                "training": "joint_step"}},
        {"name": "exstream", "label": "ex_m32", "params": {"layer": "backbone.layers.1",
                                                           "mem_per_class": 30,
                                                           "replay_mb_size": 32,
                                                           "training": "joint_step"}},
    ]
results = run_experiment(cfg, echo=lambda *a: None)
rows = {}
for k, r in enumerate(results):
    assert r["status"] == "finished", r.get("error")
    entry = cfg["methods"][k // len(seeds)]
    name = entry if isinstance(entry, str) else f"{entry['name']} {entry.get('params', {})}"
    rows.setdefault(name, []).append((r["seed"], r["summary"]["acc"], r["summary"]["bwt"]))
for method, rs in rows.items():
    acc = sum(a for _, a, _ in rs) / len(rs)
    bwt = sum(b for _, _, b in rs) / len(rs)
    print(f"{method}\n    ACC {acc:.3f} BWT {bwt:+.3f}  " +
          "  ".join(f"s{s}: {a:.3f}/{b:+.3f}" for s, a, b in rs))
