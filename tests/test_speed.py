"""experiments/speed.py measures what the runner would run: the iteration budget and the config's
method_params apply (before 2026-12-05 both were ignored)."""

import sys
from pathlib import Path

import pytest

from cl_plugins.experiment.config import load_config, normalize_methods

REPO = Path(__file__).resolve().parent.parent


def _speed():
    sys.path.insert(0, str(REPO / "experiments"))
    import speed

    return speed


def _cfg(**method_params):
    cfg = load_config(None)
    cfg["model"]["hidden"] = [16]
    cfg["strategy"].update(epochs=1, train_mb_size=64, train_iterations=None)
    cfg["method_params"] = method_params
    return cfg


def test_the_iteration_budget_and_method_params_reach_the_measured_plugin():
    speed = _speed()
    entry = normalize_methods(["avalanche_packnet"])[0]
    # one epoch (about 6 steps of 64 on a split_digits task): Avalanche's PackNet refuses it
    with pytest.raises(ValueError, match="post_prune_epochs=2 must be below"):
        speed.measure(_cfg(avalanche_packnet={"post_prune_epochs": 2}), entry, 2)
    # 20 steps are 4 epochs here: the budget sets the epochs, method_params the post-prune count
    cfg = _cfg(avalanche_packnet={"post_prune_epochs": 2})
    cfg["strategy"]["train_iterations"] = 20
    step, *_ = speed.measure(cfg, entry, 2)
    assert step > 0
    # without method_params the plugin's default (10 post-prune epochs) is refused again
    cfg["method_params"] = {}
    with pytest.raises(ValueError, match="post_prune_epochs=10 must be below"):
        speed.measure(cfg, entry, 2)


def test_the_budget_stops_each_experience_after_exactly_its_steps(monkeypatch):
    speed = _speed()
    seen = []
    real = speed._Clock.after_training_iteration

    def count(self, strategy, **kw):
        if self.role == "last":
            seen.append(strategy.experience.current_experience)
        return real(self, strategy, **kw)

    monkeypatch.setattr(speed._Clock, "after_training_iteration", count)
    cfg = _cfg()
    cfg["strategy"]["train_iterations"] = 9
    speed.measure(cfg, normalize_methods(["naive"])[0], 2)
    assert [seen.count(e) for e in (0, 1)] == [9, 9]


def test_state_bytes_count_what_the_plugin_keeps():
    """The state column: ER with 100 slots of 64-pixel split_digits rows holds at least those
    rows in float32 (and less than twice that); naive holds nothing (no plugin)."""
    speed = _speed()
    cfg = _cfg(er={"mem_size": 100})
    cfg["strategy"]["train_iterations"] = 7
    *_, state = speed.measure(cfg, normalize_methods(["er"])[0], 2)
    assert 100 * 64 * 4 <= state < 2 * 100 * 64 * 4 + 10_000
    *_, none = speed.measure(cfg, normalize_methods(["naive"])[0], 2)
    assert none is None
