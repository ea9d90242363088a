r"""EP for many label vectors on one kernel: :func:`log_prior_ep` vectorised over functions.

On the Boolean cube every function of a sweep lives on the same inputs, so all of them share one
NNGP kernel ``K [n, n]`` and differ only in their labels ``Y [F, n]``. :func:`log_prior_ep_batch`
runs, for every row ``y_f``, exactly the parallel EP iteration of
:func:`flatprior.prior.ep.log_prior_ep` (same sites, same stopping rules, same adaptive damping
and Anderson acceleration, same warm start), with the element-wise work (tilted moments, site
updates, cavities, energies: ``[F, n]`` arrays) and the mat-vecs batched over the functions
that have not stopped yet. Input checks (symmetry, PSD Cholesky, pair correlations) run once
for the kernel instead of once per function.

Each function keeps its own iteration state: its own iteration count, damping, log P history
and Anderson memory. After every sweep the functions that met a stopping rule leave the active
set and their state is frozen, so a function converged early never takes a further update and
one that needs more sweeps is not cut short by the others. Per function the arithmetic is the
single path's: the Cholesky factor and triangular inverse of ``B_f = I + S_f^{1/2} K S_f^{1/2}``
(``S_f`` differs per function) and the mat-vecs are :func:`flatprior.prior.ep._posterior_marginals`
on one shared ``n x n`` buffer, the element-wise work is batched (ufuncs give the same bits
whatever the batch), the reductions are the single path's 1-D ones; so each function's
:class:`EPResult` equals :func:`log_prior_ep` on it alone bit for bit (tested on the Boolean
kernel, with damped and undamped, accelerated and plain, warm and cold starts). A function
whose ``B`` factorisation fails (the kernel is not positive definite enough *for its sites*) is
re-run alone by :func:`log_prior_ep`, which escalates the diagonal jitter exactly as a single
call does.

Cost: what the batch saves is the per-function Python and dispatch work of the ~25 array
operations of a sweep and the per-call validation (symmetry, PSD Cholesky, pair correlations:
once for the kernel); the two LAPACK calls per function and sweep remain (a batched
``torch.linalg.cholesky`` measured slower than ``dpotrf`` + ``dtrtri`` at n = 128 on one core).
Memory: one ``n x n`` buffer and ``[F, n]`` arrays, whatever ``F``.
"""

from __future__ import annotations

import math

import numpy as np

from flatprior.errors import FlatpriorError
from flatprior.prior._threads import blas_threads
from flatprior.prior._validate import as_kernel, check_psd, label_signs
from flatprior.prior.ep import (
    _ANDERSON_START,
    _SAME_POINT,
    EPResult,
    _Anderson,
    _check_options,
    _check_pairs,
    _ep_blas_threads,
    _EPOptions,
    _make_options,
    _NotPD,
    _nystrom_sites,
    _posterior_marginals,
    _raised_damping,
    _unit_mean_diagonal,
    log_prior_ep,
)
from flatprior.prior.likelihoods import GaussianCDFLikelihood, make_likelihood

__all__ = ["log_prior_ep_batch"]


class _Batch:
    """EP state of the functions of one chunk (all arrays ``[F, n]``, energy ``[F]``).

    The fields are those of :class:`flatprior.prior.ep.EPState`, one row per function.
    """

    def __init__(self, F: int, diagK: np.ndarray):
        n = diagK.shape[0]
        self.tau, self.nu, self.mu = np.zeros((F, n)), np.zeros((F, n)), np.zeros((F, n))
        self.sigma = np.tile(diagK, (F, 1))
        self.z = np.zeros((F, n))
        self.tau_cav = np.tile(1.0 / diagK, (F, 1))
        self.energy = np.full(F, n * math.log(0.5))

    def set_rows(self, rows: np.ndarray, other: dict[str, np.ndarray]) -> None:
        for name, value in other.items():
            getattr(self, name)[rows] = value


def _posterior_batch(K: np.ndarray, diagK: np.ndarray, Y: np.ndarray, tau: np.ndarray,
                     nu: np.ndarray, lik: GaussianCDFLikelihood, buf: np.ndarray):
    """:func:`flatprior.prior.ep._posterior_and_energy` for every row of ``(Y, tau, nu)``.

    The factorisation and the mat-vecs are per row (``B`` differs per row) and are the single
    path's own code (:func:`flatprior.prior.ep._posterior_marginals`) on one shared Fortran
    buffer ``buf [n, n]``; the reductions of the energy are the single path's 1-D ones; the
    element-wise work is batched. Row ``f``'s numbers are therefore the single path's, bit for
    bit (element-wise ufuncs do not depend on the batch).

    Returns:
        ``(state, not_pd)``: the new state fields (dict of ``[F, n]`` arrays and ``energy
        [F]``) and a bool ``[F]`` of rows whose factorisation failed or gave a non-positive
        variance (their fields are placeholders, to be dropped by the caller).
    """
    F, n = tau.shape
    mu, sigma, binv = np.zeros((F, n)), np.ones((F, n)), np.ones((F, n))
    half_logdet = np.zeros(F)
    not_pd = np.zeros(F, dtype=bool)
    for f in range(F):
        try:
            m, s, b, h = _posterior_marginals(K, diagK, tau[f], nu[f], buf)
        except _NotPD:
            not_pd[f] = True
            continue
        if not (np.isfinite(s).all() and np.isfinite(m).all()):
            raise FlatpriorError("EP produced NaN/inf posterior moments; the kernel is ill-posed")
        if (s <= 0).any() or (b <= 0).any():
            not_pd[f] = True
            continue
        mu[f], sigma[f], binv[f], half_logdet[f] = m, s, b, h
    # cavity: v = Sigma_ii / B^{-1}_ii,  m = (mu_i - Sigma_ii nu_i) / B^{-1}_ii
    var_cav = sigma / binv
    tau_cav = 1.0 / var_cav
    m_cav = (mu - sigma * nu) / binv
    z = lik.standardized_cavity_mean(Y, m_cav, tau_cav)
    log_z = lik.log_tilted_normalizer(z)
    nu_cav = m_cav * tau_cav
    tsum = tau + tau_cav
    cross = (tau / tau_cav * nu_cav - 2.0 * nu) / tsum
    quad = nu * nu / tsum
    logs = np.log1p(tau / tau_cav)
    energy = np.empty(F)
    for f in range(F):  # R&W eq. (3.65), the single path's reductions in its order
        energy[f] = (
            float(log_z[f].sum())
            - half_logdet[f]
            + 0.5 * float(nu[f] @ mu[f])
            + 0.5 * float(nu_cav[f] @ cross[f])
            - 0.5 * float(quad[f].sum())
            + 0.5 * float(logs[f].sum())
        )
    state = {"tau": tau, "nu": nu, "mu": mu, "sigma": sigma, "z": z, "tau_cav": tau_cav,
             "energy": energy}
    return state, not_pd


def _site_change_rows(tau, nu, new_tau, new_nu) -> np.ndarray:
    """:func:`flatprior.prior.ep._site_change` of every row (``[F]``)."""
    return np.maximum(np.mean(((new_tau - tau) / (1.0 + np.abs(tau))) ** 2, axis=1),
                      np.mean(((new_nu - nu) / (1.0 + np.abs(nu))) ** 2, axis=1))


class _Tracks:
    """Per-function bookkeeping of the iteration (what :class:`EPResult` reports)."""

    def __init__(self, F: int, opts: _EPOptions, energy: np.ndarray):
        self.n_iter = np.zeros(F, dtype=np.int64)
        self.dmax = np.full(F, math.inf)
        self.dlog = np.full(F, math.inf)
        self.stop = ["max_iter"] * F
        self.damping = [opts.damping] * F
        self.history = [[float(e)] for e in energy]
        self.accel = [_Anderson(opts.anderson) if opts.anderson > 0 else None for _ in range(F)]


def _start_batch(K, diagK, Y, lik, opts: _EPOptions, buf) -> tuple[_Batch, np.ndarray]:
    """Starting sites of every row: the Nystrom warm start where asked for and working."""
    F = Y.shape[0]
    st = _Batch(F, diagK)
    warm = np.zeros(F, dtype=bool)
    if opts.warm_rank <= 0:
        return st, warm
    # one row at a time: the warm start is for n >= 2048, where the factorisation dominates
    for f in range(F):
        sites = _nystrom_sites(K, Y[f], opts.warm_rank, lik)
        if sites is None:
            continue
        try:
            one, bad = _posterior_batch(K, diagK, Y[f : f + 1], sites[0][None], sites[1][None],
                                        lik, buf)
        except FlatpriorError:  # as the single path: start this row cold
            continue
        if not bad[0]:
            st.set_rows(np.array([f]), one)
            warm[f] = True
    return st, warm


def _run_batch(K: np.ndarray, Y: np.ndarray, opts: _EPOptions, lik: GaussianCDFLikelihood
               ) -> tuple[_Batch, _Tracks, np.ndarray]:
    """Parallel EP for every row of ``Y`` until each row meets its own stopping rule.

    Mirrors :func:`flatprior.prior.ep._run_ep` row by row. Returns the final state, the
    per-row bookkeeping and a bool ``[F]`` of rows whose factorisation failed (to be re-run
    alone, with jitter).
    """
    F = Y.shape[0]
    diagK = np.diagonal(K).copy()
    buf = np.empty((K.shape[0], K.shape[0]), dtype=np.float64, order="F")
    st, warm = _start_batch(K, diagK, Y, lik, opts, buf)
    tr = _Tracks(F, opts, st.energy)
    failed = np.zeros(F, dtype=bool)
    active = np.arange(F)
    for _sweep in range(opts.max_iter):
        if active.size == 0:
            break
        tau, nu = st.tau[active], st.nu[active]
        new_tau, new_nu = lik.site_update(st.z[active], Y[active], st.tau_cav[active])
        if not (np.isfinite(new_tau).all() and np.isfinite(new_nu).all()):
            raise FlatpriorError("EP site update produced NaN/inf; the kernel is ill-posed")
        site_sq = _site_change_rows(tau, nu, new_tau, new_nu)
        tr.dmax[active] = np.maximum(np.abs(new_tau - tau).max(axis=1),
                                     np.abs(new_nu - nu).max(axis=1))
        done = (site_sq < opts.tol) & (tr.n_iter[active] > 0)
        for f in active[done]:
            tr.stop[f] = "sites"
        go = ~done
        active, tau, nu, site_sq = active[go], tau[go], nu[go], site_sq[go]
        new_tau, new_nu = new_tau[go], new_nu[go]
        if active.size == 0:
            break
        for j, f in enumerate(active):  # damping and Anderson memory are per function
            if opts.adaptive:
                tr.damping[f] = _raised_damping(tr.history[f], tr.damping[f])
            dmp = tr.damping[f]
            if dmp > 0.0:
                new_tau[j] = (1.0 - dmp) * new_tau[j] + dmp * tau[j]
                new_nu[j] = (1.0 - dmp) * new_nu[j] + dmp * nu[j]
            elif tr.accel[f] is not None and (warm[f] or site_sq[j] < _ANDERSON_START):
                new_tau[j], new_nu[j] = tr.accel[f].step(tau[j], nu[j], new_tau[j], new_nu[j],
                                                         float(site_sq[j]))
        tr.n_iter[active] += 1
        new, bad = _posterior_batch(K, diagK, Y[active], np.maximum(new_tau, 1e-300), new_nu,
                                    lik, buf)
        if not np.isfinite(new["energy"][~bad]).all():
            raise FlatpriorError("EP log marginal likelihood is NaN/inf; the kernel is ill-posed")
        failed[active[bad]] = True
        keep = ~bad
        active = active[keep]
        new = {k: v[keep] for k, v in new.items()}
        tr.dlog[active] = np.abs(new["energy"] - st.energy[active])
        st.set_rows(active, new)
        still = np.ones(active.size, dtype=bool)
        for j, f in enumerate(active):
            e = float(st.energy[f])
            tr.history[f].append(e)
            step = tr.dlog[f] / (1.0 - tr.damping[f])
            if opts.tol_log_prob is not None and step <= opts.tol_log_prob * max(1.0, abs(e)):
                tr.stop[f] = "log_prob"
                still[j] = False
        active = active[still]
    return st, tr, failed


def _distinct_pairs(K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i < j)`` with kernel correlation ``> 1 - 1e-14`` and ``< -1 + 1e-14``."""
    n = K.shape[0]
    sd = np.sqrt(np.diagonal(K))
    same, anti = [], []
    for lo in range(0, n, 2048):
        corr = K[lo : lo + 2048] / np.outer(sd[lo : lo + 2048], sd)
        i, j = np.nonzero(corr > 1.0 - _SAME_POINT)
        same.append(np.stack([i + lo, j], axis=1)[i + lo < j])
        i, j = np.nonzero(corr < -1.0 + _SAME_POINT)
        anti.append(np.stack([i + lo, j], axis=1)[i + lo < j])
    return np.concatenate(same), np.concatenate(anti)


def _check_label_pairs(K: np.ndarray, Y: np.ndarray) -> None:
    """Refuse rows with Heaviside ``P(f) = 0`` (the single path's one-line message).

    Equal points with other labels, or opposite points with equal labels; the message names
    the first such pair.
    """
    same, anti = _distinct_pairs(K)
    bad = np.zeros(len(Y), dtype=bool)
    if same.size:
        bad |= (Y[:, same[:, 0]] != Y[:, same[:, 1]]).any(axis=1)
    if anti.size:
        bad |= (Y[:, anti[:, 0]] == Y[:, anti[:, 1]]).any(axis=1)
    if bad.any():
        _check_pairs(K, Y[int(np.flatnonzero(bad)[0])], heaviside=True)


def _row_result(st, tr, f: int, added: float, scale: float) -> EPResult:
    """Row ``f``'s :class:`EPResult`, in ``K``'s own scale (as :func:`log_prior_ep` returns)."""
    return EPResult(
        log_prob=float(st.energy[f]),
        converged=tr.stop[f] != "max_iter",
        n_iter=int(tr.n_iter[f]),
        max_site_change=float(tr.dmax[f]),
        log_prob_change=float(tr.dlog[f]),
        stop_rule=tr.stop[f],
        jitter=added * scale,
        damping=tr.damping[f],
        site_tau=st.tau[f] / scale,
        site_nu=st.nu[f] / math.sqrt(scale),
        post_mean=st.mu[f] * math.sqrt(scale),
        post_var=st.sigma[f] * scale,
        history=tuple(tr.history[f]),
    )


def log_prior_ep_batch(
    K,
    labels,
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
) -> list[EPResult]:
    r""":func:`flatprior.prior.ep.log_prior_ep` for every row of ``labels`` on one kernel ``K``.

    ``ln P(f_r) = ln P(sign z = y_r)``, ``z ~ N(0, K)``, for ``r = 1..F``, by parallel EP
    (Rasmussen & Williams 2006, §3.6; the EP energy eq. 3.65), vectorised over the functions;
    each row's :class:`EPResult` is the one :func:`log_prior_ep` returns for that row alone
    (same fields, same iteration count, the same numbers bit for bit: module docstring).
    Rows are not de-duplicated here (see :func:`flatprior.prior.api.log_prior_distinct`).

    Args:
        K: prior covariance ``[n, n]`` (symmetric PSD), array or tensor.
        labels: ``[F, n]``, each row in ``{±1}`` or ``{0, 1}``.
        tol: site tolerance, per row (as for :func:`log_prior_ep`).
        tol_log_prob: optional relative tolerance on the change of ``ln P``, per row.
        max_iter: maximum number of parallel updates of each row.
        damping: initial damping of every row.
        adaptive_damping: raise a row's damping when its log P oscillates.
        jitter: initial diagonal jitter, relative to the mean diagonal of ``K``.
        max_jitter: largest relative jitter tried for a row whose factorisation fails.
        n_threads: BLAS threads (default: 1 for ``n < 2048``, else all cores).
        likelihood: ``"heaviside"`` (default) or ``"probit"``.
        anderson: Anderson memory of each row (``0`` = plain parallel EP).
        warm_start: ``"auto"``, ``"nystrom"`` or ``"none"`` (as for :func:`log_prior_ep`).
        warm_rank: landmarks of the Nystrom warm start.

    Returns:
        One :class:`EPResult` per row of ``labels``, in order.

    Raises:
        FlatpriorError: everything :func:`log_prior_ep` raises for any row, and labels that are
            not ``[F, n]`` with ``F >= 1`` or a row outside ``{±1}`` / ``{0, 1}``.
    """
    K0 = K
    K = as_kernel(K)  # private float64 copy
    Y = label_signs(labels, K.shape[0])
    check_psd(K)
    _check_options(likelihood, tol, tol_log_prob, max_iter, damping, jitter, max_jitter,
                   warm_start, warm_rank, anderson)
    n = K.shape[0]
    scale = _unit_mean_diagonal(K)
    _check_pairs(K, Y[0], heaviside=False)  # |r_ij| <= 1, once for the kernel
    if likelihood == "heaviside":
        _check_label_pairs(K, Y)
    opts = _make_options(n, tol, tol_log_prob, max_iter, damping, adaptive_damping, anderson,
                         warm_start, warm_rank)
    added = float(jitter)
    if added > 0.0:  # the single path adds the initial jitter before its first run
        K[np.diag_indices(n)] += added
    lik = make_likelihood(likelihood, scale)
    results: list[EPResult | None] = [None] * len(Y)
    retry: list[int] = []
    with blas_threads(_ep_blas_threads(n, n_threads)):
        st, tr, failed = _run_batch(K, Y, opts, lik)
        for f in range(len(Y)):
            if failed[f]:
                retry.append(f)
                continue
            results[f] = _row_result(st, tr, f, added, scale)
    kwargs = dict(tol=tol, tol_log_prob=tol_log_prob, max_iter=max_iter, damping=damping,
                  adaptive_damping=adaptive_damping, jitter=jitter, max_jitter=max_jitter,
                  n_threads=n_threads, likelihood=likelihood, anderson=anderson,
                  warm_start=warm_start, warm_rank=warm_rank)
    for r in retry:  # not PD enough for these sites: the single path escalates the jitter
        results[r] = log_prior_ep(K0, Y[r], **kwargs)
    return results  # type: ignore[return-value]
