"""The registry reads each plugin's hyper-parameters from one place: its signature."""

import inspect
import re
from pathlib import Path

import pytest

from cl_plugins.registry import list_methods, signature_defaults


def _plugins():
    return [s for s in list_methods() if s.kind == "plugin" and not s.reference]


def test_defaults_are_the_signature():
    for spec in _plugins():
        sig = inspect.signature(spec.factory.__init__).parameters
        assert spec.defaults == {n: p.default for n, p in sig.items() if n != "self"}, spec.name
        assert set(spec.sweep) <= set(spec.defaults), spec.name
        assert not hasattr(spec.factory, "DEFAULTS"), f"{spec.name}: a second copy of defaults"
        spec.factory(**spec.defaults)  # the declared defaults are valid


def test_a_parameter_without_default_is_refused():
    class NoDefault:
        def __init__(self, lam, mode="a"):
            pass

    with pytest.raises(TypeError, match="'lam' has no default"):
        signature_defaults(NoDefault)
    assert signature_defaults(type("Ok", (), {"__init__": lambda self, a=1, *args, **kw: None})) \
        == {"a": 1}


def test_distributed_flag_is_a_class_keyword_and_every_claim_is_tested():
    """Avalanche reads ``supports_distributed`` from a class keyword. A plugin of ours claims it
    only where the two-process test (tests/experiment/test_distributed_run.py, which takes every
    marked method from the registry) runs it; the conv-only methods claim it only when the
    LeNet two-process test lists them."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent / "experiment"))
    from test_distributed_run import SPATIAL
    assigned = re.compile(r"^\s+supports_distributed\s*=", re.M)
    claimed = []
    for spec in _plugins():
        assert not assigned.search(inspect.getsource(spec.factory)), \
            f"{spec.name}: set it as a class keyword, not a class attribute (Avalanche ignores it)"
        if spec.factory.supports_distributed and not spec.reference:
            claimed.append(spec.name)
            assert not getattr(spec.factory, "NEEDS_SPATIAL", False) or spec.name in SPATIAL, \
                f"{spec.name}: claimed, but neither two-process test runs it"
        elif not spec.reference:
            assert getattr(spec.factory, "distributed_note", ""), \
                f"{spec.name}: refused under torch.distributed without a distributed_note"
    assert "er" in claimed and "mir" not in claimed
    # the check can fail: a class body assignment is what it looks for
    assert assigned.search("class P:\n    supports_distributed = True\n")
