"""The project's own error type and small validators shared by every module.

Every user-facing mistake (bad file, bad shape, NaN, unknown name, impossible size) raises
:class:`FlatpriorError` with a one-line message that says what is wrong and how to fix it. The CLI
prints that line and exits with status 2, without a traceback.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterable
from typing import Any


class FlatpriorError(ValueError):
    """A user-facing error: one line that names the problem and the fix."""


def check_choice(kind: str, name: str, valid: Iterable[str]) -> str:
    """Return ``name`` if it is one of ``valid``, else raise listing the valid names."""
    valid = sorted(valid)
    if name in valid:
        return name
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise FlatpriorError(f"unknown {kind} {name!r}{hint}; choose one of: {', '.join(valid)}")


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite number > 0 (or >= 0 with ``allow_zero``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FlatpriorError(f"{name} must be a number, got {value!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise FlatpriorError(f"{name} must be finite, got {value!r}")
    if v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise FlatpriorError(f"{name} must be {bound}, got {value!r}")


def check_int(name: str, value: Any, minimum: int = 1, *, integral_floats: bool = False,
              hint: str = "") -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``, else raise one line.

    ``bool`` is refused (``True`` is not a count). Python and numpy integers pass; with
    ``integral_floats`` so do floats with an integer value (e.g. ``3.0`` read from JSON).
    ``hint`` is added after the bound in the message (e.g. ``" (0 = off)"``).
    """
    import numpy as np

    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok and integral_floats and isinstance(value, (float, np.floating)):
        ok = value == value and abs(value) != float("inf") and int(value) == value
    if not ok or int(value) < minimum:
        raise FlatpriorError(f"{name} must be an integer >= {minimum}{hint}, got {value!r}")
    return int(value)


def check_finite_tensor(name: str, x: Any) -> None:
    """Raise if a torch tensor / numpy array holds NaN or inf (says how many)."""
    import numpy as np

    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise FlatpriorError(
            f"{name} contains {bad} NaN/inf value(s); clean or drop them before calling flatprior"
        )


#: Parameters renamed so that every variance is spelled the same way everywhere (``sigma_w2``:
#: weight variance times fan-in, ``sigma_b2``: bias variance): old name -> (new name, meaning).
RENAMED_PARAMETERS = {
    "sigma_w": ("sigma_w2", "the weight variance times fan-in, sigma_w**2"),
    "sigma_b": ("sigma_b2", "the bias variance, sigma_b**2"),
}


def renamed_message(old: str, value: Any = None) -> str:
    """One line saying that ``old`` was renamed, naming the new parameter (and its value).

    >>> renamed_message("sigma_b", 0.5)
    'sigma_b was renamed sigma_b2 (the bias variance, sigma_b**2): write sigma_b2 = 0.25'
    """
    new, meaning = RENAMED_PARAMETERS[old]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    hint = f": write {new} = {float(value) ** 2!r}" if number else f": give {new} instead"
    return f"{old} was renamed {new} ({meaning}){hint}"


def refuse_renamed(fn: Callable) -> Callable:
    """Decorator: a renamed keyword (``sigma_b=...``) raises a FlatpriorError naming the new one.

    Instead of Python's bare "unexpected keyword argument".
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for old in sorted(RENAMED_PARAMETERS.keys() & kwargs.keys()):
            raise FlatpriorError(renamed_message(old, kwargs[old]))
        return fn(*args, **kwargs)

    return wrapper
