"""Input checks shared by every log P(f) estimator (EP, tilting, Monte-Carlo, exact)."""

from __future__ import annotations

import numpy as np

from flatprior.errors import FlatpriorError


def as_kernel_and_signs(K, y, *, sym_tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Validate a kernel matrix and labels; return ``(K float64 [n, n], y float64 in {±1} [n])``.

    Args:
        K: square symmetric covariance, array-like or torch tensor, shape ``[n, n]``.
        y: labels of f, shape ``[n]``, values in ``{-1, +1}`` or ``{0, 1}`` (0 is mapped to -1).
        sym_tol: allowed ``max|K - K^T|`` relative to ``max|K|``.

    Returns a fresh float64 copy of ``K`` (callers may modify it in place).

    Raises:
        FlatpriorError: on a non-square, non-symmetric or non-finite ``K``, labels outside
            ``{±1}``/``{0,1}``, or a length mismatch.
    """
    K = K.detach().cpu().numpy() if hasattr(K, "detach") else np.asarray(K)
    y = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise FlatpriorError(f"kernel K must be a square [n, n] matrix, got shape {K.shape}")
    if K.shape[0] == 0:
        raise FlatpriorError("kernel K is empty (n = 0); pass at least one input")
    try:
        K = K.astype(np.float64)
    except (TypeError, ValueError):
        raise FlatpriorError(f"kernel K must be numeric, got dtype {K.dtype}") from None
    if not np.isfinite(K).all():
        raise FlatpriorError(
            f"kernel K contains {int((~np.isfinite(K)).sum())} NaN/inf entries; check the inputs"
        )
    scale = max(float(np.abs(K).max()), 1e-300)
    # row blocks: no n x n temporaries (n = 20000 is 3.2 GB per copy)
    asym = max(
        float(np.abs(K[lo : lo + 1024] - K[:, lo : lo + 1024].T).max())
        for lo in range(0, K.shape[0], 1024)
    )
    if asym > sym_tol * scale:
        raise FlatpriorError("kernel K is not symmetric; pass (K + K.T) / 2 if that is intended")
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1:
        raise FlatpriorError(f"labels y must be a vector [n], got shape {y.shape}")
    if y.shape[0] != K.shape[0]:
        raise FlatpriorError(
            f"labels y have length {y.shape[0]} but K is {K.shape[0]}x{K.shape[0]}; "
            "give one label per kernel row"
        )
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError):
        raise FlatpriorError(f"labels y must be numeric, got dtype {y.dtype}") from None
    values = set(np.unique(yf).tolist())
    if values <= {-1.0, 1.0}:
        return K, yf
    if values <= {0.0, 1.0}:
        return K, 2.0 * yf - 1.0
    bad = sorted(values - {-1.0, 0.0, 1.0})[:3]
    raise FlatpriorError(f"labels y must be in {{-1, +1}} or {{0, 1}}, found values like {bad}")
