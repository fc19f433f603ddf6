"""Which rows of RESULTS.md moved since a commit: the row-level view of ``rerun_stale.py --moved``
(which compares single runs), for a closing note that must say which published rows changed and
by how much.

    python experiments/rows_moved.py 50570e9~1            # every row against RESULTS.md then
    python experiments/rows_moved.py 50570e9~1 --current  # only rows that are current now

A row is keyed by (protocol, method, benchmark, scenario). For each key present at COMMIT or
now, it prints the ACC then and now (mean ± std), the change of the mean in points, the seeds
then and now, and whether today's row is current. Rows whose ACC and seeds are both unchanged
are only counted. Nothing is run; the two tables are read as they are (``git show
COMMIT:RESULTS.md`` and the working tree's), so regenerate the table first
(``reproduce.py --table``).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_rows(text: str) -> dict:
    """``{(protocol, method, benchmark, scenario): {column: value}}`` for every row of every
    table of RESULTS.md whose header starts with ``| protocol | method | benchmark |``."""
    rows, header = {}, None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:3] == ["protocol", "method", "benchmark"]:
            header = cells
            continue
        if header is None or set("".join(cells)) <= set("-: "):
            continue
        row = dict(zip(header, cells))
        rows[(row["protocol"], row["method"], row["benchmark"], row["scenario"])] = row
    return rows


def mean(acc: str):
    m = re.match(r"\s*(-?\d+(?:\.\d+)?)", acc or "")
    return float(m.group(1)) if m else None


def compare(old: dict, new: dict, current_only: bool = False):
    """``(moved, unchanged)``: ``moved`` a list of ``(key, old_acc, new_acc, delta, old_seeds,
    new_seeds, code)`` sorted by |delta| (rows only at one side have delta None and come last),
    ``unchanged`` the number of keys with the same ACC and seeds at both sides."""
    moved, unchanged = [], 0
    for key in sorted(set(old) | set(new)):
        o, n = old.get(key, {}), new.get(key, {})
        code = n.get("code", "gone")
        if current_only and code != "current":
            continue
        oa, na = o.get("ours ACC", "–"), n.get("ours ACC", "–")
        os_, ns = o.get("seeds", "–"), n.get("seeds", "–")
        if oa == na and os_ == ns:
            unchanged += 1
            continue
        a, b = mean(oa), mean(na)
        delta = None if a is None or b is None else round(b - a, 2)
        moved.append((key, oa, na, delta, os_, ns, "current" if code == "current" else
                      ("gone" if code == "gone" else "stale")))
    moved.sort(key=lambda m: (m[3] is None, -abs(m[3] or 0), m[0]))
    return moved, unchanged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commit", help="the commit whose RESULTS.md is the 'then'")
    ap.add_argument("--current", action="store_true", help="only rows that are current now")
    args = ap.parse_args(argv)
    try:
        then = subprocess.run(["git", "-C", str(REPO), "show", f"{args.commit}:RESULTS.md"],
                              capture_output=True, text=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        print(f"rows_moved: cannot read RESULTS.md at {args.commit!r}: {e.stderr.strip()}",
              file=sys.stderr)
        return 2
    moved, unchanged = compare(parse_rows(then), parse_rows((REPO / "RESULTS.md").read_text()),
                               args.current)
    print(f"| protocol | method | benchmark | scenario | ACC at {args.commit} | ACC now | change "
          "| seeds then | seeds now | now |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, oa, na, delta, os_, ns, code in moved:
        d = "–" if delta is None else f"{delta:+.2f}"
        print("| " + " | ".join([*key, oa, na, d, os_, ns, code]) + " |")
    print(f"\n{len(moved)} row(s) changed, {unchanged} unchanged (same ACC and seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
