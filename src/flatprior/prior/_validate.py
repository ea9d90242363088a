"""Input checks shared by every log P(f) estimator (EP, tilting, Monte-Carlo, exact)."""

from __future__ import annotations

import numpy as np

from flatprior.errors import FlatpriorError
from flatprior.prior._threads import blas_threads, factorisation_threads

#: rounding allowance of :func:`check_psd`, per point and relative to ``max |K_ii|``
PSD_RTOL = 1e-10
#: above this size the minimum eigenvalue for the error message comes from Lanczos (eigsh)
_DENSE_EIG_MAX_N = 3000


def as_kernel(K, *, sym_tol: float = 1e-8) -> np.ndarray:
    """Validate a kernel matrix; return a fresh float64 copy ``[n, n]`` (callers may modify it).

    Args:
        K: square symmetric covariance, array-like or torch tensor, shape ``[n, n]``.
        sym_tol: allowed ``max|K - K^T|`` relative to ``max|K|``.

    Raises:
        FlatpriorError: on an empty, non-square, non-numeric, non-finite or non-symmetric ``K``.
    """
    K = K.detach().cpu().numpy() if hasattr(K, "detach") else np.asarray(K)
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
    return K


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
    K = as_kernel(K, sym_tol=sym_tol)
    y = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1:
        raise FlatpriorError(f"labels y must be a vector [n], got shape {y.shape}")
    return K, label_signs(y[None, :], K.shape[0], one=True)[0]


def label_signs(labels, n: int, *, one: bool = False) -> np.ndarray:
    """Validate ``F`` label vectors ``[F, n]``; return float64 signs in ``{±1}`` ``[F, n]``.

    Every estimator reads labels this way, row by row: ``{±1}`` as is, ``{0, 1}`` with
    ``0 -> -1`` (a row of ones is ``+1`` either way).

    Args:
        labels: ``[F, n]`` array-like or tensor, ``F >= 1``.
        n: the kernel's size.
        one: the caller validates one vector ``y`` (messages say ``y``, not rows).

    Raises:
        FlatpriorError: not ``[F, n]`` with ``F >= 1``, a wrong ``n``, non-numeric labels, or
            a row outside ``{±1}`` / ``{0, 1}``.
    """
    y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    name = "labels y" if one else "labels"
    if y.ndim != 2 or y.shape[0] == 0:
        raise FlatpriorError(
            f"labels must be [F, n] (one label vector per row, F >= 1), got shape {y.shape}"
        )
    if y.shape[1] != n:
        raise FlatpriorError(
            f"{name} have length {y.shape[1]} but K is {n}x{n}; give one label per kernel row"
        )
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError):
        raise FlatpriorError(f"{name} must be numeric, got dtype {y.dtype}") from None
    neg, zero = yf == -1.0, yf == 0.0
    bad_rows = (~(neg | zero | (yf == 1.0))).any(axis=1) | (neg.any(axis=1) & zero.any(axis=1))
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows)[0])
        vals = sorted(set(np.unique(yf[row]).tolist()))[:4]
        where = "" if one else f" per row; row {row} has"
        raise FlatpriorError(
            f"{name} must be in {{-1, +1}} or {{0, 1}}{where or ', found'} values {vals}"
        )
    return np.where(zero.any(axis=1, keepdims=True), 2.0 * yf - 1.0, yf)


def check_psd(K: np.ndarray, *, rtol: float = PSD_RTOL) -> None:
    r"""Refuse a kernel that is not positive semidefinite beyond rounding.

    Shared by every log P(f) estimator: ``ep``, ``exact``, ``mc``, ``tilting``.

    The test: ``K + delta I`` has a Cholesky factor, with ``delta = rtol * n * max_i |K_ii|``.
    In exact arithmetic that holds iff ``lambda_min(K) > -delta``. Why this allowance: a PSD
    kernel computed in float64 carries entry errors ``|E_ij| <= c u s`` (``u = 1.1e-16``,
    ``s = max |K_ii|``; for the arc-cosine kernel ``c`` is large because ``arccos`` near 1 turns
    an ``u`` error of the cosine into a ``sqrt(u)`` error of the angle), and
    ``||E||_2 <= n max |E_ij|``; Cholesky's own backward error is ``O(n u s)`` (Higham 2002,
    Thm 10.3). Both grow like ``n s``, so the allowance is ``rtol n s`` with ``rtol = 1e-10``
    (``c ~ 1e6``): 2e-6 s at n = 20 000, far below the broken kernels of issue #17
    (``lambda_min = -0.038 s``). Measured on MNIST t10k arc-cosine kernels (depth 2,
    sigma_w^2 = 2, sigma_b^2 = 1): distinct images give a positive definite kernel
    (``lambda_min / s`` = 6.8e-5, 3.2e-5, 2.3e-5 at n = 1000, 2000, 4000); 200 exact duplicates
    in n = 2000 give ``lambda_min / s = -1.2e-13``, 6 orders of magnitude inside the allowance.

    Cost: one Cholesky of an ``n x n`` copy (~n^3/3 flops, 8 n^2 bytes); on failure the minimum
    eigenvalue for the message (LAPACK for ``n <= 3000``, else Lanczos via ``eigsh``). At
    n = 10 000 it took as long as one ``scipy.linalg.cholesky`` of the same kernel (81-100 s vs
    65-134 s on the shared 2-core machine at load 9; EP costs about 18 Cholesky times there).

    Args:
        K: symmetric ``[n, n]`` float64 kernel (already checked finite and symmetric).
        rtol: the allowance per point, relative to ``max |K_ii|``.

    Raises:
        FlatpriorError: ``lambda_min(K) < -delta``; the message names ``lambda_min`` and the fix.
    """
    from scipy.linalg import lapack

    n = K.shape[0]
    scale = float(np.abs(np.diagonal(K)).max())
    if scale == 0.0:
        return  # an all-zero diagonal: each estimator refuses it with its own message
    delta = rtol * n * scale
    a = np.array(K, dtype=np.float64, order="F")  # potrf overwrites its input
    a[np.diag_indices(n)] += delta
    with blas_threads(factorisation_threads(n, None)):  # large n: see factorisation_threads
        _, info = lapack.dpotrf(a, lower=1, overwrite_a=1, clean=0)
    del a
    if info == 0:
        return
    lam = _min_eigenvalue(K)
    what = f"min eigenvalue {lam:.3g}" if lam is not None else "an eigenvalue"
    raise FlatpriorError(
        f"kernel K is not positive semidefinite: {what} < -{delta:.2g} (rounding allowance "
        f"{rtol:g} * n * max K_ii); add jitter to the diagonal or check how the kernel was built"
    )


def _min_eigenvalue(K: np.ndarray) -> float | None:
    """Smallest eigenvalue of symmetric ``K`` (None if Lanczos does not converge)."""
    from scipy.linalg import eigvalsh
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    if K.shape[0] <= _DENSE_EIG_MAX_N:
        return float(eigvalsh(K, subset_by_index=[0, 0])[0])
    try:
        return float(eigsh(K, k=1, which="SA", tol=1e-6, maxiter=2000,
                           return_eigenvectors=False)[0])
    except ArpackNoConvergence:
        return None
