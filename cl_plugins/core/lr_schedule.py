"""Learning-rate schedules computed in closed form from a step count.

``cosine_warm_restarts`` is SGDR (Loshchilov & Hutter, ICLR 2017) as torch's
``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`` gives it after ``step`` calls of
``scheduler.step()``: cycles of T_0, T_0 T_mult, T_0 T_mult^2, ... steps, each a half cosine from
``lr_max`` down towards ``lr_min``. The cycle is found with integer arithmetic (no logarithm), so
restarts fall exactly where torch's loop puts them. A plugin that sets the learning rate itself
(GDumb, once per pass over its memory) needs no scheduler object and no scheduler state.
"""

from __future__ import annotations

import math

from cl_plugins.core.checks import check_int


def cosine_warm_restarts(step: int, lr_max: float, lr_min: float, t_0: int = 1,
                         t_mult: int = 2) -> float:
    """lr_min + (lr_max - lr_min) (1 + cos(pi T_cur / T_i)) / 2 after ``step`` scheduler steps,
    T_i the length of the current cycle and T_cur the steps taken in it."""
    check_int("step", step, 0)
    check_int("t_0", t_0, 1)
    check_int("t_mult", t_mult, 1)
    t_cur, t_i = step, t_0
    while t_cur >= t_i:  # at most log2(step) cycles for t_mult >= 2
        t_cur, t_i = t_cur - t_i, t_i * t_mult
    return lr_min + (lr_max - lr_min) * (1.0 + math.cos(math.pi * t_cur / t_i)) / 2.0
