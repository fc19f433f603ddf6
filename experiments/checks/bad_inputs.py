"""Every bad input of the trust audit (issue 14), run as a user would: one real ``cl-run`` (or
library call) per case in a scratch folder, and a markdown table of the command, the exit code,
the first line printed and the files left behind.

    python experiments/checks/bad_inputs.py --data-root ../shared/data > bad_inputs.md

The data cases copy MNIST's four files into the scratch folder and damage the copy; nothing
under ``--data-root`` is written. tests/experiment/test_trust_runner.py asserts each case; this
script is the table the closing note of the trust issue shows (a few seconds per case, plus the
divergence, Ctrl-C and checkpoint cases that train on split_digits: about 3 minutes in all on
the 2-core machine).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = ["--no-progress", "--no-plots", "--strategy.epochs=1", "--model.hidden=[16]"]
# The interrupted cases: long enough (a few seconds) that the SIGINT sent once a checkpoint
# appears lands before the run ends, even on a loaded machine
SLOW = [a if a != "--strategy.epochs=1" else "--strategy.epochs=50" for a in FAST]
LIB = {  # library misuse: a script a user might write
    "EnsemblePlugin on a stream without task labels":
        "import torch; from avalanche.training import Naive\n"
        "from cl_plugins import EnsemblePlugin; from cl_plugins.benchmarks import build_benchmark\n"
        "b = build_benchmark('split_digits', 'class').benchmark\n"
        "m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
        "s = Naive(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),"
        " train_mb_size=32, eval_mb_size=256, plugins=[EnsemblePlugin()])\n"
        "s.train(b.train_stream[0])",
    "EWC's state loaded into SIPlugin":
        "from cl_plugins import EWCPlugin, SIPlugin\n"
        "SIPlugin().load_state_dict(EWCPlugin(ewc_lambda=1.0).state_dict())",
}


def cl_run(args, cwd: Path, interrupt_when=None):
    """Run ``cl-run args`` in ``cwd``; with ``interrupt_when`` (a path glob under cwd), send
    SIGINT as soon as it matches. Returns (exit code, stdout + stderr)."""
    cmd = [sys.executable, "-m", "cl_plugins.experiment.cli", *args]
    # SIGINT back to its default in the child, as in a terminal: a script started in the
    # background (`... &`) has it ignored, and a child that inherits that never sees the Ctrl-C
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if interrupt_when:
        while proc.poll() is None and not list(cwd.glob(interrupt_when)):
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=900)
    return proc.returncode, err + out


def first_line(text: str) -> str:
    """What the user reads first: cl-run's error line (with the problems it lists), the first
    warning (its source location dropped), the exception of a library call, else the first line."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].startswith("Traceback"):  # a library call: the exception raised
        raised = [ln for ln in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception): ", ln)]
        pick = raised[-1] if raised else lines[-1]  # not the script's own output after it
    else:
        i = next((i for i, ln in enumerate(lines) if ln.startswith("cl-run:")
                  or "Warning:" in ln), 0)
        pick = lines[i] if lines else ""
        pick = re.sub(r"^\S+\.py:\d+: ", "", pick)  # a warning's source location
        listed = [ln.strip() for ln in lines[i + 1:] if ln.startswith("  - ")]
        if pick.startswith("cl-run: error") and listed:
            pick += " " + " ".join(listed)
    return pick[:400].replace("|", "\\|")


def files_under(folder: Path) -> str:
    if not folder.exists():
        return "none"
    files = [p for p in folder.rglob("*") if p.is_file()]
    kinds = sorted({p.name if not p.name.startswith("seed") else "seed*" + "".join(p.suffixes)
                    for p in files})
    return f"{len(files)}: " + ", ".join(kinds) if files else "none"


def mnist_copy(src: Path, dst: Path, damage: str) -> Path:
    """MNIST's four raw files under dst, with one damaged as ``damage`` says."""
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (src / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(f, raw / f.name)
    if damage == "truncated":
        p = raw / "train-images-idx3-ubyte.gz"
        p.write_bytes(p.read_bytes()[:5000])
    elif damage == "labels":  # one label more than there are images
        p = raw / "train-labels-idx1-ubyte.gz"
        blob = bytearray(gzip.decompress(p.read_bytes()))
        n = int.from_bytes(blob[4:8], "big") + 1
        blob[4:8] = n.to_bytes(4, "big")
        p.write_bytes(gzip.compress(bytes(blob) + b"\x00"))
    elif damage == "missing":
        (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    return dst


def cases(data_root: Path):
    """(case, command shown, callable(folder) -> (exit code, output), folder checked for files)."""
    def run(args, **kw):
        return lambda d: cl_run(args, d, **kw)

    def yaml_case(text):
        def go(d):
            (d / "c.yaml").write_text(text)
            return cl_run(["--config", "c.yaml", "--out=runs"], d)
        return go

    def data_case(damage):
        def go(d):
            root = mnist_copy(data_root, d / "data", damage)
            return cl_run(["--out=runs", f"--data-root={root}", "--benchmark.name=split_mnist",
                           "--methods=naive,ewc", *FAST], d)
        return go

    def out_under_a_file(d):
        (d / "file.txt").write_text("x")
        return cl_run(["--out=file.txt/runs", "--methods=naive", *FAST], d)

    def second_settings(d):
        cl_run(["--methods=gpm", "--out=runs", "--no-progress", "--no-plots",
                "--strategy.epochs=1"], d)
        return cl_run(["--methods=gpm", "--out=runs", "--no-progress", "--no-plots",
                       "--strategy.epochs=2"], d)

    def truncated_ckpt(d):
        args = ["--methods=ewc", "--out=runs", *SLOW]
        cl_run(args, d, interrupt_when="runs/default/ewc/*/seed0.ckpt.prev.pt")
        for p in d.glob("runs/default/ewc/*/seed0.ckpt.pt"):
            p.write_bytes(p.read_bytes()[:100])
        return cl_run(args, d)

    def library(code):
        def go(d):
            p = subprocess.run([sys.executable, "-c", code], cwd=d, capture_output=True, text=True)
            return p.returncode, p.stderr + p.stdout
        return go

    yield ("diverging learning rate", "cl-run --methods=naive,ewc,er --optimizer.name=sgd "
           "--optimizer.lr=1e6 --strategy.epochs=1",
           run(["--methods=naive,ewc,er", "--optimizer.name=sgd", "--optimizer.lr=1e6",
                "--strategy.epochs=1", "--out=runs", "--no-progress", "--no-plots"]))
    yield ("other settings after a finished run", "cl-run --methods=gpm --strategy.epochs=1, "
           "then --strategy.epochs=2", second_settings)
    yield ("method_params typo", "cl-run --methods=ewc --method_params.ewcc.ewc_lambda=1",
           run(["--methods=ewc", "--method_params.ewcc.ewc_lambda=1", "--out=runs"]))
    bad = {"benchmark name": "--benchmark.name=split_digitz", "model name": "--model.name=mlpp",
           "model key": "--model.hiden=[3]", "hyper-parameter": "--method_params.ewc.ewc_lambda=-1",
           "non-finite hyper-parameter": "--method_params.ewc.ewc_lambda=nan",
           "device": "--strategy.device=cuda:7"}
    for what, arg in bad.items():
        yield (f"bad {what} (default methods)", f"cl-run {arg}", run([arg, "--out=runs"]))
    at_once = [a for w, a in bad.items() if w != "non-finite hyper-parameter"]
    yield ("all of them at once", "cl-run " + " ".join(at_once), run([*at_once, "--out=runs"]))
    yield ("malformed YAML", "cl-run --config c.yaml  (benchmark: {scenario: [task)",
           yaml_case("benchmark:\n  name: split_digits\n  scenario: [task\n"))
    yield ("a section written as a scalar", "cl-run --config c.yaml  (benchmark: split_digits)",
           yaml_case("benchmark: split_digits\n"))
    for value in ("123", "no"):
        yield (f"--out={value} (a path)", f"cl-run --out={value} --methods=naive",
               lambda d, v=value: cl_run([f"--out={v}", "--methods=naive", *FAST], d), value)
    yield ("an output folder that cannot be written", "cl-run --out=file.txt/runs",
           out_under_a_file)
    yield ("Ctrl-C during a run", "cl-run --methods=naive (SIGINT after the first checkpoint)",
           run(["--methods=naive", "--out=runs", *SLOW],
               interrupt_when="runs/default/naive/*/seed0.ckpt.pt"))
    for damage, what in (("truncated", "a truncated MNIST .gz"),
                         ("labels", "a label file of the wrong length"),
                         ("missing", "a missing MNIST file")):
        yield (what, "cl-run --benchmark.name=split_mnist --data-root=DAMAGED_COPY",
               data_case(damage))
    yield ("a truncated checkpoint", "cl-run --methods=ewc, interrupted, seed0.ckpt.pt cut to "
           "100 bytes, the same command again", truncated_ckpt)
    for what, code in LIB.items():
        yield (what, "python -c '" + code.splitlines()[-1][:60] + "...'", library(code))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, required=True,
                    help="the folder holding MNIST/raw (it is copied, never written)")
    args = ap.parse_args(argv)
    if not (args.data_root / "MNIST" / "raw").is_dir():
        ap.error(f"--data-root: no MNIST/raw under {args.data_root}")
    print("| case | command | exit | first line printed | files left in the output folder |")
    print("|---|---|---|---|---|")
    for case in cases(args.data_root):
        what, shown, go = case[:3]
        out_name = case[3] if len(case) > 3 else "runs"
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            code, text = go(folder)
            print(f"| {what} | `{shown}` | {code} | {first_line(text)} | "
                  f"{files_under(folder / out_name)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
