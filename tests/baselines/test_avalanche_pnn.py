"""Avalanche's PNNStrategy as the reference template ``avalanche_pnn``: it learns every task under
the runner's whole-stream evaluation (the eval-time growth of Avalanche's PNNLayer would freeze
the later columns before they train), answers tasks never trained, and is built from the MLP."""

from __future__ import annotations

import pytest
import torch
from avalanche.models import PNN

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import build_model
from cl_plugins.registry import get_method


def test_every_task_learns_under_the_runners_evaluation(digits_cfg):
    digits_cfg["methods"] = ["avalanche_pnn"]
    digits_cfg["strategy"]["epochs"] = 3
    (run,) = run_experiment(digits_cfg, echo=lambda *a: None)
    assert run["status"] == "finished", run.get("error")
    final = run["matrix"][-1]
    assert len(final) == 5 and min(final) > 0.85, final  # the future tasks were evaluated too
    assert run["matrix"][-1][:4] == [row[i] for i, row in enumerate(run["matrix"][:4])]


def test_the_factory_sizes_avalanches_pnn_from_the_mlp():
    spec = get_method("avalanche_pnn")
    assert spec.reference and spec.kind == "template" and spec.scenarios == ("task",)
    info = build_benchmark("split_digits", "task")
    model = build_model({"name": "mlp", "hidden": [12, 12]}, info)
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    st = spec.factory(model=model, optimizer=opt, train_mb_size=8, **spec.defaults)
    assert isinstance(st.model, PNN) and st.model.num_layers == 2
    assert st.model.in_features == 64 and st.model.out_features_per_columns == 12
    assert type(st.optimizer) is torch.optim.Adam and st.optimizer.param_groups[0]["lr"] == 0.003
    bad = build_model({"name": "mlp", "hidden": [12, 8]}, info)
    with pytest.raises(ValueError, match=r"equal hidden widths.*\[12, 8\]"):
        spec.factory(model=bad, optimizer=opt)
    conv = build_model({"name": "lenet"}, build_benchmark("split_digits", "task", pad_to_32=True))
    with pytest.raises(ValueError, match="from an 'mlp' backbone; got LeNet"):
        spec.factory(model=conv, optimizer=opt)
