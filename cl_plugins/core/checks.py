"""Argument checks that raise a ValueError naming the argument and what is allowed.

Every plugin validates its hyper-parameters in ``__init__`` with these helpers, so that a bad
value fails at construction with one consistent message format instead of deep inside training.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Optional, Sequence


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing under the data root (nothing is ever downloaded)."""

    def __init__(self, dataset: str, root: str, expected: Sequence[str], hint: str = ""):
        self.dataset, self.root, self.expected = dataset, str(root), list(expected)
        files = "\n".join(f"  - {f}" for f in self.expected)
        msg = (
            f"{dataset} not found under data root '{root}'. Expected these files:\n{files}\n"
            "Set the data root with --benchmark.data_root=PATH or the CL_DATA_ROOT variable."
        )
        if hint:
            msg += f"\n{hint}"
        super().__init__(msg)


class DataFileError(ValueError):
    """A dataset file exists but is truncated, corrupt or inconsistent; the message names it."""


def _fmt_choices(choices: Iterable[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


def unknown_name_error(kind: str, name: Any, valid: Iterable[str]) -> ValueError:
    """Error for an unknown name, listing every valid option and the closest match."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}.{hint} Valid options: {', '.join(valid)}.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {_fmt_choices(choices)}; got {value!r}.")
    return value


def _check_number(name: str, value: Any) -> float:
    # NaN and infinity are refused everywhere: an infinite coefficient or learning rate can
    # only produce a diverged run, which should fail at validation rather than after training.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise ValueError(f"{name} must be a number (finite: not NaN or inf); got {value!r}.")
    return value


def check_range(
    name: str,
    value: Any,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> Any:
    """Check low <= value <= high (bounds optional, inclusivity configurable)."""
    _check_number(name, value)
    lo_ok = low is None or (value >= low if low_inclusive else value > low)
    hi_ok = high is None or (value <= high if high_inclusive else value < high)
    if not (lo_ok and hi_ok):
        lb = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
        hb = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name} must be in {lb}, {hb}; got {value!r}.")
    return value


def check_positive(name: str, value: Any) -> Any:
    return check_range(name, value, 0, None, low_inclusive=False)


def check_non_negative(name: str, value: Any) -> Any:
    return check_range(name, value, 0, None)


def check_int(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r}.")
    return check_range(name, value, low, high)


def check_bool(name: str, value: Any) -> bool:
    # check_choice(name, v, (True, False)) would accept 0 and 1, since 1 == True.
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be one of True, False; got {value!r}.")
    return value


def check_image_batch(model: str, x: Any, in_channels: int, input_size: Optional[int] = None):
    """Check a [N, C, H, W] batch: 4-D, ``in_channels`` channels, H = W = ``input_size`` if given."""
    if x.dim() != 4:
        raise ValueError(f"{model} expects a 4-D [N, C, H, W] input; got shape {tuple(x.shape)}.")
    if x.shape[1] != in_channels:
        raise ValueError(f"{model} expects {in_channels} input channels (in_channels="
                         f"{in_channels}); got {x.shape[1]} channels in an input of shape "
                         f"{tuple(x.shape)}.")
    if input_size is not None and tuple(x.shape[2:]) != (input_size, input_size):
        # The first fully-connected layer's width is fixed by input_size: say so, rather than
        # letting a matmul shape error surface.
        raise ValueError(f"{model} expects {input_size}x{input_size} inputs (input_size="
                         f"{input_size}); got {x.shape[2]}x{x.shape[3]}.")
