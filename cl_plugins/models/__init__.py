"""Models: backbones (no output layer), heads, and ``build_model`` for the experiment runner."""

from __future__ import annotations

import inspect
from typing import Any, Dict

from avalanche.models import MultiHeadClassifier
from torch import nn

from cl_plugins.core.checks import check_choice, unknown_name_error

from .alexnet import AlexNet5
from .classifier import ClassifierNet
from .fel import FeatureEncodingLayer
from .fel_mlp import FELMLP
from .heads import MaskedHead
from .lenet import LeNet
from .lsc_head import LSCHead
from .mlp import MLP
from .preact_resnet import PreActResNet18
from .reduced_resnet import ReducedResNet18
from .resnet18_nobn import ResNet18NoBN
from .resnet32 import ResNet32

BACKBONES = {"mlp": MLP, "preact_resnet18": PreActResNet18, "reduced_resnet18": ReducedResNet18,
             "alexnet5": AlexNet5, "lenet": LeNet, "fel_mlp": FELMLP,
             "resnet18_nobn": ResNet18NoBN, "resnet32": ResNet32}
HEADS = ("auto", "multihead", "linear", "masked", "lsc")


def build_backbone(name: str, input_shape, **kwargs) -> nn.Module:
    if name not in BACKBONES:
        raise unknown_name_error("model", name, BACKBONES)
    c, h, w = input_shape
    if name in ("mlp", "fel_mlp"):
        kwargs.setdefault("input_size", c * h * w)
    else:
        kwargs.setdefault("in_channels", c)
        if name in ("alexnet5", "lenet"):
            kwargs.setdefault("input_size", h)
    params = inspect.signature(BACKBONES[name]).parameters
    if not any(q.kind is q.VAR_KEYWORD for q in params.values()):
        unknown = sorted(k for k in kwargs if k not in params)
        if unknown:
            raise ValueError(f"model.{unknown[0]}: model {name!r} has no such key; its keys: "
                             f"{', '.join(sorted(params))} (and name, head, mask, head_bias, "
                             "proxies)")
    return BACKBONES[name](**kwargs)


def build_model(model_cfg: Dict[str, Any], info) -> ClassifierNet:
    """Build backbone + head for a ``BenchmarkInfo``.

    ``head``: ``auto`` picks ``multihead`` for task-IL, ``linear`` for domain-IL and ``masked``
    (unseen classes masked) for class-IL. ``mask`` sets MaskedHead's mask (default ``seen``;
    ``task`` gives task-IL through one shared head). ``head_bias`` sets the head's bias.
    ``lsc``: PODNet's multi-proxy cosine head (``LSCHead``, ``proxies`` per class, default 10).
    """
    cfg = dict(model_cfg)
    name = cfg.pop("name", "mlp")
    head = check_choice("model.head", cfg.pop("head", "auto"), HEADS)
    mask = cfg.pop("mask", "seen")
    head_bias = cfg.pop("head_bias", True)
    proxies = cfg.pop("proxies", None)
    if proxies is not None and head != "lsc":
        raise ValueError(f"model.proxies is an option of head 'lsc'; got head {head!r}")
    backbone = build_backbone(name, info.input_shape, **cfg)
    if head == "auto":
        head = {"task": "multihead", "domain": "linear", "class": "masked"}[info.scenario]
    if head == "multihead":
        if not info.task_labels:
            raise ValueError(f"model.head='multihead' needs task labels, but the scenario is "
                             f"{info.scenario}-IL; use 'linear' or 'masked'")
        # No masking: each head has exactly its task's classes (labels restart at 0 per task).
        out = MultiHeadClassifier(backbone.out_features, initial_out_features=info.n_outputs,
                                  masking=False)
        if not head_bias:
            raise ValueError("model.head_bias=False is not supported with the multihead head")
    elif head == "linear":
        out = nn.Linear(backbone.out_features, info.n_outputs, bias=head_bias)
    elif head == "lsc":
        out = LSCHead(backbone.out_features, info.n_outputs, proxies=10 if proxies is None
                      else proxies)
    else:
        out = MaskedHead(backbone.out_features, info.n_outputs, mask=mask, bias=head_bias)
    net = ClassifierNet(backbone, out)
    if hasattr(backbone, "set_task_labels"):
        # Backbones with feature encoding layers (fel_mlp, resnet18_nobn) need the task labels,
        # which ClassifierNet only gives its head: route them to the backbone too.
        if getattr(backbone, "fel", False) and not info.task_labels:
            raise ValueError(f"model {name!r} with fel=true needs task labels (task-IL), but the "
                             f"scenario is {info.scenario}-IL where every task label is 0; use "
                             "benchmark.scenario=task or model.fel=false")
        FeatureEncodingLayer.route_task_labels(net)
    return net


__all__ = ["AlexNet5", "BACKBONES", "ClassifierNet", "FELMLP", "FeatureEncodingLayer", "LSCHead",
           "LeNet", "MLP", "MaskedHead", "PreActResNet18", "ReducedResNet18", "ResNet18NoBN",
           "ResNet32", "build_backbone", "build_model"]
