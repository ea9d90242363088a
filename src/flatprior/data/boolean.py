"""The Boolean system: all 128 inputs of {0,1}^7 and a target function on them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from flatprior.errors import FlatpriorError

N_BITS = 7


def boolean_inputs(n_bits: int = N_BITS) -> np.ndarray:
    """All ``2**n_bits`` points of {0,1}^n_bits as float32 ``[2**n, n]``.

    Row i holds the binary digits of i, most significant bit first (row 1 = 0…01).
    """
    i = np.arange(2**n_bits)[:, None]
    return ((i >> np.arange(n_bits - 1, -1, -1)) & 1).astype(np.float32)


def default_target(x: np.ndarray) -> np.ndarray:
    """A simple default target: 1 iff at least 4 of the 7 bits are set (majority)."""
    return (x.sum(axis=1) >= 4).astype(np.float32)


def parse_target(target: str | Callable | None, x: np.ndarray) -> np.ndarray:
    """Target labels ``[128]`` in {0,1} from a 128-char 0/1 string, a callable, or the default."""
    n = len(x)
    if target is None:
        return default_target(x)
    if isinstance(target, str):
        s = target.strip()
        if len(s) != n or set(s) - {"0", "1"}:
            raise FlatpriorError(
                f"boolean target must be a string of {n} characters '0'/'1' (bit i = f(input i)); "
                f"got {len(s)} characters"
            )
        return np.frombuffer(s.encode(), dtype=np.uint8).astype(np.float32) - ord("0")
    if callable(target):
        y = np.asarray(target(x), dtype=np.float32).reshape(-1)
        if y.shape != (n,) or not np.isin(y, (0.0, 1.0)).all():
            raise FlatpriorError(
                f"boolean target callable must return {n} values in {{0, 1}}, got shape {y.shape}"
            )
        return y
    raise FlatpriorError("boolean target must be a 128-bit 0/1 string or a callable")


def boolean_dataset(target: str | Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``[128, 7]`` float32 and labels ``[128]`` of the target function."""
    x = boolean_inputs()
    return x, parse_target(target, x)
