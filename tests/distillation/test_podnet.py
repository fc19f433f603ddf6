"""PODNet: the training loss by hand (NCA + adaptive POD terms on the right taps), the memory and
training set, imprinting and frozen old proxies, CBF touching only the proxies, NME inference,
model errors, less forgetting than naive on split_digits, and the CIFAR-100 config end to end on
tiny files in the real format."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.exemplars import nme_scores
from cl_plugins.core.pod import pod_flat, pod_spatial
from cl_plugins.distillation.podnet import PODNetPlugin
from cl_plugins.models import build_model
from cl_plugins.models.lsc_head import kmeans, nca_loss

from helpers import REPO, param_copies


class Recorder(SupervisedPlugin):
    """Calls ``fn(hook, strategy)`` at the hooks it is given."""

    def __init__(self, fn, hooks):
        super().__init__()
        self.fn = fn
        for h in hooks:
            setattr(self, h, lambda strategy, _h=h, **kw: self.fn(_h, strategy))


def _strategy(plugins, model_cfg=None, lr=0.05, seed=0, epochs=1):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", "class", pad_to_32=True)
    model = build_model(model_cfg or {"name": "lenet", "head": "lsc", "proxies": 3}, info)
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
               train_mb_size=32, train_epochs=epochs, eval_mb_size=256, device="cpu",
               plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    return st, info


def _stream(info):
    return info.benchmark.train_stream


# ---------------------------------------------------------------------------- arguments, model
@pytest.mark.parametrize("kwargs, match", [
    ({"lambda_spatial": -1.0}, "lambda_spatial"), ({"lambda_flat": -0.1}, "lambda_flat"),
    ({"mem_per_class": 0}, "mem_per_class"), ({"classifier": "knn"}, "classifier"),
    ({"cbf_epochs": -1}, "cbf_epochs"), ({"stages": []}, "stages"), ({"imprint": 1}, "imprint"),
    ({"nca_margin": -0.5}, "nca_margin"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PODNetPlugin(**kwargs)


@pytest.mark.parametrize("model_cfg, stages, match", [
    ({"name": "lenet"}, None, "needs the local-similarity classifier at model.head.*MaskedHead"),
    ({"name": "mlp", "hidden": [8], "head": "lsc"}, None, "MLP has no convolutional stage"),
    ({"name": "lenet", "head": "lsc"}, ["backbone.fc1"],
     r"stage 'backbone.fc1' gives features of shape \(32, 120\).*backbone.conv1"),
    ({"name": "lenet", "head": "lsc"}, ["backbone.conv9"], "no module named.*backbone.conv9"),
])
def test_unusable_models_fail_before_any_update(model_cfg, stages, match):
    plugin = PODNetPlugin(stages=stages)
    st, info = _strategy([plugin], model_cfg)
    before = param_copies(st.model)
    with pytest.raises(ValueError, match=match):
        st.train(_stream(info)[0])
    assert all(torch.equal(p, before[n]) for n, p in st.model.named_parameters())


# ---------------------------------------------------------------------------- the loss by hand
def test_training_loss_is_nca_plus_the_adaptive_pod_terms_on_the_stage_taps():
    seen = {}

    def check(hook, st):
        if hook == "before_training_exp":
            seen["n_train"] = len(st.adapted_dataset)
            return
        if st.clock.train_exp_counter != 1 or "loss" in seen:
            return
        model, teacher = st.model, plugin.teacher
        feats = {}
        hooks = [m.get_submodule(n).register_forward_hook(
            lambda mod, i, o, key=(tag, n): feats.__setitem__(key, o.detach()))
            for tag, m in (("s", model), ("t", teacher))
            for n in ("backbone.conv1", "backbone.conv2", "backbone")]
        with torch.no_grad():
            out = model(st.mb_x)
            teacher(st.mb_x)
        for h in hooks:
            h.remove()
        spatial = pod_spatial([feats["s", "backbone.conv1"], feats["s", "backbone.conv2"]],
                              [feats["t", "backbone.conv1"], feats["t", "backbone.conv2"]])
        flat = pod_flat(feats["s", "backbone"], feats["t", "backbone"])
        factor = math.sqrt(4 / 2)  # 4 classes seen, 2 of them new
        seen["want"] = float(nca_loss(out, st.mb_y) + factor * (3.0 * spatial + 0.5 * flat))
        seen["loss"] = float(st.loss.detach())

    plugin = PODNetPlugin(lambda_spatial=3.0, lambda_flat=0.5, mem_per_class=7, cbf_epochs=0)
    st, info = _strategy([plugin, Recorder(check, ["before_backward", "before_training_exp"])])
    st.train(_stream(info)[0])
    st.train(_stream(info)[1])
    assert seen["loss"] == pytest.approx(seen["want"], rel=1e-5)
    # the training set of experience 1: its own data + 7 exemplars of each of the 2 old classes
    assert seen["n_train"] == len(_stream(info)[1].dataset) + 2 * 7
    assert sorted(plugin.memory.buffer.class_counts().items()) == [(c, 7) for c in range(4)]


def test_imprinted_new_proxies_and_frozen_old_ones():
    seen = {}

    def record(hook, st):
        if st.clock.train_exp_counter == 1 and "start" not in seen:
            seen["start"] = st.model.head.proxies.detach().clone()

    plugin = PODNetPlugin(mem_per_class=5, cbf_epochs=0)
    st, info = _strategy([plugin, Recorder(record, ["before_training_epoch"])])
    st.train(_stream(info)[0])
    after0 = st.model.head.proxies.detach().clone().view(10, 3, -1)
    model = copy.deepcopy(st.model).eval()
    ds = _stream(info)[1].dataset.eval()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    with torch.no_grad():
        f = F.normalize(model.backbone(x), dim=1)
    norm = after0[:2].norm(dim=2).mean()
    st.train(_stream(info)[1])
    start, end = seen["start"].view(10, 3, -1), st.model.head.proxies.detach().view(10, 3, -1)
    for c in (2, 3):
        assert torch.allclose(start[c], kmeans(f[y == c], 3) * norm, atol=1e-6)
        assert not torch.allclose(end[c], start[c])  # trained
    assert torch.equal(end[:2], after0[:2])  # old classes frozen (plain SGD, no weight decay)


def test_cbf_changes_only_the_proxies_and_lowers_their_loss_on_the_memory():
    snap = {}

    def before_podnet(hook, st):
        if st.clock.train_exp_counter == 1:
            snap["state"] = copy.deepcopy(st.model.state_dict())

    plugin = PODNetPlugin(mem_per_class=5, cbf_epochs=3, cbf_lr=0.05)
    model_cfg = {"name": "resnet32", "nf": 2, "head": "lsc", "proxies": 2}  # BatchNorm too
    st, info = _strategy([Recorder(before_podnet, ["after_training_exp"]), plugin], model_cfg)
    st.train(_stream(info)[0])
    st.train(_stream(info)[1])
    after = st.model.state_dict()
    changed = [k for k, v in snap["state"].items() if not torch.equal(v, after[k])]
    assert changed == ["head.proxies", "head.frozen"]  # frozen: the old classes, then none
    assert not after["head.frozen"].any() and snap["state"]["head.frozen"].sum() == 2
    mem = plugin.memory.buffer.get(torch.arange(len(plugin.memory.buffer)), "cpu")
    model = copy.deepcopy(st.model).eval()
    with torch.no_grad():
        f = model.backbone(mem.x)
        new = float(nca_loss(model.head(f), mem.y))
        model.load_state_dict(snap["state"])
        old = float(nca_loss(model.head(f), mem.y))
    assert new < old


def test_nme_classifier_scores_by_exemplar_means():
    outs = []

    def record(hook, st):
        outs.append((st.mb_x.clone(), st.mb_output.clone()))

    plugin = PODNetPlugin(mem_per_class=6, classifier="nme")
    st, info = _strategy([plugin, Recorder(record, ["after_eval_forward"])])
    st.train(_stream(info)[0])
    st.eval([info.benchmark.test_stream[0]])
    x, out = outs[-1]
    with torch.no_grad():
        f = st.model.eval().backbone(x)
    means = plugin.memory.class_means
    assert plugin.memory.mean_classes == [0, 1] and means.shape[0] == 2
    assert torch.allclose(out, nme_scores(f, means, [0, 1], 10).to(out.dtype))
    cnn = PODNetPlugin(mem_per_class=6)  # the LSC's own logits
    st2, _ = _strategy([cnn, Recorder(record, ["after_eval_forward"])])
    st2.train(_stream(info)[0])
    st2.eval([info.benchmark.test_stream[0]])
    x, out = outs[-1]
    with torch.no_grad():
        assert torch.equal(out, st2.model.eval()(x))


def test_state_refuses_other_settings():
    plugin = PODNetPlugin(mem_per_class=4, cbf_epochs=0)
    st, info = _strategy([plugin])
    st.train(_stream(info)[0])
    state = plugin.state_dict()
    assert state["extra"]["memory"]["buffer"]["capacity"] >= 8
    fresh = PODNetPlugin(mem_per_class=4, cbf_epochs=0)
    fresh.load_state_dict(state)
    assert fresh.memory.seen_classes == [0, 1] and len(fresh.memory.buffer) == 8
    with pytest.raises(ValueError, match="lambda_spatial"):
        PODNetPlugin(lambda_spatial=5.0, mem_per_class=4, cbf_epochs=0).load_state_dict(state)


# ---------------------------------------------------------------------------- end to end
def test_less_forgetting_than_naive_on_split_digits(digits_cfg):
    from cl_plugins.experiment.config import validate
    from cl_plugins.experiment.runner import run_experiment

    cfg = copy.deepcopy(digits_cfg)
    cfg["benchmark"].update(scenario="class", pad_to_32=True)
    cfg["model"] = {"name": "lenet"}
    cfg["strategy"]["epochs"] = 1  # Adam 1e-3: naive ACC 0.15, BWT -0.52; PODNet 0.59, -0.40
    cfg["methods"] = ["naive", {"name": "podnet", "model": {"head": "lsc"},
                                "params": {"mem_per_class": 10, "cbf_epochs": 5}}]
    runs = {r["method"]: r for r in run_experiment(validate(cfg), echo=lambda *a: None)}
    naive, pod = runs["naive"]["summary"], runs["podnet"]["summary"]
    assert runs["podnet"]["status"] == "finished"
    assert pod["acc"] > naive["acc"] + 0.3 and pod["bwt"] > naive["bwt"] + 0.05


@pytest.mark.slow
def test_cifar100_config_runs_on_tiny_real_format_files(tmp_path):
    import importlib.util

    from cl_plugins.experiment.config import load_config

    spec = importlib.util.spec_from_file_location(
        "smoke_gpu_configs", REPO / "experiments" / "smoke_gpu_configs.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    name = "douillard2020_podnet_cifar100"
    cfg = load_config(REPO / "experiments" / "configs" / f"{name}.yaml")
    assert cfg["benchmark"]["first_exp_classes"] == 50 and cfg["benchmark"]["n_experiences"] == 11
    (run,) = smoke.smoke_config(name, tmp_path)  # 2 training images per class, 1 epoch
    assert run["status"] == "finished", run.get("error")
    assert len(run["matrix"]) == 11 and all(len(row) == 11 for row in run["matrix"])
    # 100 images, then 10 new + 2 exemplars of each class seen before, in batches of 128
    sizes = [100] + [10 + 2 * (50 + 5 * (t - 1)) for t in range(1, 11)]
    assert run["steps_per_exp"] == [math.ceil(n / 128) for n in sizes]
    assert run["benchmark"]["classes_per_exp"][0] == list(range(50))
