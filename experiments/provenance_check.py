"""Is a stored result still what today's code and config would compute? (``reproduce.py --table``)

A row depends on the files its computation can execute: the import closure (static
``from cl_plugins... import`` and relative imports, at any indentation) of its method's module
(each method of the entry; ``cl_plugins/baselines/avalanche_refs.py`` for Avalanche's reference
methods, whose defaults live there), the runner (``cl_plugins/experiment/runner.py``, which
imports the build, plan, config and checkpoint steps, and ``evaluation.py``), every module of
``cl_plugins/benchmarks/`` (builders are chosen by name at run time), the model factory
(``models/__init__.py``, ``classifier.py``, ``heads.py``) and the backbone's module. Two imports
are not followed: package ``__init__`` re-exports (``models/__init__.py`` lists every backbone),
and ``cl_plugins/registry.py``, whose list names every method's module (a row's own methods are
already counted), so adding a method or a core module that a row never imports leaves it
current. ``core/`` is followed like the rest: a core module counts when something the row runs
imports it, and a row-affecting change to the import structure changes an importing file.
A result is *stale* when one of them
differs from the version that produced it, or when a dependency was added or removed; it is
*settings changed* when the protocol's config (with the variant's arguments) now describes other
settings than the result's settings fingerprint.

Results written since the JSON records its ``provenance`` carry the SHA-256 of every package
file. Older results do not: their revision is inferred as the last commit made before the run
started (shown as ``~commit``), and that commit's files are compared with today's through git's
blob hashes. A run started from uncommitted work is then compared with the commit before it,
which can only make the check stricter, never hide a change made after the run.

A run resumed from a checkpoint records the code of each part: ``provenance`` is the last
part's, and each entry of ``resumed`` holds, as ``provenance_before``, the code that ran the
experiences before that resume; a row file that differs from today's in any part makes the
result stale. So that a run does not mix code in the first place, ``set_aside_foreign_checkpoints``
moves aside, before reproduce.py or rerun_stale.py runs anything, each checkpoint whose own
recorded run (the result it holds) has row files that differ from today's: that run starts
afresh. Older runners recorded the last part only: such results, resumed before the set-aside
existed (``CHECKPOINTS_CHECKED_SINCE``), whose first part started before the commit they record,
ran part of their steps at an earlier commit whose files are unknown: they are stale ("resumed
across commits").
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

DEP_DIRS = ("cl_plugins/benchmarks/",)
RUNNER_FILES = ("cl_plugins/experiment/runner.py", "cl_plugins/experiment/evaluation.py")
MODEL_FACTORY = ("cl_plugins/models/__init__.py", "cl_plugins/models/classifier.py",
                 "cl_plugins/models/heads.py")
NOT_FOLLOWED = ("cl_plugins/registry.py",)  # names every method's module; see the docstring
CHECKPOINTS_CHECKED_SINCE = "2026-12-06T20:00:00+0000"  # set_aside_foreign_checkpoints in use
_IMPORT = re.compile(r"^[ \t]*from[ \t]+(\.+[\w.]*|cl_plugins[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)",
                     re.M)


def _module_file(module: str, repo: Path) -> Optional[str]:
    """``cl_plugins.a.b`` -> its file relative to ``repo`` (module or package), or None."""
    base = module.replace(".", "/")
    for cand in (f"{base}.py", f"{base}/__init__.py"):
        if (repo / cand).is_file():
            return cand
    return None


def _imports(path: str, repo: Path) -> List[str]:
    """The cl_plugins files ``path`` imports (absolute and relative; ``from pkg import mod``
    also names ``pkg/mod.py`` when that is a module)."""
    package = path.rsplit("/", 1)[0].replace("/", ".")
    out = []
    for module, names in _IMPORT.findall((repo / path).read_text()):
        if module.startswith("."):
            dots = len(module) - len(module.lstrip("."))
            parent = package.split(".")[:len(package.split(".")) - (dots - 1)]
            module = ".".join(parent + ([module.lstrip(".")] if module.lstrip(".") else []))
        found = _module_file(module, repo)
        if found:
            out.append(found)
        for item in names.strip("()").split(","):
            name = re.match(r"\s*(\w*)", item).group(1)
            sub = _module_file(f"{module}.{name}", repo) if name else None
            if sub:
                out.append(sub)
    return out


@lru_cache(maxsize=None)
def row_files(model_name: Optional[str], methods: Tuple[str, ...], repo: Path) -> List[str]:
    """Every package file a row's computation can run (see the module docstring)."""
    from cl_plugins.models import BACKBONES

    todo = list(MODEL_FACTORY) + list(methods) + list(RUNNER_FILES)
    todo += [f.relative_to(repo).as_posix() for d in DEP_DIRS for f in (repo / d).glob("*.py")]
    backbone = BACKBONES.get(model_name or "mlp")
    if backbone is None:
        todo.append(f"<unknown model {model_name}>")
    else:
        todo.append(backbone.__module__.replace(".", "/") + ".py")
    seen = set()
    while todo:
        path = todo.pop()
        if path in seen or path in NOT_FOLLOWED:
            continue
        seen.add(path)
        if path.endswith("__init__.py") or not (repo / path).is_file():
            continue
        todo.extend(_imports(path, repo))
    return sorted(seen)


def method_files(entry: Dict) -> List[str]:
    """The source files of the methods an entry names (templates from Avalanche: none)."""
    from cl_plugins.registry import get_method

    files = []
    for part in [entry] + list(entry.get("plus") or []):
        try:
            spec = get_method(part["name"])
        except ValueError:
            files.append(f"<unknown method {part['name']}>")
            continue
        module = getattr(spec.factory, "__module__", "") or ""
        if module.startswith("cl_plugins."):
            files.append(module.replace(".", "/") + ".py")
        if spec.reference:
            files.append("cl_plugins/baselines/avalanche_refs.py")
    return files


def expected_settings(config_path: Path, variant_args: List[str]) -> Dict[str, str]:
    """{method label: settings fingerprint} for a protocol variant as its config reads today
    (no data is read: only the config and the variant's overrides)."""
    from cl_plugins.benchmarks import resolve_scenario
    from cl_plugins.experiment.cli import parse_args, select_methods
    from cl_plugins.experiment.config import apply_override, expand_paths, load_config, \
        normalize_methods
    from cl_plugins.experiment.plan import expand_methods, method_label, settings_fingerprint

    _, overrides, _, only, _ = parse_args(list(variant_args))
    cfg = load_config(config_path)
    for key, value in overrides:
        apply_override(cfg, key, value)
    if only:
        select_methods(cfg, only)
    expand_paths(cfg)
    cfg["benchmark"]["scenario"] = resolve_scenario(cfg["benchmark"]["scenario"])
    entries = expand_methods(normalize_methods(cfg["methods"]), cfg["benchmark"]["scenario"])
    return {method_label(e): settings_fingerprint(cfg, e) for e in entries}


class Staleness:
    def __init__(self, repo: Path):
        self.repo = Path(repo)
        self._sha = {}

    def _git(self, *args) -> str:
        return subprocess.run(["git", "-C", str(self.repo), *args], capture_output=True,
                              text=True, check=True).stdout

    @lru_cache(maxsize=None)
    def current_files(self) -> Dict[str, str]:
        """Today's package files: {path: sha256[:12]} (as ``results.provenance`` records)."""
        out = {}
        for f in sorted((self.repo / "cl_plugins").rglob("*")):
            if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
                out[f.relative_to(self.repo).as_posix()] = \
                    hashlib.sha256(f.read_bytes()).hexdigest()[:12]
        return out

    @lru_cache(maxsize=None)
    def current_blobs(self) -> Dict[str, str]:
        paths = list(self.current_files())
        shas = self._git("hash-object", "--", *paths).split()
        return dict(zip(paths, shas))

    @lru_cache(maxsize=None)
    def commit_before(self, started: str) -> Optional[str]:
        out = self._git("rev-list", "-1", f"--before={started}", "HEAD").strip()
        return out or None

    @lru_cache(maxsize=None)
    def commit_time(self, commit: str) -> Optional[datetime]:
        try:
            return _when(self._git("show", "-s", "--format=%cI", commit).strip())
        except (subprocess.CalledProcessError, ValueError):
            return None

    @lru_cache(maxsize=None)
    def blobs_at(self, commit: str) -> Dict[str, str]:
        out = {}
        for line in self._git("ls-tree", "-r", commit, "--", "cl_plugins").splitlines():
            meta, path = line.split("\t", 1)
            if path.endswith((".py", ".yaml")):
                out[path] = meta.split()[2]
        return out

    def revision(self, result: Dict) -> str:
        prov = result.get("provenance")
        if prov:
            if prov.get("git_commit"):
                return prov["git_commit"][:8] + ("+dirty" if prov.get("git_dirty") else "")
            return f"source {prov.get('source_hash')}"
        commit = self.commit_before(result.get("started", ""))
        return f"~{commit[:8]}" if commit else "unknown"

    def reasons(self, result: Dict, expected_fp: Optional[str]) -> List[str]:
        """Why ``result`` is stale (empty: current)."""
        why = []
        fp = result.get("settings_fingerprint")
        if fp is not None and expected_fp is not None and fp != expected_fp:
            why.append("settings changed")
        methods = method_files(result.get("method_entry") or {"name": result["method"]})
        prov = result.get("provenance")
        if prov:
            then, now = prov.get("files", {}), self.current_files()
        else:
            commit = self.commit_before(result.get("started", ""))
            if commit is None:
                return why + ["no revision recorded"]
            then, now = self.blobs_at(commit), self.current_blobs()
        model = ((result.get("config") or {}).get("model") or {}).get("name")
        deps = set(row_files(model, tuple(methods), self.repo))
        changed = sorted(p for p in deps if then.get(p) != now.get(p))
        why += [p.replace("cl_plugins/", "") + " changed" for p in changed]
        parts = [r.get("provenance_before") for r in result.get("resumed") or []]
        for before in [b for b in parts if b]:  # each earlier part's code (runner since 2026-12-06)
            earlier = before.get("files", {})
            why += [p.replace("cl_plugins/", "") + " changed (a part before a resume)"
                    for p in sorted(deps) if earlier.get(p) != now.get(p)
                    and p.replace("cl_plugins/", "") + " changed" not in why]
        if prov and parts and not all(parts) and prov.get("git_commit"):
            started, made = _when(result.get("started")), self.commit_time(prov["git_commit"])
            if started and made and started < _when(CHECKPOINTS_CHECKED_SINCE) and started < made:
                why.append("resumed across commits (its first part's code is not recorded)")
        return why


def _when(stamp: Optional[str]) -> Optional[datetime]:
    """An ISO time as the runner (``+0000``) or git (``+00:00``) writes it; None if absent."""
    if not stamp:
        return None
    return datetime.strptime(stamp.replace("+00:00", "+0000"), "%Y-%m-%dT%H:%M:%S%z")


def set_aside_foreign_checkpoints(results_dir: Path, repo: Path) -> List[str]:
    """Rename each checkpoint (``seed<N>.ckpt.pt`` and ``.prev``) under ``results_dir`` whose own
    recorded run (the ``result`` it holds, with the code that wrote it) has row files other
    than today's to ``*.stale-<commit>``, so that the run starts afresh instead of finishing
    other code's steps (the module docstring). The run JSON is not used: a failed attempt to
    resume rewrites it with the new code's provenance. Unreadable checkpoints are left to the
    runner (it moves them aside). Returns the files moved."""
    from cl_plugins.experiment import checkpoint as ckpt_io

    check, moved = Staleness(repo), []
    for path in sorted(Path(results_dir).rglob("seed*.ckpt*.pt")):
        try:
            run = ckpt_io.load(path).get("result") or {}
        except (ckpt_io.CheckpointError, OSError):
            continue
        if not run.get("provenance") or not run.get("method"):
            continue
        if [w for w in check.reasons(run, None) if w.endswith(" changed")]:
            tag = (run["provenance"].get("git_commit") or "unknown")[:8]
            path.rename(path.with_name(f"{path.name}.stale-{tag}"))
            moved.append(str(path))
    return moved
