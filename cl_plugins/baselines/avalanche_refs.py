"""Avalanche's own plugins and templates, registered as ``avalanche_<name>`` reference methods
(run only when named, side by side with ours in the same script).

Their defaults live here, in one file of their own, so that a result computed with one of them
depends on this file and not on the registry of our methods (``experiments/provenance_check.py``):
adding a method of ours does not make the reference rows stale.
"""

from __future__ import annotations

from cl_plugins.registry import ALL_SCENARIOS, MethodSpec, register


def _avalanche_online_ewc(ewc_lambda: float, decay_factor: float = 1.0):
    from avalanche.training.plugins import EWCPlugin

    return EWCPlugin(ewc_lambda=ewc_lambda, mode="online", decay_factor=decay_factor)


def _avalanche_icarl(*, model, optimizer, criterion=None, memory_size: int = 2000,
                     fixed_memory: bool = True, buffer_transform=None, **kwargs):
    """Avalanche's ICaRL template on the runner's ClassifierNet (backbone = feature extractor,
    head = classifier). It builds its own iCaRL loss, so the runner's criterion is dropped."""
    from avalanche.training import ICaRL

    return ICaRL(feature_extractor=model.backbone, classifier=model.head, optimizer=optimizer,
                 memory_size=memory_size, buffer_transform=buffer_transform,
                 fixed_memory=fixed_memory, **kwargs)


def register_avalanche_references() -> None:
    """Avalanche's own versions of methods we also implement, for side-by-side runs in the same
    script (``avalanche_<name>``). Arguments are Avalanche's, with Avalanche's meaning."""
    from avalanche.training import plugins as avl

    from cl_plugins.baselines.avalanche_cwr_star import AvalancheCWRStarPlugin
    from cl_plugins.baselines.avalanche_si import AvalancheSIPlugin

    refs = [
        ("avalanche_ewc", avl.EWCPlugin, {"ewc_lambda": 1.0, "mode": "separate"}),
        ("avalanche_online_ewc", _avalanche_online_ewc, {"ewc_lambda": 1.0, "decay_factor": 1.0}),
        # Avalanche's SI with its CPU snapshot aliasing worked around (else a no-op on CPU).
        ("avalanche_si", AvalancheSIPlugin, {"si_lambda": 1.0}),
        ("avalanche_mas", avl.MASPlugin, {"lambda_reg": 1.0, "alpha": 0.5}),
        ("avalanche_rwalk", avl.RWalkPlugin, {"ewc_lambda": 0.1, "ewc_alpha": 0.9, "delta_t": 10}),
        ("avalanche_lwf", avl.LwFPlugin, {"alpha": 1.0, "temperature": 2.0}),
        ("avalanche_er", avl.ReplayPlugin, {"mem_size": 500}),
        ("avalanche_gem", avl.GEMPlugin, {"patterns_per_experience": 256,
                                          "memory_strength": 0.5}),
        ("avalanche_agem", avl.AGEMPlugin, {"patterns_per_experience": 250,
                                            "sample_size": 256}),
        # Its buffer balances by class label only: task-IL labels restart at 0 in every task.
        ("avalanche_gdumb", avl.GDumbPlugin, {"mem_size": 4400}, ("class",)),
        ("avalanche_mir", avl.MIRPlugin, {"batch_size_mem": 10, "mem_size": 500,
                                          "subsample": 50}),
        # CWR* on the model's last Linear, bound to the model at its first hook; one head over
        # all classes: not task-IL (baselines/avalanche_cwr_star.py).
        ("avalanche_cwr_star", AvalancheCWRStarPlugin, {"cwr_layer_name": None,
                                                        "freeze_remaining_model": True},
         ("domain", "class")),
    ]
    register(MethodSpec("avalanche_icarl", "template", _avalanche_icarl, scenarios=("class",),
                        defaults={"memory_size": 2000, "fixed_memory": True}, reference=True,
                        paper="Avalanche 0.6's ICaRL template",
                        summary="reference: Avalanche's ICaRL strategy on the runner's backbone "
                                "and head"))
    from avalanche.training import DER

    # Avalanche's DER/DER++ owns its training loop (a SupervisedTemplate); class-balanced memory.
    register(MethodSpec("avalanche_der", "template", DER, defaults={"mem_size": 200, "alpha": 0.1,
                                                                    "beta": 0.5},
                        reference=True, paper="Avalanche 0.6's DER strategy",
                        summary="reference: Avalanche's DER/DER++ template (beta 0 gives DER)"))
    from avalanche.training import GenerativeReplay

    # Avalanche's deep generative replay: its own MlpVAE for 1x28x28 inputs (MNIST-shaped data
    # only), trained after each experience by a strategy of its own; no task labels.
    register(MethodSpec("avalanche_generative_replay", "template", GenerativeReplay,
                        scenarios=("domain", "class"), reference=True,
                        defaults={"replay_size": 100, "increasing_replay_size": False},
                        paper="Avalanche 0.6's GenerativeReplay strategy",
                        summary="reference: Avalanche's DGR template (its MlpVAE, 1x28x28)"))
    from cl_plugins.baselines.avalanche_pnn import avalanche_pnn

    # Avalanche's PNN model + PNNStrategy, columns sized from the runner's mlp (equal widths);
    # its eval-time column growth worked around (baselines/avalanche_pnn.py).
    register(MethodSpec("avalanche_pnn", "template", avalanche_pnn, scenarios=("task",),
                        needs_task_labels=True, defaults={"adapter": "mlp"}, reference=True,
                        paper="Avalanche 0.6's PNNStrategy and PNN model",
                        summary="reference: Avalanche's progressive network (MLP columns)"))
    for name, factory, defaults, *scenarios in refs:
        register(MethodSpec(name, "plugin", factory, defaults=defaults, reference=True,
                            scenarios=tuple(scenarios[0]) if scenarios else ALL_SCENARIOS,
                            paper=f"Avalanche 0.6's {getattr(factory, '__name__', name)}",
                            summary="reference: Avalanche's own implementation, run side by side"))
