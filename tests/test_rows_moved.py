"""experiments/rows_moved.py: which RESULTS.md rows changed between two tables."""

from __future__ import annotations

import importlib.util

from helpers import REPO


def _load():
    spec = importlib.util.spec_from_file_location("rows_moved", REPO / "experiments" / "rows_moved.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HEAD = ("| protocol | method | benchmark | scenario | ours ACC | seeds | code |\n"
        "|---|---|---|---|---|---|---|\n")


def _table(*rows):
    return "intro\n\n" + HEAD + "".join("| " + " | ".join(r) + " |\n" for r in rows) + "\nafter\n"


def test_rows_are_matched_by_key_and_sorted_by_the_size_of_the_move():
    rm = _load()
    old = rm.parse_rows(_table(
        ("S2", "ewc", "split_mnist", "task-IL", "99.42 ± 0.27", "0,1,2", "**stale**: x"),
        ("S2", "si", "split_mnist", "task-IL", "99.42 ± 0.04", "0,1,2", "current"),
        ("S2", "naive", "split_mnist", "task-IL", "89.37 ± 3.40", "0,1,2", "current"),
        ("S2", "gone", "split_mnist", "task-IL", "50.00 ± 0.00", "0", "current")))
    new = rm.parse_rows(_table(
        ("S2", "ewc", "split_mnist", "task-IL", "99.13 ± 0.98", "2,3", "current"),
        ("S2", "si", "split_mnist", "task-IL", "99.42 ± 0.04", "0,1,2", "current"),
        ("S2", "naive", "split_mnist", "task-IL", "84.26 ± 5.01", "2,3", "**stale**: y"),
        ("S2", "joint", "split_mnist", "task-IL", "99.67 ± 0.13", "2,3", "current")))
    assert len(old) == 4 and old[("S2", "si", "split_mnist", "task-IL")]["seeds"] == "0,1,2"
    moved, unchanged = rm.compare(old, new)
    assert unchanged == 1                                   # SI: same ACC and seeds
    assert [(m[0][1], m[3], m[6]) for m in moved] == [
        ("naive", -5.11, "stale"), ("ewc", -0.29, "current"),
        ("gone", None, "gone"), ("joint", None, "current")]
    moved, unchanged = rm.compare(old, new, current_only=True)
    assert [m[0][1] for m in moved] == ["ewc", "joint"] and unchanged == 1


def test_a_same_mean_on_other_seeds_is_a_change():
    rm = _load()
    row = ("P1", "gpm", "permuted_mnist", "domain-IL", "93.00 ± 0.10", "0,1,2", "current")
    moved, unchanged = rm.compare(rm.parse_rows(_table(row)),
                                  rm.parse_rows(_table(row[:5] + ("0,1,2,3,4", "current"))))
    assert unchanged == 0 and moved[0][3] == 0.0 and moved[0][5] == "0,1,2,3,4"
