"""EP-guided twisted sequential Monte-Carlo for Gaussian orthant probabilities.

Where minimax tilting is not enough. The tilting only shifts the mean of each sequential
conditional; for complex functions on hundreds of strongly correlated inputs (MNIST arc-cosine
kernel: mean |correlation| ≈ 0.97) the log-weights spread by ≈ 0.35 √n nats (13 nats at
n = 1500), the effective sample size collapses and the delta-method SE is meaningless. For that
regime ``proposal="ep"`` runs **twisted sequential Monte-Carlo**: the proposal is the EP
Gaussian ``q = N(m, V)`` of the truncated prior, sampled sequentially with truncation to
``x ≥ 0``; since ``N(x; 0, Σ) Π_i t_i(x_i) = Z_q N(x; m, V)`` for the EP sites ``t_i``, the
incremental weight of step k is ``P_q(x_k ≥ 0 | x_{<k}) / t_k(x_k)``; particles are resampled
when the ESS drops below N/2. Each run's ``Ẑ`` is unbiased for P (Del Moral 2004); the interval
comes from independent replicate runs. ``proposal="auto"`` uses minimax tilting unless a pilot
batch shows degenerate weights. On the MNIST setting at n = 1500, 64 000 particles in 16
replicates give SE 0.05-0.07 in ≈ 30 s on 2 busy cores (``benchmarks/bench_tilting.py``). Use
few large replicates (≥ n particles each): the replicate spread, not the count, decides whether
the SE can be trusted (``replicate_log_sd`` ≲ 0.3 nats is good; > 0.5 is flagged).

The entry point is :func:`flatprior.prior.tilting.log_prior_tilting` (``proposal="ep"``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr, logsumexp, ndtri_exp

from flatprior.errors import FlatpriorError
from flatprior.prior.minimax_tilting import _cholperm


@dataclass(frozen=True)
class _EPProposal:
    C: np.ndarray  # Cholesky factor [n, n] of the EP covariance V in the sampling order
    perm: np.ndarray  # sampling order [n] (indices into the input points)
    m: np.ndarray  # EP mean in the sampling order [n]
    tau: np.ndarray  # site precisions in the sampling order [n]
    nu: np.ndarray  # site natural means in the sampling order [n]
    log_zq: float  # log ∫ N(x; 0, Σ) Π_i exp(−τ_i x_i²/2 + ν_i x_i) dx
    ep_log_prob: float
    converged: bool
    n_iter: int


def _ep_proposal(K: np.ndarray, ys: np.ndarray, sigma: np.ndarray, ep_tol: float) -> _EPProposal:
    """Gaussian EP approximation ``q = N(m, V)`` of ``N(0, Σ)`` restricted to ``x ≥ 0``.

    Uses :func:`flatprior.prior.ep.log_prior_ep` for the sites (converted from ``z`` to the
    standardised ``x_i = y_i z_i / √K_ii``: ``τ' = τ K_ii``, ``ν' = ν y_i √K_ii``), then
    ``V = (Σ⁻¹ + T)⁻¹ = Σ − Σ T^½ B⁻¹ T^½ Σ``, ``B = I + T^½ Σ T^½``, ``m = V ν'`` and
    ``log Z_q = −½ log|B| + ½ ν'ᵀ m``, so that ``N(x; 0, Σ) Π_i t_i(x_i) = Z_q N(x; m, V)``.
    """
    from scipy.linalg import solve_triangular

    from flatprior.prior.ep import log_prior_ep

    with warnings.catch_warnings():  # EP's own non-convergence only costs variance here
        warnings.simplefilter("ignore")
        ep = log_prior_ep(K, ys, tol_log_prob=ep_tol, max_iter=200)
    sd = np.sqrt(np.diag(K))
    tau = np.maximum(ep.site_tau * sd * sd, 0.0)
    nu = ep.site_nu * ys * sd
    n = sigma.shape[0]
    s = np.sqrt(tau)
    B = np.eye(n) + s[:, None] * sigma * s[None, :]
    try:
        Lb = np.linalg.cholesky(B)
    except np.linalg.LinAlgError:
        raise FlatpriorError("EP proposal: I + T^1/2 K T^1/2 is not positive definite") from None
    Vt = solve_triangular(Lb, s[:, None] * sigma, lower=True)
    V = sigma - Vt.T @ Vt
    V = 0.5 * (V + V.T)
    m = V @ nu
    log_zq = float(-np.sum(np.log(np.diag(Lb))) + 0.5 * nu @ m)
    C, perm, _ = _cholperm(V, -m)
    return _EPProposal(C, perm, m[perm], tau[perm], nu[perm], log_zq, float(ep.log_prob),
                       bool(ep.converged), int(ep.n_iter))


def _smc_run(prop: _EPProposal, n_part: int, seed_seq: np.random.SeedSequence,
             threshold: float = 0.5, block: int = 64) -> tuple[float, int]:
    """One SMC run; returns ``(log Ẑ, number of resampling steps)``. ``E[Ẑ] = P``.

    Sampling order k = 1..n: ``x = m + C u`` with ``u_k ~ N(0, 1)`` truncated so that
    ``x_k ≥ 0`` (probability ``P_k``), incremental log-weight ``log P_k − log t_k(x_k)``; the
    intermediate targets ``∝ Π_{j≤k} q(x_j | x_{<j}) 1[x_j ≥ 0] / t_j(x_j)`` are the truncated
    prior twisted by the EP sites of the later points (twisted SMC: Guarniero, Johansen & Lee
    2017; Heng et al. 2020). Systematic resampling when ESS < ``threshold``·N; the
    normalising-constant estimate ``Z_q Π_t mean(w_t)`` is unbiased (Del Moral 2004).
    """
    rng = np.random.default_rng(seed_seq)
    C, m, tau, nu = prop.C, prop.m, prop.tau, prop.nu
    n = m.shape[0]
    U = np.empty((n, n_part))
    lw = np.zeros(n_part)
    log_z = prop.log_zq
    n_res = 0
    log_n = math.log(n_part)
    for s in range(0, n, block):
        e = min(n, s + block)
        A = np.repeat(m[s:e, None], n_part, axis=1)
        if s > 0:
            A += C[s:e, :s] @ U[:s]
        for k in range(s, e):
            base = A[k - s]
            if k > s:
                base = base + C[k, s:k] @ U[s:k]
            ckk = C[k, k]
            a = -base / ckk
            lp = log_ndtr(-a)
            v = 1.0 - rng.random(n_part)
            t = np.maximum(-ndtri_exp(np.log(v) + lp), a)
            U[k] = t
            xk = base + ckk * t
            lw += lp + 0.5 * tau[k] * xk * xk - nu[k] * xk
            if k == n - 1:
                break
            mx = lw.max()
            w = np.exp(lw - mx)
            if w.sum() ** 2 < threshold * n_part * np.sum(w * w):
                log_z += float(mx + math.log(w.sum())) - log_n
                cw = np.cumsum(w)
                cw /= cw[-1]
                pos = (rng.random() + np.arange(n_part)) / n_part
                idx = np.minimum(np.searchsorted(cw, pos), n_part - 1)
                U[: k + 1] = U[: k + 1, idx]
                A = A[:, idx]
                lw = np.zeros(n_part)
                n_res += 1
    log_z += float(logsumexp(lw)) - log_n
    return log_z, n_res


def _replicate_summary(log_z: np.ndarray) -> tuple[float, float]:
    """Mean of independent unbiased estimates ``Ẑ_r`` in log space and its delta-method SE."""
    r = log_z.shape[0]
    log_p = float(logsumexp(log_z)) - math.log(r)
    w = np.exp(log_z - log_z.max())
    se = float(w.std(ddof=1) / (w.mean() * math.sqrt(r)))
    return log_p, se
