"""Certified log P(f): importance sampling for Gaussian orthant probabilities, with a CI.

The prior probability of a function f with labels ``y ∈ {±1}^n`` on inputs with NNGP kernel
``K`` is the orthant probability

    P(f) = P(sign z = y),  z ~ N(0, K)
         = P(w ≥ 0),        w = diag(y) z ~ N(0, Σ),  Σ = diag(y) K diag(y).

:func:`log_prior_tilting` estimates ``log P(f)`` without bias (in P) with one of two proposals:

* ``proposal="minimax"``: Botev's (2017) minimax exponential tilting, plain importance
  sampling, delta-method standard error over all weights; also returns Botev's
  deterministic upper bound ``log_upper_bound = ψ(x*, μ*)``.
* ``proposal="ep"``: twisted sequential Monte-Carlo with the EP posterior as proposal and
  resampling; ``n_samples`` particles are split into ``n_replicates`` independent runs, and
  the standard error comes from the spread of the replicate estimates (Student-t interval).
* ``proposal="auto"`` (default): minimax tilting; if a pilot batch has an effective sample
  size below ``min_ess_fraction`` of its size (the weights are degenerate, as for complex
  functions on hundreds of correlated inputs), switch to ``"ep"``. ``log_upper_bound`` is
  kept in both cases.

The minimax pieces are in :mod:`flatprior.prior.minimax_tilting` (Z. I. Botev, "The normal law
under linear restrictions: simulation and estimation via minimax tilting", JRSS-B 79(1), 2017),
the EP-guided twisted SMC in :mod:`flatprior.prior.ep_sampler`.

Both draw seeded chunks in worker threads and, with a target standard error, grow the sample
(:mod:`flatprior.prior._draws`).

Why hand-rolled: no maintained PyPI package implements the vectorised log-space estimator for
n in the thousands (the reference implementation is the R package TruncatedNormal); scipy's
``multivariate_normal.cdf`` (Genz) is limited to small n. Writing it ourselves also lets the
optimiser report non-convergence instead of silently sampling with a bad tilting.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import ndtri

from flatprior.errors import FlatpriorError, check_choice, check_int, check_positive
from flatprior.prior._draws import ParallelDraws, grow_to_target
from flatprior.prior._threads import blas_threads
from flatprior.prior._validate import as_kernel_and_signs, check_psd
from flatprior.prior.ep_sampler import (  # noqa: F401  (_ep_proposal: re-exported for tests)
    _ep_proposal,
    _EPProposal,
    _replicate_summary,
    _smc_run,
)
from flatprior.prior.minimax_tilting import (  # noqa: F401  (re-exported for tests)
    _hazard,
    _sample_log_weights,
    _setup,
    _summary,
    _Tilting,
)

__all__ = ["TiltingResult", "TiltingConvergenceWarning", "log_prior_tilting"]

_PROPOSALS = ("auto", "minimax", "ep")


class TiltingConvergenceWarning(RuntimeWarning):
    """The tilting optimisation did not converge; the estimate stays unbiased but has no bound."""


@dataclass(frozen=True)
class TiltingResult:
    """Outcome of :func:`log_prior_tilting` (natural logs throughout).

    Attributes:
        log_prob: estimate of log P(f) (``log`` of an unbiased estimate of P, so it is biased
            low by about ``std_err²/2``).
        std_err: delta-method standard error of ``log_prob``.
        ci_low, ci_high: ``confidence`` interval for log P(f) (normal for minimax, Student-t
            over replicates for ep).
        converged: whether the proposal's optimisation (minimax Newton, or EP for the ep
            proposal) met its tolerance. If False the estimate is still unbiased in P but
            ``log_upper_bound`` is NaN (a :class:`TiltingConvergenceWarning` was issued).
        reliable: False when the weights are degenerate (ESS below ``min_ess_fraction``, or
            replicate estimates spread by more than 0.5 nats): then ``std_err`` and the interval
            understate the error (a warning was issued).
        proposal: ``"minimax"`` or ``"ep"`` (the one used; ``"auto"`` resolves to one).
        log_upper_bound: ``ψ(x*, μ*)``, Botev's deterministic upper bound on log P(f) (NaN if
            not computed or not converged).
        ep_log_prob: the EP estimate computed for the ep proposal (NaN otherwise).
        n_samples: importance samples (minimax) or total particles (ep).
        ess: effective sample size ``(Σw)²/Σw²`` of the weights (minimax) or of the
            replicate estimates (ep).
        replicate_log_sd: standard deviation of ``log Ẑ`` over ep replicates (NaN for minimax);
            above ~0.5 nats the replicate mean is heavy-tailed and ``reliable`` is False.
        n_resample: mean number of resampling steps per ep replicate.
        confidence: nominal coverage of the interval.
        n: dimension (number of inputs).
        opt_n_iter: Newton (minimax) or EP iterations.
        opt_grad_norm: final ``max |∇φ(x)|`` of the tilting optimisation.
        time_setup: seconds for ordering, Cholesky and the tilting optimisation.
        time_sample: seconds for sampling (including the EP run of the ep proposal).
        wall_time: total seconds.
    """

    log_prob: float
    std_err: float
    ci_low: float
    ci_high: float
    converged: bool
    reliable: bool
    proposal: str
    log_upper_bound: float
    ep_log_prob: float
    n_samples: int
    ess: float
    replicate_log_sd: float
    n_resample: float
    confidence: float
    n: int
    opt_n_iter: int
    opt_grad_norm: float
    time_setup: float
    time_sample: float
    wall_time: float


@dataclass(frozen=True)
class _Sampling:
    """How to sample (validated options of :func:`log_prior_tilting`)."""

    n: int
    n_samples: int
    root: int
    target_se: float | None
    max_samples: int
    max_time: float | None
    batch_size: int | None
    n_replicates: int
    n_threads: int
    confidence: float
    ep_tol: float
    min_ess_fraction: float
    t_start: float

    def deadline_passed(self) -> bool:
        return self.max_time is not None and time.perf_counter() - self.t_start > self.max_time

    def setup_threads(self):
        """BLAS threads for the set-up factorisations (one thread below n = 1000)."""
        return blas_threads(self.n_threads if self.n >= 1000 else 1)


@dataclass(frozen=True)
class _Estimate:
    """What one proposal's sampling produced."""

    proposal: str
    log_p: float
    se: float
    ci: tuple[float, float]
    n_used: int
    ess: float
    reliable: bool
    replicate_log_sd: float = float("nan")
    n_resample: float = 0.0
    n_replicates: int = 0


def _check_options(proposal, n_samples, max_samples, n_threads, max_iter, n_replicates,
                   batch_size, tol, ep_tol, jitter, min_ess_fraction, target_se, max_time,
                   confidence) -> str:
    proposal = check_choice("tilting proposal", proposal, _PROPOSALS)
    check_int("n_samples", n_samples, 2)
    check_int("max_samples", max_samples, 2)
    check_int("n_threads", n_threads, 1)
    check_int("max_iter", max_iter, 1)
    check_int("n_replicates", n_replicates, 4)
    if batch_size is not None:
        check_int("batch_size", batch_size, 2)
    check_positive("tol", tol)
    check_positive("ep_tol", ep_tol)
    check_positive("jitter", jitter, allow_zero=True)
    check_positive("min_ess_fraction", min_ess_fraction, allow_zero=True)
    if target_se is not None:
        check_positive("target_se", target_se)
    if max_time is not None:
        check_positive("max_time", max_time)
    if not (0.0 < float(confidence) < 1.0):
        raise FlatpriorError(f"confidence must be in (0, 1), got {confidence!r}")
    if proposal == "ep" and n_samples < 2 * n_replicates:
        raise FlatpriorError(
            f"n_samples = {n_samples} is too small for {n_replicates} replicates; "
            f"use n_samples >= {2 * n_replicates}"
        )
    return proposal


def _minimax_tilting(sigma: np.ndarray, s: _Sampling, tol: float, max_iter: int) -> _Tilting:
    """The tilting of ``sigma`` (warns if its optimisation did not converge)."""
    with s.setup_threads():
        tl = _setup(sigma, np.zeros(s.n), tol=tol, max_iter=max_iter)
    if not tl.converged:
        warnings.warn(
            f"tilting optimisation did not converge in {tl.n_iter} Newton steps "
            f"(max|grad| = {tl.grad_norm:.2e}); the estimate is unbiased but may be noisy "
            "and has no upper bound", TiltingConvergenceWarning, stacklevel=3,
        )
    return tl


def _minimax_draws(tl: _Tilting, s: _Sampling) -> ParallelDraws:
    bs = int(s.batch_size) if s.batch_size is not None else int(max(64, min(4096,
                                                                            4_000_000 // s.n)))
    return ParallelDraws(lambda size, ss: _sample_log_weights(tl, size, ss), root=s.root,
                         key_offset=0, chunk=bs, n_threads=s.n_threads)


def _pilot_is_degenerate(draws: ParallelDraws, s: _Sampling) -> bool:
    """Draw a pilot batch; True if its ESS is below ``min_ess_fraction`` of its size."""
    pilot = min(s.n_samples, draws.chunk)
    draws.extend_to(pilot)
    return _summary(draws.results[0])[2] < s.min_ess_fraction * pilot


def _minimax_estimate(draws: ParallelDraws, s: _Sampling) -> _Estimate:
    """Importance sampling with the minimax tilting (normal interval, delta-method SE)."""
    draws.extend_to(s.n_samples)
    log_p, se, ess = grow_to_target(draws, lambda: _summary(np.concatenate(draws.results)),
                                    target_se=s.target_se, cap=s.max_samples,
                                    deadline=s.deadline_passed)
    zq = float(ndtri(0.5 + 0.5 * s.confidence))
    n_used = int(draws.done)
    return _Estimate("minimax", log_p, se, (log_p - zq * se, log_p + zq * se), n_used, ess,
                     reliable=ess >= max(s.min_ess_fraction * n_used, 30.0))


def _smc_estimate(prop: _EPProposal, s: _Sampling) -> _Estimate:
    """Independent EP-guided SMC replicates (Student-t interval over the replicates)."""
    from scipy.stats import t as student_t

    per = max(2, s.n_samples // s.n_replicates)
    draws = ParallelDraws(lambda _size, ss: _smc_run(prop, per, ss), root=s.root,
                          key_offset=1_000_000, chunk=1, n_threads=s.n_threads)
    draws.extend_to(s.n_replicates)

    def log_z() -> np.ndarray:
        return np.array([r[0] for r in draws.results])

    log_p, se = grow_to_target(draws, lambda: _replicate_summary(log_z()),
                               target_se=s.target_se, cap=s.max_samples // per,
                               deadline=s.deadline_passed)
    reps = len(draws.results)
    q = float(student_t.ppf(0.5 + 0.5 * s.confidence, df=reps - 1))
    lz = log_z()
    rep_sd = float(np.std(lz, ddof=1))
    w = np.exp(lz - lz.max())
    ess = float(w.sum() ** 2 / np.sum(w * w))  # over replicates
    # the delta-method SE is trustworthy while the replicate estimates are not heavy-tailed:
    # on MNIST (n = 1500) replicates spread by 0.35-0.5 nats gave SEs off by 2x between
    # seeds, at 0.2 nats they agreed
    return _Estimate("ep", log_p, se, (log_p - q * se, log_p + q * se), per * reps, ess,
                     reliable=rep_sd <= 0.5 and ess >= 0.5 * reps, replicate_log_sd=rep_sd,
                     n_resample=float(np.mean([r[1] for r in draws.results])),
                     n_replicates=reps)


def _correlation(Kn: np.ndarray, ys: np.ndarray, jitter: float) -> np.ndarray:
    """Correlation matrix ``Σ`` of ``x = diag(y) z / sd``, with ``1 + jitter`` on the diagonal.

    Scale-free, hence better conditioned.
    """
    dK = np.diag(Kn)
    if not np.all(dK > 0):
        raise FlatpriorError("kernel K has a non-positive diagonal entry; K must be a covariance")
    sd = np.sqrt(dK)
    sigma = (ys[:, None] * ys[None, :]) * Kn / (sd[:, None] * sd[None, :])
    sigma[np.diag_indices(Kn.shape[0])] = 1.0 + jitter
    return sigma


def _sample(Kn, ys, sigma, tl: _Tilting | None, proposal: str,
            s: _Sampling) -> tuple[_EPProposal | None, _Estimate]:
    """Sample with minimax tilting (``tl``) or with the EP proposal.

    The EP proposal is used when asked for or when ``"auto"``'s pilot batch is degenerate.
    Returns the EP proposal (if built) and the estimate.
    """
    prop = None
    if tl is not None:
        draws = _minimax_draws(tl, s)
        if proposal == "auto" and _pilot_is_degenerate(draws, s):
            try:
                with s.setup_threads():
                    prop = _ep_proposal(Kn, ys, sigma, s.ep_tol)
            except FlatpriorError as exc:  # keep minimax; flagged unreliable later
                warnings.warn(f"EP proposal unavailable ({exc}); staying with minimax "
                              "tilting", TiltingConvergenceWarning, stacklevel=3)
        if prop is None:
            return None, _minimax_estimate(draws, s)
    if prop is None:
        with s.setup_threads():
            prop = _ep_proposal(Kn, ys, sigma, s.ep_tol)
    return prop, _smc_estimate(prop, s)


def _warn_if_unreliable(est: _Estimate, n: int) -> None:
    if est.reliable:
        return
    if est.proposal == "minimax":
        what = f"importance weights (ESS {est.ess:.1f} of {est.n_used})"
        fix = "use proposal='ep' or raise n_samples"
    else:
        what = (f"replicate estimates (spread {est.replicate_log_sd:.2f} nats, "
                f"ESS {est.ess:.1f} of {est.n_replicates})")
        fix = "raise n_samples"
    warnings.warn(
        f"log P estimate ({est.proposal} proposal, n = {n}) has degenerate {what}; its standard "
        f"error is not trustworthy: {fix}", TiltingConvergenceWarning, stacklevel=3,
    )


def log_prior_tilting(
    K,
    y,
    *,
    n_samples: int = 16_000,
    seed: int = 0,
    proposal: str = "auto",
    target_se: float | None = None,
    max_samples: int = 2_000_000,
    max_time: float | None = None,
    batch_size: int | None = None,
    n_replicates: int = 16,
    n_threads: int = 2,
    confidence: float = 0.95,
    jitter: float = 1e-10,
    tol: float = 1e-10,
    max_iter: int = 100,
    ep_tol: float = 1e-5,
    min_ess_fraction: float = 0.1,
) -> TiltingResult:
    """Estimate ``log P(sign z = y)``, ``z ~ N(0, K)``, by importance sampling with a CI.

    Two unbiased (in P) estimators, chosen by ``proposal`` (``"minimax"``, ``"ep"`` or
    ``"auto"``; see the module docstring).

    Args:
        K: kernel (covariance) ``[n, n]``, symmetric positive definite; numpy or torch.
            log P is invariant to the scale of K; the correlation matrix is used.
        y: labels ``[n]`` in ``{±1}`` or ``{0, 1}``.
        n_samples: importance samples (minimax) or total particles (ep); with ``target_se``
            the first round.
        seed: seed; the result is a deterministic function of the seed and the options (not of
            ``n_threads``), unless ``max_time`` stops the sampling.
        proposal: ``"auto"``, ``"minimax"`` or ``"ep"``.
        target_se: if given, keep sampling (growing the total by the factor the current SE
            predicts, 1.25–8x per round) until ``std_err ≤ target_se``,
            ``max_samples`` or ``max_time`` is reached.
        max_samples: cap on the total number of samples with ``target_se``.
        max_time: cap in seconds on the sampling time with ``target_se``.
        batch_size: minimax samples per batch (memory ``8·n·batch_size`` bytes per thread);
            default keeps a batch ≤ ~32 MB. The ep runs hold ``n_samples / n_replicates``
            particles each (memory ``8·n`` bytes per particle, per thread).
        n_replicates: independent SMC runs for the ep proposal (≥ 4); each holds
            ``n_samples // n_replicates`` particles (prefer ≥ n particles per run).
        n_threads: threads drawing batches / replicates in parallel (numpy, scipy and BLAS
            release the GIL).
        confidence: nominal coverage of ``[ci_low, ci_high]``.
        jitter: added to the diagonal of the correlation matrix before factorising.
        tol: Newton-decrement tolerance of the tilting optimisation.
        max_iter: Newton iteration cap; hitting it gives ``converged=False`` and a warning.
        ep_tol: relative ``log P`` tolerance of the EP run that builds the ep proposal (the
            proposal's accuracy affects the variance, never the bias).
        min_ess_fraction: ESS fraction of the pilot below which ``"auto"`` switches to ep, and
            below which a result is flagged ``reliable=False`` with a warning.

    Returns:
        :class:`TiltingResult` (natural log).

    Raises:
        FlatpriorError: bad shapes/labels/NaN (see ``as_kernel_and_signs``), bad options, or a
            kernel that is not positive definite.
    """
    t0 = time.perf_counter()
    Kn, ys = as_kernel_and_signs(K, y)
    check_psd(Kn)
    proposal = _check_options(proposal, n_samples, max_samples, n_threads, max_iter,
                              n_replicates, batch_size, tol, ep_tol, jitter, min_ess_fraction,
                              target_se, max_time, confidence)
    sigma = _correlation(Kn, ys, jitter)
    n = Kn.shape[0]
    s = _Sampling(n, int(n_samples), int(seed), target_se, int(max_samples), max_time,
                  batch_size, int(n_replicates), int(n_threads), float(confidence),
                  ep_tol, min_ess_fraction, t_start=0.0)
    tl = _minimax_tilting(sigma, s, tol, max_iter) if proposal != "ep" else None
    t1 = time.perf_counter()
    prop, est = _sample(Kn, ys, sigma, tl, proposal, replace(s, t_start=t1))
    _warn_if_unreliable(est, n)
    return _tilting_result(est, tl, prop, float(confidence), n, (t0, t1, time.perf_counter()))


def _tilting_result(est: _Estimate, tl: _Tilting | None, prop: _EPProposal | None,
                    confidence: float, n: int, times: tuple[float, float, float]) -> TiltingResult:
    """The public result from the estimate and the proposal(s) built on the way."""
    if tl is not None:
        opt = (bool(tl.converged), int(tl.n_iter), float(tl.grad_norm))
    else:
        opt = (prop.converged, prop.n_iter, float("nan"))
    t0, t1, t2 = times
    return TiltingResult(
        log_prob=est.log_p,
        std_err=est.se,
        ci_low=est.ci[0],
        ci_high=est.ci[1],
        converged=bool(opt[0]),
        reliable=bool(est.reliable),
        proposal=est.proposal,
        log_upper_bound=float(tl.psi) if tl is not None and tl.converged else float("nan"),
        ep_log_prob=prop.ep_log_prob if est.proposal == "ep" else float("nan"),
        n_samples=est.n_used,
        ess=est.ess,
        replicate_log_sd=est.replicate_log_sd,
        n_resample=est.n_resample,
        confidence=confidence,
        n=n,
        opt_n_iter=opt[1],
        opt_grad_norm=opt[2],
        time_setup=t1 - t0,
        time_sample=t2 - t1,
        wall_time=t2 - t0,
    )
