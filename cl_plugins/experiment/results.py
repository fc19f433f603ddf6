"""Results on disk: one JSON per run (rewritten after every experience), markdown, plots."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence


def package_versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("cl_plugins", "avalanche-lib", "torch", "torchvision", "numpy", "wandb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@functools.lru_cache(maxsize=None)
def provenance() -> Dict[str, Any]:
    """Which code produced a result: the package version, the git commit and dirty flag when
    the package runs from a checkout (None otherwise), a hash of the package's source files,
    and each source file's own hash (``reproduce.py --table`` compares these to tell whether a
    row is stale). Computed once per process."""
    import cl_plugins

    pkg = Path(cl_plugins.__file__).resolve().parent
    files = {}
    for f in sorted(list(pkg.rglob("*.py")) + list(pkg.rglob("*.yaml"))):
        if "__pycache__" not in f.parts:
            files[f.relative_to(pkg.parent).as_posix()] = \
                hashlib.sha256(f.read_bytes()).hexdigest()[:12]
    out: Dict[str, Any] = {
        "cl_plugins": getattr(cl_plugins, "__version__", None), "git_commit": None,
        "git_dirty": None, "source_hash": hashlib.sha256(
            json.dumps(files, sort_keys=True).encode()).hexdigest()[:16], "files": files}

    def git(*args):
        return subprocess.run(["git", "-C", str(pkg.parent), *args], capture_output=True,
                              text=True, timeout=20, check=True).stdout

    try:
        top = Path(git("rev-parse", "--show-toplevel").strip()).resolve()
        if top == pkg.parent:  # the package's own checkout, not some enclosing repository
            out["git_commit"] = git("rev-parse", "HEAD").strip()
            # Dirty = uncommitted changes to what computes a result (the package, the
            # protocol configs, the dependencies), not to result files or notes.
            changed = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no",
                                            "--", "cl_plugins", "experiments/configs",
                                            "pyproject.toml").splitlines() if ln.strip()]
            out["git_dirty"] = bool(changed)
            out["git_dirty_files"] = changed[:50]
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON at ``path``, or None when there is none or it cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename to ``path``: a crash never leaves a half-written file, and a
    failed write (e.g. a full disk) leaves no partial file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
    _atomic(path, dump)


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def mean_std(values: Sequence[float]):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


def fmt_pm(values: Sequence[float], scale: float = 100.0) -> str:
    m, sd = mean_std(values)
    if m is None:
        return "–"
    return f"{m * scale:.2f} ± {sd * scale:.2f}" if len(values) > 1 else f"{m * scale:.2f}"


def summary_rows(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Group finished runs by method label: ACC/BWT mean ± std, time, seeds."""
    by_method: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for label, rs in by_method.items():
        done = [r for r in rs if r["status"] == "finished"]
        rows.append({
            "method": label,
            "acc": fmt_pm([r["summary"]["acc"] for r in done]),
            "bwt": fmt_pm([r["summary"]["bwt"] for r in done]),
            "task_il_acc": fmt_pm([r["summary_task_view"]["acc"] for r in done
                                   if r.get("summary_task_view")]),
            "time_s": f"{sum(r['train_time_s'] for r in done) / max(1, len(done)):.1f}",
            "seeds": ",".join(str(r["seed"]) for r in done),
            "failed": [f"{r['seed']} {r['status']}" for r in rs if r["status"] != "finished"],
        })
    return rows


def markdown_table(rows: List[Dict[str, Any]], task_view: bool) -> str:
    head = ["method", "ACC (%)", "BWT (%)"] + (["task-IL ACC (%)"] if task_view else []) + \
        ["train time (s)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["acc"], r["bwt"]] + ([r["task_il_acc"]] if task_view else []) + \
            [r["time_s"], r["seeds"] + (f" (not finished: {', '.join(r['failed'])})"
                                     if r["failed"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(rows: List[Dict[str, Any]], task_view: bool) -> str:
    head = ["method", "ACC (%)", "BWT (%)"] + (["task-IL ACC"] if task_view else []) + ["time (s)"]
    body = [[r["method"], r["acc"], r["bwt"]] + ([r["task_il_acc"]] if task_view else []) +
            [r["time_s"] + (f" (not finished: {', '.join(r['failed'])})" if r["failed"] else "")] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def _save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically, then free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        _atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path


def plot_matrix(matrix: List[List[float]], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    a = np.asarray(matrix) * 100
    fig, ax = plt.subplots(figsize=(1 + 0.6 * a.shape[1], 1 + 0.5 * a.shape[0]))
    im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
    for (i, j), v in np.ndenumerate(a):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                color="white" if v < 60 else "black")
    ax.set_xlabel("test experience")
    ax.set_ylabel("after training experience")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save_figure(fig, path)


def plot_curves(curves: Dict[str, List[float]], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), [y * 100 for y in ys], marker="o", label=label)
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("ACC on experiences seen (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save_figure(fig, path)
