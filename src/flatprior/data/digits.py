"""scikit-learn's 8x8 digits: the embedded default data set (no download)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def load_digits_binary() -> tuple[np.ndarray, np.ndarray]:
    """1797 images ``[n, 1, 8, 8]`` float32 in [0, 1] and labels 1 iff digit >= 5."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = (d.target >= 5).astype(np.float32)
    return x, y
