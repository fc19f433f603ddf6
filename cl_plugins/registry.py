"""Method registry: name -> class, defaults, supported scenarios, sweep space.

The experiment runner, ``cl-run --list``, the README's method table and the sweep-file tests all
read this one table. A method is either an Avalanche *template* (it owns the training loop:
naive, joint, cumulative) or a *plugin* added to the template's plugin list.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from cl_plugins.core.checks import unknown_name_error

ALL_SCENARIOS = ("task", "domain", "class")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # "template" | "plugin"
    factory: Callable[..., Any]
    scenarios: Tuple[str, ...] = ALL_SCENARIOS
    needs_task_labels: bool = False
    defaults: Dict[str, Any] = field(default_factory=dict)
    sweep: Dict[str, Any] = field(default_factory=dict)  # wandb parameter space, by param name
    trains_on_stream: bool = False  # joint: one training call on the whole stream
    reference: bool = False  # another library's version, run only when named (not in "all")
    paper: str = ""
    summary: str = ""

    @classmethod
    def from_plugin(cls, plugin_cls) -> "MethodSpec":
        """A plugin declares its registry entry as class attributes (Mammoth-style header):
        ``METHOD_NAME``, ``SCENARIOS``, ``NEEDS_TASK_LABELS``, ``SWEEP`` (wandb parameter
        space, by parameter name), ``PAPER``, ``SUMMARY``. Its hyper-parameters and their
        defaults (the paper protocol's) are its ``__init__`` signature: nothing repeats them."""
        return cls(name=plugin_cls.METHOD_NAME, kind="plugin", factory=plugin_cls,
                   scenarios=tuple(plugin_cls.SCENARIOS),
                   needs_task_labels=getattr(plugin_cls, "NEEDS_TASK_LABELS", False),
                   defaults=signature_defaults(plugin_cls),
                   sweep=dict(getattr(plugin_cls, "SWEEP", {})),
                   paper=plugin_cls.PAPER, summary=plugin_cls.SUMMARY)

    def check_scenario(self, scenario: str) -> None:
        if scenario in self.scenarios:
            return
        if self.needs_task_labels and scenario != "task":
            raise ValueError(f"Method {self.name!r} needs task labels at training and test time, "
                             f"so it cannot run in {scenario}-IL; use benchmark.scenario=task.")
        raise ValueError(f"Method {self.name!r} supports the scenarios {list(self.scenarios)}; "
                         f"got {scenario!r}.")


def signature_defaults(plugin_cls) -> Dict[str, Any]:
    """``{name: default}`` for every hyper-parameter of ``plugin_cls.__init__``: the single place
    a plugin declares its hyper-parameters. A parameter without a default is an error, since the
    runner must be able to build every method from its name alone."""
    out = {}
    for name, param in inspect.signature(plugin_cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is param.empty:
            raise TypeError(f"{plugin_cls.__name__}.__init__ parameter {name!r} has no default; "
                            "every registered plugin's hyper-parameter needs one")
        out[name] = param.default
    return out


_REGISTRY: Dict[str, MethodSpec] = {}

# Plugin methods, as "module:Class"; each class carries its own registry header.
PLUGIN_CLASSES = [
    "cl_plugins.baselines.ensemble:EnsemblePlugin",
    "cl_plugins.regularization.ewc:EWCPlugin",
    "cl_plugins.regularization.online_ewc:OnlineEWCPlugin",
    "cl_plugins.regularization.lwf:LwFPlugin",
    "cl_plugins.regularization.scp:SCPPlugin",
    "cl_plugins.regularization.si:SIPlugin",
    "cl_plugins.regularization.mas:MASPlugin",
    "cl_plugins.regularization.rwalk:RWalkPlugin",
    "cl_plugins.projection.nscl:NSCLPlugin",
    "cl_plugins.projection.ogd:OGDPlugin",
    "cl_plugins.projection.gpm:GPMPlugin",
    "cl_plugins.projection.rgo:RGOPlugin",
    "cl_plugins.replay.er:ERPlugin",
    "cl_plugins.replay.der:DERPlugin",
    "cl_plugins.replay.gdumb:GDumbPlugin",
    "cl_plugins.replay.mir:MIRPlugin",
    "cl_plugins.replay.icarl:ICaRLPlugin",
    "cl_plugins.replay.gem:GEMPlugin",
    "cl_plugins.replay.agem:AGEMPlugin",
    "cl_plugins.distillation.podnet:PODNetPlugin",
    "cl_plugins.distillation.hints:HintsPlugin",
    "cl_plugins.distillation.attention_kd:AttentionKDPlugin",
    "cl_plugins.distillation.subspace_kd:SubspaceKDPlugin",
    "cl_plugins.distillation.erg_kd:ERGKDPlugin",
    "cl_plugins.distillation.nst:NSTPlugin",
    "cl_plugins.distillation.relational_kd:RelationalKDPlugin",
    "cl_plugins.replay.latent_replay:LatentReplayPlugin",
    "cl_plugins.replay.exstream:ExStreamPlugin",
    "cl_plugins.hybrid.pnc:ProgressCompressPlugin",
    "cl_plugins.hybrid.ar1:AR1Plugin",
    "cl_plugins.generative.generative_replay:GenerativeReplayPlugin",
    "cl_plugins.generative.negative_replay:NegativeReplayPlugin",
    "cl_plugins.architectural.multihead:MultiHeadPlugin",
    "cl_plugins.architectural.cwr:CWRPlugin",
    "cl_plugins.architectural.packnet:PackNetPlugin",
    "cl_plugins.architectural.piggyback:PiggybackPlugin",
    "cl_plugins.architectural.hat:HATPlugin",
    "cl_plugins.architectural.supsup:SupSupPlugin",
    "cl_plugins.architectural.pnn:PNNPlugin",
    "cl_plugins.architectural.hypernet:HypernetPlugin",
]

# Other libraries' versions kept in a file of their own (run only when named), with the same
# class-attribute header; the rest of Avalanche's references are in baselines/avalanche_refs.py.
REFERENCE_CLASSES = [
    "cl_plugins.baselines.avalanche_feature_distill:AvalancheFeatureDistillation",
    "cl_plugins.baselines.avalanche_packnet:AvalanchePackNet",
]


def register(spec: MethodSpec) -> MethodSpec:
    if spec.kind not in ("template", "plugin"):
        raise ValueError(f"MethodSpec.kind must be 'template' or 'plugin'; got {spec.kind!r}")
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    _load_builtin()
    if name not in _REGISTRY:
        raise unknown_name_error("method", name, _REGISTRY)
    return _REGISTRY[name]


def list_methods(scenario: Optional[str] = None) -> List[MethodSpec]:
    _load_builtin()
    specs = sorted(_REGISTRY.values(), key=lambda s: s.name)
    return [s for s in specs if scenario is None or scenario in s.scenarios]


_loaded = False


def _load_builtin() -> None:
    """Register the built-in methods once (lazily, so importing the registry stays cheap)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from avalanche.training import Cumulative, JointTraining, Naive

    import importlib

    register(MethodSpec(
        "naive", "template", Naive, paper="fine-tuning (lower bound)",
        summary="plain fine-tuning on each experience in turn"))
    register(MethodSpec(
        "joint", "template", JointTraining, trains_on_stream=True,
        paper="offline training on all experiences (upper bound)",
        summary="one training run on the concatenation of the whole stream"))
    register(MethodSpec(
        "cumulative", "template", Cumulative, paper="retraining on all data seen so far",
        summary="at experience t, trains on the union of experiences 0..t"))
    for path in PLUGIN_CLASSES:
        module, cls = path.split(":")
        register(MethodSpec.from_plugin(getattr(importlib.import_module(module), cls)))
    for path in REFERENCE_CLASSES:
        module, cls = path.split(":")
        spec = MethodSpec.from_plugin(getattr(importlib.import_module(module), cls))
        register(dataclasses.replace(spec, reference=True))
    from cl_plugins.baselines.avalanche_refs import register_avalanche_references

    register_avalanche_references()
