"""experiments/checks/bad_inputs.py, the trust issue's bad-input table: what it reads from a
command's output, and the damaged MNIST copies it feeds cl-run (the original stays untouched)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "checks" / "bad_inputs.py"
spec = importlib.util.spec_from_file_location("bad_inputs", SCRIPT)
bad_inputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bad_inputs)


@pytest.mark.parametrize("text, shown", [
    ("default: split_digits\n/a/b/runner.py:153: UserWarning: ewc seed 0: corrupt\n  warn(x)\n",
     "UserWarning: ewc seed 0: corrupt"),
    ("wandb: offline\ncl-run: error: 2 problems in the config, nothing was run:\n  - one\n"
     "  - two\nmore\n", "cl-run: error: 2 problems in the config, nothing was run: - one - two"),
    ("Traceback (most recent call last):\n  File \"x\", line 1\n    raise ValueError(a)\n"
     "ValueError: saved by EWCPlugin", "ValueError: saved by EWCPlugin"),
    # stderr comes first, then what the script printed before it raised (Avalanche's logger)
    ("Traceback (most recent call last):\n  File \"x\", line 1\n    raise ValueError(f\"{a}; \"\n"
     "ValueError: needs task labels\n-- >> Start of training phase << --\n",
     "ValueError: needs task labels"),
    ("cl-run: error: a | b\n", "cl-run: error: a \\| b"),
    ("default: split_digits, task-IL\nresults: runs\n", "default: split_digits, task-IL"),
])
def test_the_line_a_user_reads_first(text, shown):
    assert bad_inputs.first_line(text) == shown


def test_damaged_copies_leave_the_original_untouched(mnist_root, tmp_path):
    src = Path(mnist_root)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (src / "MNIST" / "raw").glob("*.gz")}
    raw = bad_inputs.mnist_copy(src, tmp_path / "labels", "labels") / "MNIST" / "raw"
    blob = gzip.decompress((raw / "train-labels-idx1-ubyte.gz").read_bytes())
    assert int.from_bytes(blob[4:8], "big") == 60001 and len(blob) == 8 + 60001
    raw = bad_inputs.mnist_copy(src, tmp_path / "trunc", "truncated") / "MNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte.gz").stat().st_size == 5000
    raw = bad_inputs.mnist_copy(src, tmp_path / "missing", "missing") / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(set(before) - {
        "t10k-labels-idx1-ubyte.gz"})
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in (src / "MNIST" / "raw").glob("*.gz")}
