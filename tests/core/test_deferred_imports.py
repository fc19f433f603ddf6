"""qpsolvers and wandb are imported only when used (core/deferred_imports.py)."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

PROBE = r"""
import sys, types
import cl_plugins.experiment.runner  # imports Avalanche, GEM plugin included
from cl_plugins.core.deferred_imports import _StandIn, defer
assert isinstance(sys.modules["qpsolvers"], _StandIn), type(sys.modules["qpsolvers"])
assert isinstance(sys.modules["wandb"], _StandIn)
assert "jax" not in sys.modules and "qpsolvers.solvers" not in sys.modules and "wandb.sdk" not in sys.modules
import avalanche.training.plugins.gem as gem
import numpy as np
x = gem.qpsolvers.solve_qp(np.eye(2), np.array([-1.0, -1.0]), solver="quadprog")
assert np.allclose(x, [1.0, 1.0]), x
assert type(sys.modules["qpsolvers"]) is types.ModuleType  # the real one from now on
import wandb
assert wandb.run is None
wandb.some_flag = 3  # a write through the stand-in reaches the real module
assert sys.modules["wandb"].some_flag == 3
import wandb.sdk
assert not defer("wandb") and not defer("no_such_module_here") and not defer("a.b")
print("ok")
"""


def test_deferred_modules_load_on_first_use_and_behave_as_the_real_ones():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
