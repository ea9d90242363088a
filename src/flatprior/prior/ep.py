r"""Expectation propagation for the Gaussian orthant probability log P(f) = log P(sign z = y).

Model: ``z ~ N(0, K)`` and the Heaviside (zero-temperature) likelihood
``p(y_i | z_i) = 1[y_i z_i > 0]``; the marginal likelihood is the orthant probability
``P(f)`` of Zhang et al. (arXiv 2103.06219). Parallel EP (Minka 2001; Rasmussen & Williams 2006,
§3.6; van Gerven et al. 2010) replaces each likelihood factor by a Gaussian site
``t_i(z_i) ∝ exp(-tau_i z_i^2 / 2 + nu_i z_i)`` and updates all sites at once from the
moments of the tilted (truncated Gaussian) marginals.

Numerics (float64, LAPACK through scipy, which uses both cores):

* one iteration = one Cholesky ``B = I + S^{1/2} K S^{1/2} = L L^T`` (``S = diag(tau)``) plus one
  triangular inverse ``L^{-1}`` (LAPACK ``dtrtri``), both in place in a single ``[n, n]`` buffer;
  ``diag(B^{-1})`` are the column norms of ``L^{-1}``, and
  ``Sigma_ii = (1 - B^{-1}_ii) / tau_i``, cavity variance ``v_i = Sigma_ii / B^{-1}_ii``
  (Schur complement identity ``B^{-1}_ii = 1 / (1 + tau_i v_i)``). No ``n x n`` solve against
  ``K`` and no ``n x n`` product is needed; the posterior mean costs four mat-vecs.
* ``1 - B^{-1}_ii`` loses digits when site ``i`` is very weak (``tau_i Sigma_ii`` tiny); for
  those sites ``Sigma_ii = K_ii - ||L^{-1} S^{1/2} K e_i||^2`` is computed directly.
* the likelihood is a separate object (:mod:`flatprior.prior.likelihoods`, Heaviside or probit)
  that gives the tilted moments; they use the inverse Mills ratio of
  :mod:`flatprior.prior._mills` (``erfcx``, plus asymptotic series deep in the wrong tail), so
  nothing underflows or cancels for cavity means far on the wrong side.
* the EP log marginal likelihood follows Rasmussen & Williams eq. (3.65) in the form of GPML's
  ``infEP`` (eq. 3.73 style), evaluated at the current sites with their own cavities.

Stopping rules of :func:`log_prior_ep` (checked after every iteration; the first one met
ends the run):

* ``tol`` (default ``1e-6``, GPy's rule): mean squared change of the site precisions and of
  the site natural means both below ``tol``; unlike GPy each change is divided by
  ``1 + |site|``, so sites far above 1 (near-duplicate points with opposite labels reach
  ``tau ~ 1e6``, whose rounding noise is ``O(1)``) are judged relatively.
* ``tol_log_prob`` (off by default): ``|Δ ln P| / (1 - damping) <= tol_log_prob *
  max(1, |ln P|)``. Cheaper on well-behaved problems (MNIST n = 10 000, true labels, with
  Anderson acceleration: 12 instead of 15 updates at 1e-6, value 3e-7 relative from the
  site-rule value; without acceleration 14 instead of 34); on strongly
  correlated kernels that need damping neither rule is within 1e-6 of the fixed point
  (measured on 52 small cases: worst site rule 7e-4 relative, on the Boolean constant
  function, where GPy's mean-squared rule allows rms site changes of 1e-3; worst
  log-P rule 4.9e-6, at 17 vs 15 iterations on average).

Cost per iteration: one Cholesky and one triangular inverse of an ``n x n`` matrix
(``~2/3 n^3`` flops, the least any exact ``diag(Sigma)`` costs), memory: two ``n x n``
float64 arrays. Single precision is no way out: near-duplicate MNIST images drive site
precisions to ``1e4-1e6`` and ``B`` to condition numbers where float32 EP diverges
(measured at n = 4000). Measured at n = 10 000 (MNIST arc-cosine kernel, 2 cores):
Nystrom warm start (rank 500) + Anderson from the first exact update: 7 updates, 52.5 s,
18 Cholesky times; Anderson alone: 15 updates, 106 s, 36; plain parallel EP: 34 updates,
265 s, 86.

Damping: undamped parallel EP oscillates with period 2 on strongly correlated kernels with equal
labels (e.g. correlation 0.95, n = 15: log P alternates between -1.8 and -9.1 forever); with
``adaptive_damping`` the damping is raised (0.5, 0.75, ..., 0.95) when log P changes direction
twice in a row without shrinking 2x. Damping does not move the fixed point, only the path.

Acceleration: Anderson acceleration of the site iteration (measured on MNIST arc-cosine kernels:
12 instead of 18 updates at n = 2000) and a warm start from EP on a Nystrom approximation of
``K`` (``warm_rank`` random landmarks, diagonal kept exact, ``O(n warm_rank^2)`` per
iteration), which skips most of the transient that parallel EP goes through from zero sites at
the cost of one extra exact evaluation (measured at n = 10 000: 7 exact updates with 500 or 700
landmarks, 8 with 1000).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from scipy.linalg import lapack, solve_triangular

from flatprior.errors import FlatpriorError, check_choice, check_int, check_positive
from flatprior.prior._mills import mills_terms
from flatprior.prior._threads import blas_threads, factorisation_threads
from flatprior.prior._validate import as_kernel_and_signs, check_psd
from flatprior.prior.likelihoods import GaussianCDFLikelihood, make_likelihood

__all__ = ["EPResult", "EPState", "heaviside_tilted_moments", "log_prior_ep", "log_prior_probit"]

# Sites with 1 - B^{-1}_ii below this get Sigma_ii from the direct (K-side) formula.
_WEAK_SITE = 1e-7
# |1 - |r_ij|| below this: the pair is the same Gaussian variable up to rounding (a few ulp of
# K_ij / sqrt(K_ii K_jj)); r = 1 - 1e-12 is still a genuine (P = arccos(r) / 2 pi) pair.
_SAME_POINT = 1e-14
# "auto" warm start from Nystrom EP from this n on (below it exact iterations are cheap)
_WARM_MIN_N = 2048
# Anderson acceleration starts once the mean squared relative site change is below this
# (from the first update after a warm start, which skips the non-linear transient)
_ANDERSON_START = 0.1


@dataclass(frozen=True)
class EPResult:
    """Result of :func:`log_prior_ep`.

    Attributes:
        log_prob: EP estimate of ``ln P(sign z = y)`` (natural log, ``<= 0`` in exact arithmetic
            for a probability; EP itself is an approximation).
        converged: whether the stopping rule was met within ``max_iter`` iterations.
        n_iter: number of parallel site updates done.
        max_site_change: ``max |Δtau|, |Δnu|`` of the last update (sites of the kernel scaled
            to unit mean diagonal).
        log_prob_change: ``|Δ log_prob|`` between the last two iterations.
        stop_rule: ``"sites"`` or ``"log_prob"`` (which criterion ended the run) or ``"max_iter"``.
        jitter: diagonal jitter added to ``K`` (absolute, in the units of the input ``K``).
        damping: damping in use at the end (raised automatically when EP oscillated).
        site_tau, site_nu: site natural parameters, in the units of the input ``K``.
        post_mean, post_var: marginal means and variances of the EP posterior ``q(z)``.
        history: ``log_prob`` after each iteration (first entry: the starting sites, all zero
            or the Nystrom warm start).
    """

    log_prob: float
    converged: bool
    n_iter: int
    max_site_change: float
    log_prob_change: float
    stop_rule: str
    jitter: float
    damping: float
    site_tau: np.ndarray = field(repr=False)
    site_nu: np.ndarray = field(repr=False)
    post_mean: np.ndarray = field(repr=False)
    post_var: np.ndarray = field(repr=False)
    history: tuple[float, ...] = field(repr=False, default=())
    # :class:`flatprior.prior.api.LogPriorResult`: EP is deterministic, it has no sampling error
    std_err: ClassVar[float | None] = None
    ci_low: ClassVar[float | None] = None
    ci_high: ClassVar[float | None] = None

    @property
    def log10_prob(self) -> float:
        """``log10 P(f)``."""
        return self.log_prob / math.log(10.0)


def heaviside_tilted_moments(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Stable moment ratios of ``N(t | 0, 1) 1[t > -z]`` (a standard normal truncated at -z).

    With ``r = N(z)/Phi(z)`` (inverse Mills ratio) the truncated normal ``t`` has mean ``r`` and
    variance ``1 - r (z + r)``. Returns ``(r, one_minus_a, h)`` with ``a = r (z + r)`` and
    ``h = 1 + z (z + r)``; both ``1 - a`` and ``h`` are computed without cancellation (series in
    ``1/z^2`` for ``z < -40``; see :func:`flatprior.prior._mills.mills_terms`).

    Args:
        z: ``y * m / sqrt(v)`` for cavity mean ``m`` and variance ``v``, shape ``[n]``.
    """
    t = mills_terms(z)
    return t.r, t.one_minus_a, t.h


class _NotPD(Exception):
    """Internal: the factorisation failed or produced a non-positive variance."""


@dataclass(frozen=True)
class EPState:
    """EP at fixed sites: the sites, the posterior marginals, the cavities and log Z.

    All arrays ``[n]``, in the units of the kernel EP runs on (scaled to unit mean diagonal).

    Attributes:
        tau, nu: site precisions and natural means.
        mu, sigma: marginal means and variances of the EP posterior ``q(z)``.
        z: standardised cavity means ``y m / sqrt(v + s2)`` (what the likelihood needs).
        tau_cav: cavity precisions ``1 / v``.
        energy: EP log marginal likelihood (Rasmussen & Williams 2006, eq. 3.65).
    """

    tau: np.ndarray
    nu: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    z: np.ndarray
    tau_cav: np.ndarray
    energy: float

    @classmethod
    def prior(cls, diagK: np.ndarray) -> EPState:
        """All sites zero: posterior = prior, ``log Z = n log Phi(0)``."""
        n = diagK.shape[0]
        return cls(np.zeros(n), np.zeros(n), np.zeros(n), diagK.copy(), np.zeros(n),
                   1.0 / diagK, n * math.log(0.5))


def _posterior_marginals(K: np.ndarray, diagK: np.ndarray, tau: np.ndarray, nu: np.ndarray,
                         buf: np.ndarray):
    """``(mu, Sigma_ii, diag B^{-1}, half log|B|)`` for sites ``(tau, nu)``.

    ``buf`` is a Fortran-ordered ``[n, n]`` work array (overwritten).
    """
    n = K.shape[0]
    sq = np.sqrt(tau)
    # B = I + S^1/2 K S^1/2, written through the C-ordered transpose of the F-ordered buffer
    # (B is symmetric), so both passes are contiguous
    bt = buf.T
    np.multiply(K, sq[:, None], out=bt)
    bt *= sq[None, :]
    idx = np.arange(n)
    buf[idx, idx] += 1.0
    L, info = lapack.dpotrf(buf, lower=1, overwrite_a=1, clean=1)
    if info != 0:
        raise _NotPD(f"Cholesky of B failed (info={info})")
    half_logdet = float(np.log(np.diagonal(L)).sum())
    Linv, info = lapack.dtrtri(L, lower=1, overwrite_c=1)
    if info != 0:
        raise _NotPD(f"triangular inverse failed (info={info})")
    # diag(B^{-1})_i = sum_k Linv[k, i]^2 (column norms; columns are contiguous in F order)
    binv = np.einsum("ki,ki->i", Linv, Linv)
    d = 1.0 - binv  # = tau_i Sigma_ii
    weak = d < _WEAK_SITE
    sigma = np.empty(n)
    ok = ~weak
    sigma[ok] = d[ok] / tau[ok]
    if weak.any():
        cols = np.flatnonzero(weak)
        for lo in range(0, cols.size, 256):
            c = cols[lo : lo + 256]
            w = Linv @ (sq[:, None] * K[:, c])
            sigma[c] = diagK[c] - np.einsum("ij,ij->j", w, w)
    # posterior mean mu = K (nu - S^1/2 B^{-1} S^1/2 K nu), B^{-1} = Linv^T Linv
    kn = K @ nu
    alpha = nu - sq * (Linv.T @ (Linv @ (sq * kn)))
    mu = K @ alpha
    return mu, sigma, binv, half_logdet


def _posterior_and_energy(K: np.ndarray, diagK: np.ndarray, y: np.ndarray, tau: np.ndarray,
                          nu: np.ndarray, buf: np.ndarray,
                          lik: GaussianCDFLikelihood) -> EPState:
    """Posterior marginals, cavities and the EP log marginal likelihood for sites (tau, nu)."""
    mu, sigma, binv, half_logdet = _posterior_marginals(K, diagK, tau, nu, buf)
    if not (np.isfinite(sigma).all() and np.isfinite(mu).all()):
        raise FlatpriorError("EP produced NaN/inf posterior moments; the kernel is ill-posed")
    if (sigma <= 0).any() or (binv <= 0).any():
        raise _NotPD("non-positive posterior variance")
    # cavity: v = Sigma_ii / B^{-1}_ii,  m = (mu_i - Sigma_ii nu_i) / B^{-1}_ii
    var_cav = sigma / binv
    tau_cav = 1.0 / var_cav
    m_cav = (mu - sigma * nu) / binv
    z = lik.standardized_cavity_mean(y, m_cav, tau_cav)
    log_z = lik.log_tilted_normalizer(z)
    nu_cav = m_cav * tau_cav
    # R&W eq. (3.65) as in GPML infEP (zero prior mean):
    # log Z = sum lZ - sum log L_ii + nu^T Sigma nu / 2
    #         + nu_c^T ((tau/tau_c) nu_c - 2 nu) / (2 (tau + tau_c))
    #         - sum nu^2 / (2 (tau_c + tau)) + sum log(1 + tau/tau_c) / 2
    tsum = tau + tau_cav
    energy = (
        float(log_z.sum())
        - half_logdet
        + 0.5 * float(nu @ mu)
        + 0.5 * float(nu_cav @ ((tau / tau_cav * nu_cav - 2.0 * nu) / tsum))
        - 0.5 * float((nu * nu / tsum).sum())
        + 0.5 * float(np.log1p(tau / tau_cav).sum())
    )
    return EPState(tau, nu, mu, sigma, z, tau_cav, energy)


class _Anderson:
    """Anderson acceleration (type II, Walker & Ni 2011) of the fixed-point map sites -> sites.

    Parallel EP converges linearly (each update shrinks the error by a roughly constant factor,
    measured 0.6-0.7 on MNIST kernels); extrapolating from the last ``memory`` updates cuts the
    number of factorisations. Safeguards: the caller starts it only once the site changes are
    small (the early transient from zero sites is not near-linear; after a warm start at once)
    and never with damping; a candidate with a non-positive or
    non-finite precision falls back to the plain update, and the memory is cleared when the
    residual grows 10-fold. The fixed point, hence the result, is the one of plain EP.
    """

    def __init__(self, memory: int):
        self.memory = memory
        self.xs: list[np.ndarray] = []
        self.gs: list[np.ndarray] = []
        self.last_res = math.inf

    def reset(self) -> None:
        self.xs, self.gs = [], []

    def step(self, tau, nu, new_tau, new_nu, residual):
        if residual > 10.0 * self.last_res:
            self.reset()
        self.last_res = residual
        x = np.concatenate([tau, nu])
        g = np.concatenate([new_tau, new_nu]) - x
        self.xs = [*self.xs[-self.memory :], x]
        self.gs = [*self.gs[-self.memory :], g]
        if len(self.xs) < 2:
            return new_tau, new_nu
        dx = np.diff(np.array(self.xs), axis=0).T  # [2n, k]
        dg = np.diff(np.array(self.gs), axis=0).T
        gamma = np.linalg.lstsq(dg, g, rcond=None)[0]
        cand = x + g - (dx + dg) @ gamma
        n = tau.size
        if not np.isfinite(cand).all() or (cand[:n] <= 0).any():
            self.reset()
            return new_tau, new_nu
        return cand[:n], cand[n:]


def _site_change(tau, nu, new_tau, new_nu) -> float:
    """Mean squared site change, the larger of precisions and natural means.

    GPy's rule, made relative for large sites (``|site| >> 1``), whose last digits jitter with
    the conditioning of ``B`` and would never meet an absolute rule.
    """
    return max(float(np.mean(((new_tau - tau) / (1.0 + np.abs(tau))) ** 2)),
               float(np.mean(((new_nu - nu) / (1.0 + np.abs(nu))) ** 2)))


def _nystrom_sites(K, y, rank, lik: GaussianCDFLikelihood, seed=0, max_iter=20, tol=1e-3):
    """Approximate EP sites for a warm start of exact EP; ``None`` if it fails.

    From the kernel ``Q Q^T + diag(d)`` (Nystrom on ``rank`` random landmarks, diagonal kept
    exact).

    With ``R = I + Q^T diag(g) Q = C C^T`` and ``g = tau / (1 + d tau)``, Woodbury gives
    ``Sigma = diag(d / (1 + d tau)) + G G^T`` with ``G = diag(1 / (1 + d tau)) Q C^{-T}``:
    ``O(n rank^2)`` per iteration instead of ``O(n^3)``.
    """
    n = K.shape[0]
    idx = np.sort(np.random.default_rng(seed).choice(n, size=rank, replace=False))
    try:
        c = np.linalg.cholesky(K[np.ix_(idx, idx)] + 1e-8 * np.eye(rank))
    except np.linalg.LinAlgError:
        return None
    q = np.linalg.solve(c, K[idx, :]).T  # [n, rank], Q Q^T = Nystrom approximation
    d = np.maximum(np.diagonal(K) - np.einsum("ij,ij->i", q, q), 1e-10)
    tau, nu = np.zeros(n), np.zeros(n)
    accel = _Anderson(5)
    with np.errstate(all="ignore"):
        for _ in range(max_iter):
            w = 1.0 / (1.0 + d * tau)
            r = np.eye(rank) + q.T @ ((tau * w)[:, None] * q)
            try:
                cr = np.linalg.cholesky(r)
            except np.linalg.LinAlgError:
                return None
            g = solve_triangular(cr, (w[:, None] * q).T, lower=True).T  # [n, rank]
            sigma = d * w + np.einsum("ij,ij->i", g, g)
            mu = d * w * nu + g @ (g.T @ nu)
            tau_cav = np.maximum(1.0 / sigma - tau, 1e-12)
            m_cav = (mu / sigma - nu) / tau_cav
            z = lik.standardized_cavity_mean(y, m_cav, tau_cav)
            new_tau, new_nu = lik.site_update(z, y, tau_cav)
            if not (np.isfinite(new_tau).all() and np.isfinite(new_nu).all()):
                return None
            site_sq = _site_change(tau, nu, new_tau, new_nu)
            if site_sq < _ANDERSON_START:
                new_tau, new_nu = accel.step(tau, nu, new_tau, new_nu, site_sq)
            tau, nu = np.maximum(new_tau, 1e-300), new_nu
            if site_sq < tol:
                break
    return tau, nu


@dataclass(frozen=True)
class _EPOptions:
    """The iteration's settings (validated by :func:`log_prior_ep`)."""

    tol: float
    tol_log_prob: float | None
    max_iter: int
    damping: float
    adaptive: bool
    anderson: int
    warm_rank: int


@dataclass(frozen=True)
class _EPRun:
    """Outcome of the site iteration (see :class:`EPResult` for the meaning of the fields)."""

    state: EPState
    stop: str
    n_iter: int
    max_site_change: float
    log_prob_change: float
    history: list[float]
    damping: float


def _start(K, diagK, y, buf, lik, warm_rank) -> tuple[EPState, bool]:
    """Starting sites: the Nystrom warm start if asked for and it works, else all zero."""
    warm = _nystrom_sites(K, y, warm_rank, lik) if warm_rank > 0 else None
    if warm is not None:
        try:  # one exact evaluation at the approximate sites; the iteration goes on from there
            return _posterior_and_energy(K, diagK, y, *warm, buf, lik), True
        except (_NotPD, FlatpriorError):  # start cold instead (Anderson then waits as usual)
            pass
    return EPState.prior(diagK), False


def _raised_damping(history: list[float], damping: float) -> float:
    """The damping for the next sweep (raised when EP oscillates).

    Parallel EP oscillates (period 2) on strongly correlated kernels: when log Z flips
    direction twice in a row without shrinking 2x, damp harder (0 -> 0.5 -> 0.75 ... 0.95).
    """
    if len(history) < 5 or damping >= 0.95:
        return damping
    d1, d2, d3 = (history[-1] - history[-2], history[-2] - history[-3],
                  history[-3] - history[-4])
    big = abs(d1) > 1e-7 * max(1.0, abs(history[-1]))  # not just rounding noise
    if big and d1 * d2 < 0 and d2 * d3 < 0 and abs(d1) >= 0.5 * abs(d2) >= 0.25 * abs(d3):
        return min(0.95, max(0.5, 1.0 - (1.0 - damping) / 2.0))
    return damping


def _run_ep(K, y, opts: _EPOptions, lik: GaussianCDFLikelihood, buf) -> _EPRun:
    """Parallel EP from zero sites (or the warm start) until a stopping rule is met."""
    diagK = np.diagonal(K).copy()
    st, warm = _start(K, diagK, y, buf, lik, opts.warm_rank)
    history = [st.energy]
    n_iter, dmax, dlog, stop, damping = 0, math.inf, math.inf, "max_iter", opts.damping
    accel = _Anderson(opts.anderson) if opts.anderson > 0 else None
    while n_iter < opts.max_iter:
        tau, nu = st.tau, st.nu
        new_tau, new_nu = lik.site_update(st.z, y, st.tau_cav)
        if not (np.isfinite(new_tau).all() and np.isfinite(new_nu).all()):
            raise FlatpriorError("EP site update produced NaN/inf; the kernel is ill-posed")
        # convergence is judged on the undamped update (damping only slows the steps)
        site_sq = _site_change(tau, nu, new_tau, new_nu)
        dmax = max(float(np.abs(new_tau - tau).max()), float(np.abs(new_nu - nu).max()))
        if site_sq < opts.tol and n_iter > 0:
            stop = "sites"
            break
        if opts.adaptive:
            damping = _raised_damping(history, damping)
        if damping > 0.0:
            new_tau = (1.0 - damping) * new_tau + damping * tau
            new_nu = (1.0 - damping) * new_nu + damping * nu
        elif accel is not None and (warm or site_sq < _ANDERSON_START):
            new_tau, new_nu = accel.step(tau, nu, new_tau, new_nu, site_sq)
        n_iter += 1
        # a site precision that underflows to 0 would break S^-1/2; floor it far below relevance
        st_new = _posterior_and_energy(K, diagK, y, np.maximum(new_tau, 1e-300), new_nu, buf,
                                       lik)
        if not math.isfinite(st_new.energy):
            raise FlatpriorError("EP log marginal likelihood is NaN/inf; the kernel is ill-posed")
        dlog = abs(st_new.energy - st.energy)
        st = st_new
        history.append(st.energy)
        # damping shrinks each step by (1 - damping): judge the undamped step
        step = dlog / (1.0 - damping)
        if opts.tol_log_prob is not None and step <= opts.tol_log_prob * max(1.0, abs(st.energy)):
            stop = "log_prob"
            break
    return _EPRun(st, stop, n_iter, dmax, dlog, history, damping)


def _ep_with_jitter(K, ysign, buf, jit, max_jitter, opts: _EPOptions,
                    lik: GaussianCDFLikelihood) -> tuple[_EPRun, float]:
    """Run EP, restarting with escalating diagonal jitter while the kernel is not PD.

    Returns the run and the relative jitter added to ``K``'s diagonal (in place).
    """
    added = 0.0
    idx = np.arange(K.shape[0])
    while True:
        if jit > added:
            K[idx, idx] += jit - added
            added = jit
        try:
            return _run_ep(K, ysign, opts, lik, buf), added
        except _NotPD as exc:
            nxt = 1e-10 if jit == 0.0 else jit * 100.0
            if nxt > max_jitter * (1 + 1e-12):
                raise FlatpriorError(
                    f"kernel K is not positive definite enough for EP ({exc}) even with "
                    f"relative jitter {jit:g}; fix the kernel or raise max_jitter"
                ) from None
            warnings.warn(
                f"EP: {exc}; retrying with relative jitter {nxt:g} on the kernel diagonal",
                RuntimeWarning,
                stacklevel=2,
            )
            jit = nxt


def _make_options(n, tol, tol_log_prob, max_iter, damping, adaptive_damping, anderson,
                  warm_start, warm_rank) -> _EPOptions:
    """The run options of EP on ``n`` points (arguments already checked by _check_options)."""
    rank = 0
    if warm_start == "nystrom" or (warm_start == "auto" and n >= _WARM_MIN_N):
        rank = min(int(warm_rank) if warm_rank is not None else min(500, n // 4), n - 1)
    return _EPOptions(tol=float(tol), tol_log_prob=tol_log_prob, max_iter=int(max_iter),
                      damping=float(damping), adaptive=bool(adaptive_damping),
                      anderson=int(anderson), warm_rank=rank)


def _ep_blas_threads(n: int, n_threads: int | None) -> int | None:
    """BLAS threads of EP on ``n`` points.

    ``n_threads``, by default 1 for ``n < 2048`` (threaded OpenBLAS on small matrices is slow
    on a busy machine); always 1 above the factorisation limit (``factorisation_threads``).
    """
    if n_threads is None:
        n_threads = 1 if n < 2048 else None
    return factorisation_threads(n, n_threads)


def _check_options(likelihood, tol, tol_log_prob, max_iter, damping, jitter, max_jitter,
                   warm_start, warm_rank, anderson) -> None:
    check_choice("EP likelihood", likelihood, ["heaviside", "probit"])
    check_positive("tol", tol)
    if tol_log_prob is not None:
        check_positive("tol_log_prob", tol_log_prob)
    check_int("max_iter", max_iter, 1)
    if not 0.0 <= float(damping) < 1.0:
        raise FlatpriorError(f"damping must be in [0, 1), got {damping!r}")
    check_positive("jitter", jitter, allow_zero=True)
    check_positive("max_jitter", max_jitter, allow_zero=True)
    check_choice("EP warm_start", warm_start, ["auto", "nystrom", "none"])
    if warm_rank is not None:
        check_int("warm_rank", warm_rank, 1)
    check_int("anderson", anderson, 0, hint=" (0 = off)")


def _unit_mean_diagonal(K: np.ndarray) -> float:
    """Divide ``K`` in place by its mean diagonal and return that scale.

    ``ln P`` does not depend on the scale, and the site tolerance becomes scale invariant.
    """
    diag = np.diagonal(K)
    if (diag <= 0).any():
        raise FlatpriorError(
            f"kernel K has {int((diag <= 0).sum())} non-positive diagonal entries; "
            "every point needs a positive prior variance"
        )
    scale = float(diag.mean())
    K *= 1.0 / scale
    return scale


def _check_pairs(K: np.ndarray, ysign: np.ndarray, heaviside: bool) -> None:
    """Check the pairs of inputs: correlations in [-1, 1] and (Heaviside) P(f) > 0.

    Necessary PSD condition ``|r_ij| <= 1`` for ``r_ij = K_ij / sqrt(K_ii K_jj)``, and
    (Heaviside) ``P(f) = 0`` exactly when some pair has ``r = 1`` with opposite labels or
    ``r = -1`` with equal ones (``z_i = ±z_j`` a.s.); EP would silently return a jitter-set
    finite value. Per row block (no ``n x n`` temporaries).
    """
    n = K.shape[0]
    sd = np.sqrt(np.diagonal(K))
    for lo in range(0, n, 2048):
        corr = K[lo : lo + 2048] / np.outer(sd[lo : lo + 2048], sd)
        if float(np.abs(corr).max()) > 1.0 + 1e-6:
            raise FlatpriorError(
                "kernel K is not positive semidefinite (|K_ij| > sqrt(K_ii K_jj)); "
                "check how it was built"
            )
        if not heaviside:
            continue
        same = ysign[lo : lo + 2048, None] == ysign[None, :]
        bad = ((corr > 1.0 - _SAME_POINT) & ~same) | ((corr < -1.0 + _SAME_POINT) & same)
        if bad.any():
            bi, j = np.argwhere(bad)[0]
            i = lo + int(bi)
            kind = ("identical inputs", "opposite") if corr[bi, j] > 0 else (
                "exactly anti-correlated inputs", "equal")
            raise FlatpriorError(
                f"P(f) = 0: {kind[0]} {i} and {int(j)} (kernel correlation "
                f"{corr[bi, j]:.15g}) have {kind[1]} labels; fix the labels or drop one"
            )


def log_prior_ep(
    K,
    y,
    *,
    tol: float = 1e-6,
    tol_log_prob: float | None = None,
    max_iter: int = 200,
    damping: float = 0.0,
    adaptive_damping: bool = True,
    jitter: float = 0.0,
    max_jitter: float = 1e-4,
    n_threads: int | None = None,
    likelihood: str = "heaviside",
    anderson: int = 5,
    warm_start: str = "auto",
    warm_rank: int | None = None,
) -> EPResult:
    r"""EP approximation of ``ln P(f) = ln P(sign z = y)``, ``z ~ N(0, K)``.

    Parallel EP for the Heaviside likelihood ``1[y_i z_i > 0]``; the returned value is the EP
    log marginal likelihood (Rasmussen & Williams 2006, eq. 3.65). EP is an approximation: on
    small problems its error against the exact orthant probability is a few percent of
    ``ln P`` (see ``tests/test_prior_ep.py`` for the measured worst case).

    The kernel is first divided by its mean diagonal (``ln P`` does not depend on the scale of
    ``K``), so the site tolerance below is scale invariant.

    Stopping rules, cost and measured speed-ups: see the module docstring.

    Args:
        K: prior covariance ``[n, n]`` (symmetric PSD), array or tensor.
        y: labels ``[n]`` in ``{±1}`` or ``{0, 1}``.
        tol: site tolerance (see above).
        tol_log_prob: optional relative tolerance on the change of ``ln P``.
        max_iter: maximum number of parallel updates.
        damping: ``0 <= damping < 1``; new sites = ``(1-damping) new + damping old``.
        adaptive_damping: raise the damping (to 0.5, 0.75, ..., at most 0.95) when the
            log P changes direction twice in a row without shrinking 2x (module docstring).
        jitter: initial diagonal jitter, relative to the mean diagonal of ``K``.
        max_jitter: largest relative jitter tried (x100 steps from ``1e-10``) when the
            factorisation fails; beyond it a :class:`FlatpriorError` is raised.
        likelihood: ``"heaviside"`` (the paper's ``P(f)``, default) or ``"probit"``
            (``Phi(y z)``, GPy's default Bernoulli link at kernel scale 1, as in the authors'
            code; equals the Heaviside orthant probability of ``K + I``; not scale invariant).
        anderson: memory of the Anderson acceleration of the site iteration (``0`` = plain
            parallel EP; off while damping is on). Changes the path, not the fixed point.
        warm_start: ``"nystrom"``: start exact EP from the sites of EP on a Nystrom
            approximation of ``K`` (module docstring); ``"none"``: from zero sites;
            ``"auto"`` (default): Nystrom for ``n >= 2048``. Changes the path, not the fixed
            point (tests compare both starts to 1e-10).
        warm_rank: landmarks of the warm start (default ``min(500, n // 4)``).
        n_threads: BLAS threads (via threadpoolctl). Default: 1 for ``n < 2048`` (multi-threaded
            OpenBLAS on small matrices is up to 30x slower on a busy machine), else all cores;
            always 1 above ``n = 10 000``, where threaded OpenBLAS ``dpotrf`` was measured to
            crash (:data:`flatprior.prior._threads.SINGLE_THREAD_ABOVE_N`).

    Returns:
        :class:`EPResult`.

    Raises:
        FlatpriorError: bad ``K``/``y``, options out of range, a kernel that is not positive
            (semi)definite even with ``max_jitter``, any NaN/inf during the run, or (Heaviside)
            ``P(f) = 0`` exactly: a pair with correlation ``1`` (to ``1e-14``) and opposite
            labels, or correlation ``-1`` and equal labels (named in the message).
    """
    K, ysign = as_kernel_and_signs(K, y)  # private float64 copy
    check_psd(K)
    _check_options(likelihood, tol, tol_log_prob, max_iter, damping, jitter, max_jitter,
                   warm_start, warm_rank, anderson)
    n = K.shape[0]
    scale = _unit_mean_diagonal(K)
    _check_pairs(K, ysign, heaviside=likelihood == "heaviside")
    buf = np.empty((n, n), dtype=np.float64, order="F")
    opts = _make_options(n, tol, tol_log_prob, max_iter, damping, adaptive_damping, anderson,
                         warm_start, warm_rank)
    with blas_threads(_ep_blas_threads(n, n_threads)):
        run, added = _ep_with_jitter(K, ysign, buf, float(jitter), float(max_jitter), opts,
                                     make_likelihood(likelihood, scale))
    st = run.state
    return EPResult(
        log_prob=float(st.energy),
        converged=run.stop != "max_iter",
        n_iter=run.n_iter,
        max_site_change=run.max_site_change,
        log_prob_change=run.log_prob_change,
        stop_rule=run.stop,
        jitter=added * scale,
        damping=run.damping,
        site_tau=st.tau / scale,
        site_nu=st.nu / math.sqrt(scale),
        post_mean=st.mu * math.sqrt(scale),
        post_var=st.sigma * scale,
        history=tuple(run.history),
    )


def log_prior_probit(K, y, **kwargs) -> EPResult:
    """EP log marginal likelihood with the probit link ``Phi(y z)`` at kernel scale 1.

    This is what the authors' code computed (GPy's default Bernoulli likelihood), not the
    paper's Heaviside ``P(f)``; offered to compare with published numbers. Since
    ``Phi(y z) = P(y (z + e) > 0)`` with ``e ~ N(0, 1)``, it is the orthant probability of
    ``K + I``. Keyword arguments as for :func:`log_prior_ep`.
    """
    return log_prior_ep(K, y, likelihood="probit", **kwargs)
