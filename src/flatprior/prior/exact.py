r"""Reference values of the orthant probability ``P(sign z = y)``, ``z ~ N(0, K)``.

* :func:`exact_log_orthant_prob` — Genz's separation-of-variables integral with randomised
  lattice quasi-Monte-Carlo (the algorithm behind ``scipy.stats.multivariate_normal.cdf``),
  iterated until a *relative* error target is met, for small ``n``;
* :func:`mc_log_orthant_prob` — plain Monte-Carlo on ``z ~ N(0, K)`` with a Wilson 95 %
  interval, memory bounded by batches, for medium ``n`` and not-too-small probabilities;
* :func:`orthant_prob_closed_form` — exact formulas for ``n <= 3`` (Sheppard / Plackett).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from flatprior.errors import FlatpriorError, check_int, check_positive
from flatprior.prior._validate import PSD_RTOL, as_kernel_and_signs, check_psd

__all__ = [
    "OrthantResult",
    "MCOrthantResult",
    "exact_log_orthant_prob",
    "mc_log_orthant_prob",
    "orthant_prob_closed_form",
    "wilson_interval",
]


@dataclass(frozen=True)
class OrthantResult:
    """Quasi-Monte-Carlo orthant probability.

    Attributes:
        log_prob: ``ln P`` (natural log).
        prob: ``P``.
        abs_err: error estimate of ``prob`` (3 standard errors over randomised lattice
            batches, as reported by scipy's QMC integrator).
        rel_err: ``abs_err / prob`` (roughly the absolute error of ``log_prob``).
        n_points: integration points used.
        converged: whether ``rel_err`` met the requested ``rel_tol``.
    """

    log_prob: float
    prob: float
    abs_err: float
    rel_err: float
    n_points: int
    converged: bool = True
    # :class:`flatprior.prior.api.LogPriorResult`: no interval
    ci_low: ClassVar[float | None] = None
    ci_high: ClassVar[float | None] = None

    @property
    def std_err(self) -> float:
        """Standard error of ``log_prob``: ``rel_err / 3`` (``abs_err`` is 3 standard errors)."""
        return self.rel_err / 3.0


@dataclass(frozen=True)
class MCOrthantResult:
    """Plain Monte-Carlo orthant probability with a Wilson 95 % interval.

    Attributes:
        log_prob: ``ln(hits / n_samples)`` (``-inf`` if no hit).
        ci_low, ci_high: 95 % Wilson interval of ``ln P``.
        std_err: delta-method standard error of ``log_prob``.
        hits, n_samples: counts.
    """

    log_prob: float
    ci_low: float
    ci_high: float
    std_err: float
    hits: int
    n_samples: int

    @property
    def converged(self) -> bool:
        """True when at least one sample fell in the orthant."""
        return self.hits > 0


def wilson_interval(hits, n, z: float = 1.959963984540054) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion ``hits / n`` (vectorised)."""
    hits = np.asarray(hits, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    p = hits / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return np.maximum(centre - half, 0.0), np.minimum(centre + half, 1.0)


def orthant_prob_closed_form(K, y) -> float:
    r"""Exact ``P(sign z = y)`` for ``n <= 3``.

    ``n = 1``: 1/2; ``n = 2``: ``1/4 + asin(rho_12)/(2 pi)``;
    ``n = 3``: ``1/8 + (asin rho_12 + asin rho_13 + asin rho_23)/(4 pi)``, with
    ``rho_ij = y_i y_j K_ij / sqrt(K_ii K_jj)`` (Sheppard 1899; Plackett 1954).
    """
    K, y = as_kernel_and_signs(K, y)
    n = K.shape[0]
    if n > 3:
        raise FlatpriorError(f"closed form exists only for n <= 3, got n = {n}")
    sd = np.sqrt(np.diagonal(K))
    rho = (y[:, None] * y[None, :]) * K / np.outer(sd, sd)
    pairs = [math.asin(float(np.clip(rho[i, j], -1, 1))) for i in range(n) for j in range(i)]
    return 0.5**n + sum(pairs) / (2 * math.pi * (n - 1)) if n > 1 else 0.5


def exact_log_orthant_prob(
    K,
    y,
    *,
    max_n: int = 20,
    rel_tol: float = 1e-3,
    max_points: int = 20_000_000,
    seed: int = 0,
) -> OrthantResult:
    r"""``ln P(sign z = y)`` for small ``n`` by Genz's quasi-Monte-Carlo integration.

    ``P(sign z = y) = P(w <= 0)`` with ``w = -diag(y) z ~ N(0, D K D)``, ``D = diag(y)``. The
    integral is evaluated with scipy's implementation of Genz's separation-of-variables
    algorithm with variable re-ordering and randomised lattice rules (Genz 1992; Genz & Bretz
    2009) — the code behind ``scipy.stats.multivariate_normal.cdf``. We call its lattice
    routine directly because the public ``cdf`` only honours an *absolute* error target and
    does not return the error estimate; here the number of points grows until the estimated
    error is below ``rel_tol * P`` (or ``max_points`` is reached). ``n <= 2`` uses the closed
    form.

    Args:
        K: covariance ``[n, n]``.
        y: labels ``[n]`` in ``{±1}`` or ``{0, 1}``.
        max_n: largest ``n`` accepted (the cost grows fast with ``n``).
        rel_tol: target relative error of ``P``.
        max_points: cap on integration points.
        seed: seed of the lattice randomisation.

    Returns:
        :class:`OrthantResult` (check ``rel_err``: it may exceed ``rel_tol`` at the cap).

    Example:
        An independent kernel gives ``P = 2^{-n}`` exactly:

        >>> import math, torch
        >>> res = exact_log_orthant_prob(torch.eye(3), [1, 0, 1])
        >>> math.isclose(res.log_prob, -3 * math.log(2), rel_tol=1e-12)
        True
    """
    K, y = as_kernel_and_signs(K, y)
    check_psd(K)
    n = K.shape[0]
    if n > max_n:
        raise FlatpriorError(
            f"exact orthant probability is limited to n <= {max_n} points, got n = {n}; "
            "use method='ep' or 'mc' for larger sets"
        )
    check_positive("rel_tol", rel_tol)
    if n <= 2:
        p = orthant_prob_closed_form(K, y)
        logp = math.log(p) if p > 0 else -math.inf
        return OrthantResult(logp, p, 1e-15, 1e-15 / max(p, 1e-300), 0)
    cov = (y[:, None] * y[None, :]) * K
    sd = np.sqrt(np.diagonal(cov))
    cov = cov / np.outer(sd, sd)  # correlation matrix: same orthant probability
    low = np.full(n, -np.inf)
    high = np.zeros(n)
    try:
        from scipy.stats._qmvnt import _qmvn  # private, but it is the routine cdf() itself uses
    except ImportError:  # future scipy: fall back to the public cdf (absolute error only)
        from scipy.stats import multivariate_normal

        p = float(multivariate_normal(np.zeros(n), cov, allow_singular=True).cdf(
            high, maxpts=max_points, abseps=1e-12, releps=rel_tol, rng=seed))
        if not p > 0:
            raise FlatpriorError("orthant integration returned P <= 0; use method='ep'") from None
        return OrthantResult(math.log(p), p, math.nan, math.nan, int(max_points))
    rng = np.random.default_rng(seed)
    m = 1000 * n
    prob, err, used = 0.0, math.inf, 0
    # precision-weighted combination of independent randomised-lattice runs (as scipy._qauto)
    while used < max_points:
        m = int(round(math.sqrt(2) * m))
        p_i, e_i, n_i = _qmvn(m, cov, low, high, rng)
        used += int(n_i)
        if not math.isfinite(err):
            prob, err = float(p_i), float(e_i)
        else:
            w = 1.0 / (1.0 + (e_i / err) ** 2)
            prob += w * (p_i - prob)
            err = math.sqrt(w) * e_i
        if prob > 0 and err <= rel_tol * prob:
            break
    if not math.isfinite(prob) or prob < 0:
        raise FlatpriorError("orthant integration failed (non-finite result); check K")
    logp = math.log(prob) if prob > 0 else -math.inf
    return OrthantResult(logp, float(prob), float(err), float(err / prob) if prob > 0 else math.inf,
                         used, converged=bool(prob > 0 and err <= rel_tol * prob))


def mc_log_orthant_prob(
    K,
    y,
    n_samples: int = 1_000_000,
    seed: int = 0,
    *,
    batch: int | None = None,
    jitter: float = 1e-10,
) -> MCOrthantResult:
    r"""``ln P(sign z = y)`` by plain Monte-Carlo: the fraction of ``z ~ N(0, K)`` in the orthant.

    ``z = L e`` with ``K + jitter * mean(diag K) I = L L^T`` and ``e`` standard normal, drawn in
    batches of ``batch`` samples so memory stays ``O(batch * n)``. The interval is the Wilson
    95 % interval of the hit fraction, mapped to the log scale. Only useful when
    ``P >> 1 / n_samples``.

    Args:
        K: covariance ``[n, n]``.
        y: labels ``[n]`` in ``{±1}`` or ``{0, 1}``.
        n_samples: number of Gaussian draws.
        seed: RNG seed (numpy ``default_rng``).
        batch: draws per batch (default: about 32 MiB of float64 per batch).
        jitter: relative diagonal jitter for the Cholesky factor.
    """
    K, y = as_kernel_and_signs(K, y)
    check_psd(K)
    check_int("n_samples", n_samples, 1)
    n = K.shape[0]
    if batch is None:
        batch = max(1, (4 * 2**20) // n)
    check_positive("batch", batch)
    try:
        L = np.linalg.cholesky(K + jitter * float(np.diagonal(K).mean()) * np.eye(n))
    except np.linalg.LinAlgError:
        # PSD within check_psd's rounding allowance but singular: add that allowance instead
        allowance = PSD_RTOL * n * float(np.abs(np.diagonal(K)).max())
        try:
            L = np.linalg.cholesky(K + allowance * np.eye(n))
        except np.linalg.LinAlgError:
            raise FlatpriorError(
                "kernel K is not positive definite; raise jitter or fix the kernel"
            ) from None
    rng = np.random.default_rng(seed)
    Ly = L * y[:, None]  # rows scaled by the labels: y_i z_i = (D L e)_i
    hits = 0
    done = 0
    while done < n_samples:
        b = min(int(batch), n_samples - done)
        e = rng.standard_normal((b, n))
        hits += int(((e @ Ly.T) > 0).all(axis=1).sum())
        done += b
    lo, hi = wilson_interval(hits, n_samples)
    logp = math.log(hits / n_samples) if hits else -math.inf
    se = math.sqrt((1 - hits / n_samples) / hits) if hits else math.inf
    return MCOrthantResult(
        log_prob=logp,
        ci_low=math.log(float(lo)) if lo > 0 else -math.inf,
        ci_high=math.log(float(hi)),
        std_err=se,
        hits=hits,
        n_samples=int(n_samples),
    )
