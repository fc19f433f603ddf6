"""The layout rules of docs/architecture.md, checked on the source tree: a method file is at most
250 lines with one public class, and imports no private name from another method file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cl_plugins"
METHOD_FAMILIES = ("projection", "regularization", "replay", "distillation", "generative",
                   "hybrid", "architectural", "baselines")
METHOD_FILES = sorted(f for fam in METHOD_FAMILIES for f in (PKG / fam).glob("*.py")
                      if f.name != "__init__.py")


def _rel(f: Path) -> str:
    return f.relative_to(PKG.parent).as_posix()


def test_the_method_families_are_all_listed():
    # a new family folder must be added to METHOD_FAMILIES (or be a non-method folder)
    others = {"core", "experiment", "benchmarks", "models", "__pycache__"}
    folders = {d.name for d in PKG.iterdir() if d.is_dir()} - others
    assert folders == set(METHOD_FAMILIES)


@pytest.mark.parametrize("path", METHOD_FILES, ids=_rel)
def test_method_file_is_short_with_one_public_class(path):
    lines = path.read_text().count("\n")
    assert lines <= 250, f"{_rel(path)} has {lines} lines (at most 250)"
    tree = ast.parse(path.read_text())
    public = [n.name for n in tree.body if isinstance(n, ast.ClassDef)
              and not n.name.startswith("_")]
    assert len(public) <= 1, f"{_rel(path)} defines public classes {public}"


@pytest.mark.parametrize("path", METHOD_FILES, ids=_rel)
def test_no_private_name_imported_from_another_method_file(path):
    method_modules = {"cl_plugins." + _rel(f)[len("cl_plugins/"):-3].replace("/", ".")
                      for f in METHOD_FILES}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in method_modules:
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{_rel(path)} imports {private} from {node.module}"
