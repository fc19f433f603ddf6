"""The registry reads each plugin's hyper-parameters from one place: its signature."""

import inspect
import re

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


def test_distributed_flag_is_false_until_proven():
    """Avalanche reads ``supports_distributed`` from a class keyword; none of our plugins
    claims it until a multi-process test proves it (the scale-out issue)."""
    assigned = re.compile(r"^\s+supports_distributed\s*=", re.M)
    for spec in _plugins():
        assert spec.factory.supports_distributed is False, spec.name
        assert not assigned.search(inspect.getsource(spec.factory)), \
            f"{spec.name}: set it as a class keyword, not a class attribute (Avalanche ignores it)"
    # the check can fail: a class body assignment is what it looks for
    assert assigned.search("class P:\n    supports_distributed = True\n")
