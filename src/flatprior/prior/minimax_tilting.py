"""Minimax exponential tilting (Botev 2017) for Gaussian orthant probabilities.

The prior probability of a function f with labels ``y ∈ {±1}^n`` on inputs with NNGP kernel
``K`` is the orthant probability

    P(f) = P(sign z = y),  z ~ N(0, K)
         = P(w ≥ 0),        w = diag(y) z ~ N(0, Σ),  Σ = diag(y) K diag(y).

This module estimates ``log P(f)`` without bias (in P) by importance sampling with Botev's
minimax exponential tilting (Z. I. Botev, "The normal law under linear restrictions:
simulation and estimation via minimax tilting", JRSS-B 79(1), 2017):

1. **Ordering + Cholesky** (Botev's univariate-conditioning heuristic, the Gibson-Glasbey-Elston
   ordering): pivot at each step on the remaining variable with the *smallest* conditional
   probability, conditioning the earlier ones on their truncated means. ``Σ = L Lᵀ`` with the
   rows of L divided by their diagonal ``D`` (unit-diagonal ``L̃``) and bounds ``l̃ = l / D``.
2. **Tilting problem.** With ``a_k(x) = l̃_k − Σ_{j<k} L̃_kj x_j``,

       ψ(x, μ) = Σ_k [ μ_k²/2 − x_k μ_k + log Φ(μ_k − a_k(x)) ],   μ_n = 0,

   is convex in μ and concave in x; the minimax point ``(x*, μ*)`` solves ∇ψ = 0. Because ψ is
   separable in μ for fixed x, we solve the equivalent concave problem
   ``max_x φ(x) = min_μ ψ(x, μ)`` (the inner minimum is n independent 1-D convex problems)
   by damped Newton with the exact Hessian (a Schur complement), which is globally convergent
   from a feasible start. ``exp ψ(x*, μ*)`` is a deterministic **upper bound** on P.
3. **Sampling.** ``Z_k ~ N(μ_k, 1)`` truncated to ``[a_k(Z), ∞)``, drawn by inverse CDF in log
   space (``scipy.special.log_ndtr`` / ``ndtri_exp``, exact far in the tails), sequentially
   through L̃ in column blocks (one GEMM per block), with log-weight

       log w(Z) = Σ_k [ μ_k²/2 − μ_k Z_k + log Φ(μ_k − a_k(Z)) ] = ψ(Z, μ*) ≤ ψ(x*, μ*).

   ``P = E[w]``; ``log P̂ = logsumexp(log w) − log M``; the standard error of log P̂ is the delta
   method ``SE = sd(w) / (mean(w) √M)`` and the interval is ``log P̂ ± z_{(1+c)/2} SE``.

The entry point is :func:`flatprior.prior.tilting.log_prior_tilting`; this module holds the
pieces: the normal hazard, the ordering + Cholesky, the tilting optimisation and the sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.linalg.blas import dsyrk
from scipy.special import log_ndtr, logsumexp, ndtri_exp

from flatprior.errors import FlatpriorError
from flatprior.prior._mills import mills_terms

# ---------------------------------------------------------------------------------------------
# one-dimensional pieces
# ---------------------------------------------------------------------------------------------


def _hazard(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normal hazard ``h(c) = φ(c)/Φ(−c)`` (mean of N(0,1) truncated to [c, ∞)) and ``h'(c)``.

    ``h(c) = r(−c)``, the inverse Mills ratio at ``−c``, and ``h'(c) = h (h − c) ∈ (0, 1)`` with
    ``h − c = z + r(z)`` at ``z = −c``; both from :func:`flatprior.prior._mills.mills_terms`
    (its asymptotic series replace ``h − c`` for ``c > 40``, where it cancels).
    """
    t = mills_terms(-np.asarray(c, dtype=np.float64))
    return t.r, t.r * t.z_plus_r


def _solve_mu(x: np.ndarray, a: np.ndarray, *, tol: float = 1e-13, max_iter: int = 200):
    """Inner problem: ``μ_k = argmin_μ μ²/2 − x_k μ + log Φ(μ − a_k)`` for feasible ``x > a``.

    Stationarity ``f(μ) = μ − x + h(a − μ) = 0``; f is increasing (f' = 1 − h' ∈ (0, 1]) and
    convex (h is convex), and ``f(x) = h(a − x) > 0``, so Newton started at ``μ = x`` decreases
    monotonically to the unique root. Vectorised over k. Returns ``(μ, h(a−μ), h'(a−μ))``.
    """
    mu = x.copy()
    for _ in range(max_iter):
        h, dh = _hazard(a - mu)
        f = mu - x + h
        fp = 1.0 - dh
        step = f / np.maximum(fp, 1e-300)
        mu = mu - step
        if np.all(np.abs(step) <= tol * (1.0 + np.abs(mu))):
            break
    h, dh = _hazard(a - mu)
    return mu, h, dh


# ---------------------------------------------------------------------------------------------
# ordering + Cholesky
# ---------------------------------------------------------------------------------------------


def _cholperm(sigma: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pivoted Cholesky with Botev's univariate-conditioning ordering for ``P(X ≥ lower)``.

    At step j every remaining variable i is conditioned on the earlier ones set to their
    truncated means ``z_{<j}``: ``s_i² = Σ_ii − Σ_{k<j} L_ik²``,
    ``t_i = (lower_i − L_{i,<j} z_{<j}) / s_i``, and the i with the smallest ``Φ(−t_i)`` goes next;
    then ``z_j = h(t_j)``. Cost ``O(n³/3)`` (one GEMV per step).

    Returns:
        ``(L, perm, z)``: lower-triangular ``L`` [n, n] with ``Σ[perm][:, perm] = L Lᵀ``, the
        permutation [n], and the conditional means z [n] (a strictly feasible point).

    Raises:
        FlatpriorError: if Σ is not (numerically) positive definite.
    """
    n = sigma.shape[0]
    S = sigma.copy()
    lo = lower.astype(np.float64).copy()
    perm = np.arange(n)
    L = np.zeros((n, n))
    z = np.zeros(n)
    d = np.diag(S).copy()  # remaining conditional variances
    m = np.zeros(n)  # L_{i,<j} z_{<j}
    tiny = 1e-14 * float(np.max(np.diag(sigma)))
    for j in range(n):
        s = np.sqrt(np.maximum(d[j:], tiny))
        t = (lo[j:] - m[j:]) / s
        i = j + int(np.argmin(log_ndtr(-t)))
        if i != j:  # swap variables i and j everywhere
            S[[i, j]] = S[[j, i]]
            S[:, [i, j]] = S[:, [j, i]]
            L[[i, j]] = L[[j, i]]
            for arr in (lo, perm, d, m):
                arr[[i, j]] = arr[[j, i]]
        if not d[j] > tiny:
            raise FlatpriorError(
                f"kernel K is not positive definite (pivot {j} of {n} has conditional variance "
                f"{d[j]:.3g}); remove duplicate inputs or pass a larger jitter"
            )
        ljj = math.sqrt(d[j])
        L[j, j] = ljj
        if j + 1 < n:
            col = S[j + 1 :, j] - L[j + 1 :, :j] @ L[j, :j]
            L[j + 1 :, j] = col / ljj
            d[j + 1 :] -= L[j + 1 :, j] ** 2
        tj = (lo[j] - m[j]) / ljj
        z[j] = _hazard(np.array([tj]))[0][0]
        if j + 1 < n:
            m[j + 1 :] += L[j + 1 :, j] * z[j]
    return L, perm, z


# ---------------------------------------------------------------------------------------------
# the tilting optimisation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tilting:
    Lt: np.ndarray  # unit lower-triangular L̃ [n, n]
    lt: np.ndarray  # scaled lower bounds l̃ [n]
    mu: np.ndarray  # tilting parameter [n], mu[-1] = 0
    x: np.ndarray  # maximiser [n-1]
    psi: float  # ψ(x*, μ*) = log upper bound
    converged: bool
    n_iter: int
    grad_norm: float


def _phi(Lt, lt, x):
    """``φ(x) = min_μ ψ(x, μ)``, its gradient and pieces for the Hessian; -inf if infeasible."""
    n = lt.shape[0]
    xf = np.zeros(n)
    xf[: n - 1] = x
    a = lt - Lt @ xf + xf  # a_k = l̃_k − Σ_{j<k} L̃_kj x_j (unit diagonal removed)
    if n > 1 and not np.all(x > a[: n - 1]):
        return -np.inf, None
    mu, h, dh = _solve_mu(x, a[: n - 1])
    h_n, dh_n = _hazard(a[n - 1 :])
    val = float(
        np.sum(0.5 * mu * mu - x * mu + log_ndtr(mu - a[: n - 1])) + log_ndtr(-a[n - 1])
    )
    hfull = np.concatenate([h, h_n])
    dhfull = np.concatenate([dh, dh_n])
    # ∂ψ/∂x_j = −μ_j + Σ_{k>j} L̃_kj h_k
    N = Lt[:, : n - 1]
    grad = -mu + N.T @ hfull - hfull[: n - 1]
    return val, (mu, grad, dhfull)


def _neg_hessian(Lt, dh):
    """The negative Hessian ``−∇²φ = Nᵀ H N + G C⁻¹ Gᵀ`` (symmetric positive definite).

    N is the strictly lower part of L̃ (columns < n), ``H = diag(h')``,
    ``G = I + N_{<n}ᵀ H_{<n}``, ``C = diag(1 − h'_{<n})`` (Schur complement of the μ block of
    ∇²ψ).
    """
    n = Lt.shape[0]
    N = np.tril(Lt, -1)[:, : n - 1]
    W1 = np.sqrt(dh)[:, None] * N
    # symmetric rank-k updates (BLAS dsyrk, half the flops of a GEMM); lower triangle only
    M = dsyrk(1.0, W1, trans=1, lower=1)
    G = np.eye(n - 1) + N[: n - 1].T * dh[None, : n - 1]
    W2 = G / np.sqrt(1.0 - dh[: n - 1])[None, :]
    M = dsyrk(1.0, W2, beta=1.0, c=M, trans=0, lower=1, overwrite_c=1)
    return M


def _optimise(Lt, lt, x0, *, tol: float, max_iter: int) -> _Tilting:
    """Damped Newton ascent on the concave ``φ(x)`` from a strictly feasible ``x0``.

    Stops when the Newton decrement ``λ² = gᵀ(−∇²φ)⁻¹g`` (≈ 2 × the remaining gap in φ) falls
    below ``tol``; backtracking (Armijo) keeps every iterate feasible.
    """
    n = lt.shape[0]
    if n == 1:
        return _Tilting(Lt, lt, np.zeros(1), np.zeros(0), float(log_ndtr(-lt[0])), True, 0, 0.0)
    x = x0.copy()
    val, aux = _phi(Lt, lt, x)
    if not np.isfinite(val):
        raise FlatpriorError("internal: tilting start point is infeasible; please report this")
    converged = False
    it = 0
    gnorm = float("inf")
    for it in range(1, max_iter + 1):  # noqa: B007
        mu, grad, dh = aux
        gnorm = float(np.max(np.abs(grad)))
        M = _neg_hessian(Lt, dh)
        try:
            step = cho_solve(cho_factor(M, lower=True, overwrite_a=True, check_finite=False),
                             grad, check_finite=False)
        except np.linalg.LinAlgError:
            step = grad / max(1.0, gnorm)
        dec2 = float(grad @ step)
        if dec2 <= tol:
            converged = True
            break
        t = 1.0
        while t > 1e-12:
            nv, naux = _phi(Lt, lt, x + t * step)
            if np.isfinite(nv) and nv >= val + 1e-4 * t * dec2:
                break
            t *= 0.5
        else:
            break  # line search failed: report non-convergence
        x = x + t * step
        val, aux = nv, naux
    mu_full = np.concatenate([aux[0], [0.0]])
    return _Tilting(Lt, lt, mu_full, x, val, converged, it, gnorm)


def _setup(sigma: np.ndarray, lower: np.ndarray, *, tol: float, max_iter: int) -> _Tilting:
    L, perm, z = _cholperm(sigma, lower)
    D = np.diag(L).copy()
    Lt = L / D[:, None]
    lt = lower[perm] / D
    return _optimise(Lt, lt, z[:-1], tol=tol, max_iter=max_iter)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def _sample_log_weights(tl: _Tilting, n_samp: int, seed_seq: np.random.SeedSequence,
                        block: int = 64) -> np.ndarray:
    """Draw ``n_samp`` tilted samples; return their log-weights ``ψ(Z, μ*)`` [n_samp].

    Memory ``O(n · n_samp)``. The contribution of earlier column blocks is one GEMM; inside a
    block the conditional bounds are updated row by row.
    """
    rng = np.random.default_rng(seed_seq)
    Lt, lt, mu = tl.Lt, tl.lt, tl.mu
    n = lt.shape[0]
    Z = np.empty((n, n_samp))
    logw = np.zeros(n_samp)
    for s in range(0, n, block):
        e = min(n, s + block)
        A = np.repeat(lt[s:e, None], n_samp, axis=1)
        if s > 0:
            A -= Lt[s:e, :s] @ Z[:s]
        for k in range(s, e):
            a = A[k - s]
            if k > s:
                a = a - Lt[k, s:k] @ Z[s:k]
            c = a - mu[k]
            lp = log_ndtr(-c)  # log P(T ≥ c), T ~ N(0, 1)
            logw += lp
            if k == n - 1:  # the last variable only contributes its probability (μ_n = 0)
                break
            # inverse CDF of the upper tail in log space: P(T ≥ t) = V · P(T ≥ c), V ~ U(0, 1]
            v = 1.0 - rng.random(n_samp)
            t = -ndtri_exp(np.log(v) + lp)
            t = np.maximum(t, c)
            zk = mu[k] + t
            Z[k] = zk
            logw += 0.5 * mu[k] * mu[k] - mu[k] * zk
    return logw


def _summary(logw: np.ndarray) -> tuple[float, float, float]:
    """``(log mean w, delta-method SE of it, ESS)`` from log-weights, without overflow."""
    m = logw.shape[0]
    lse = float(logsumexp(logw))
    log_p = lse - math.log(m)
    w = np.exp(logw - logw.max())
    mean = float(w.mean())
    sd = float(w.std(ddof=1)) if m > 1 else float("inf")
    se = sd / (mean * math.sqrt(m))
    ess = float(w.sum() ** 2 / np.sum(w * w))
    return log_p, se, ess
