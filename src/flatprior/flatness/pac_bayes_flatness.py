"""PAC-Bayes flatness: ``1 / sigma'^2`` for the largest Gaussian perturbation the loss tolerates.

Jiang, Neyshabur, Mobahi, Krishnan, Bengio, "Fantastic generalization measures and where to find
them", ICLR 2020 (measures 53 and 61, "pacbayes.flatness" and "pacbayes.mag.flatness");
Dziugaite, Drouin, Neal et al., "In search of robust measures of generalization", NeurIPS 2020
(code: nitarshan/robust-generalization-measures). With ``u ~ N(0, diag(s^2))`` over every trainable
parameter (biases included)::

    plain:            s_i = sigma'
    magnitude-aware:  s_i^2 = sigma'^2 w_i^2 + eps^2          (Jiang et al., eq. 60; eps = 1e-3)
    sigma' = the largest sigma with  E_u[ M(w + u) ] - M(w) <= target

where ``M`` is the mean loss over the set (``metric="loss"``) or the 0-1 training error
(``metric="error"``, Jiang et al.'s choice with ``target = 0.1``). The measure is ``1 / sigma'^2``
(large = sharp).

Monte-Carlo: the expectation is a mean over ``n_samples`` draws ``u_k = s(sigma) * z_k`` with the
SAME standard normals ``z_k`` at every ``sigma`` (common random numbers: the estimated curve is a
deterministic, continuous function of ``sigma``, so the bisection is well defined). ``sigma'`` is
found by geometric bracketing from ``sigma0`` and bisection in ``log sigma`` to relative width
``rtol``. The confidence interval of ``sigma'`` comes from bisecting the two curves ``mean +- t
se`` (Student-t over the draws); the measure's CI is ``1 / sigma_ci^2`` reversed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatprior.errors import FlatpriorError, check_choice, check_positive
from flatprior.flatness._common import (
    LossFn,
    align_targets,
    cast_data,
    check_data,
    check_int,
    check_loss_fn,
    eval_copy,
)
from flatprior.flatness.keskar import _Problem

METRICS = ("loss", "error")
MAG_EPS = 1e-3  # Jiang et al.'s epsilon of the magnitude-aware perturbation


@dataclass
class PacBayesFlatnessResult:
    """Details of one PAC-Bayes flatness computation.

    Attributes:
        value: ``1 / sigma'^2``.
        value_ci: confidence interval of ``value`` (from ``sigma_ci``).
        sigma: ``sigma'``.
        sigma_ci: ``(low, high)``: where the upper / lower confidence curve of the increase
            crosses ``target``.
        increase: estimated ``E[M(w + u)] - M(w)`` at ``sigma'`` (about ``target``).
        increase_ci: its confidence interval.
        base: ``M(w)``.
        metric, target, magnitude_aware, n_samples: the options used.
        n_evals: values of ``sigma`` evaluated (each costs ``n_samples`` passes over the set).
        wall_time_s: seconds spent.
    """

    value: float
    value_ci: tuple[float, float]
    sigma: float
    sigma_ci: tuple[float, float]
    increase: float
    increase_ci: tuple[float, float]
    base: float
    metric: str
    target: float
    magnitude_aware: bool
    n_samples: int
    n_evals: int
    wall_time_s: float


def _root_log_bisect(f: Callable[[float], float], lo: float, hi: float, rtol: float) -> float:
    """Bisect ``f(lo) <= 0 < f(hi)`` in log space until ``hi / lo <= 1 + rtol``.

    Returns the geometric midpoint.
    """
    while hi / lo > 1 + rtol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) <= 0 else (lo, mid)
    return math.sqrt(lo * hi)


def _bracket(f: Callable[[float], float], s0: float, max_doublings: int) -> tuple[float, float]:
    """``(lo, hi)`` with ``f(lo) <= 0 < f(hi)``, found by doubling/halving from ``s0``."""
    s = s0
    if f(s) <= 0:
        for _ in range(max_doublings):
            if f(2 * s) > 0:
                return s, 2 * s
            s *= 2
        raise FlatpriorError(
            f"the expected increase stays below the target up to sigma = {s:.3g}; "
            "lower target (with metric='error' it cannot exceed 1 - training error)"
        )
    for _ in range(max_doublings):
        if f(s / 2) <= 0:
            return s / 2, s
        s /= 2
    raise FlatpriorError(
        f"the expected increase exceeds the target even at sigma = {s:.3g}; raise target"
    )


def _check_options(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, target: float,
    metric: str, n_samples: int, sigma0: float, rtol: float, mag_eps: float, confidence: float,
    eval_batch_size: int | None,
) -> tuple[str, LossFn, int, int | None]:
    """Validate and normalise the options of :func:`pac_bayes_flatness`.

    The checks run in a fixed order, so the first bad option is the one reported.

    Returns:
        ``(metric, loss_fn, n_samples, eval_batch_size)``: the normalised options, ``loss_fn``
        wrapped by ``align_targets``.

    Raises:
        FlatpriorError: a bad option, empty data or a model that cannot take the inputs.
    """
    check_positive("target", target)
    check_positive("sigma0", sigma0)
    check_positive("rtol", rtol)
    check_positive("mag_eps", mag_eps, allow_zero=True)
    metric = check_choice("metric", metric, METRICS)
    check_loss_fn(loss_fn)
    loss_fn = align_targets(loss_fn)
    check_data(inputs, targets, model)
    n_samples = check_int("n_samples", n_samples, minimum=2)
    if not 0 < float(confidence) < 1:
        raise FlatpriorError(f"confidence must be in (0, 1), got {confidence!r}")
    if eval_batch_size is not None:
        eval_batch_size = check_int("eval_batch_size", eval_batch_size)
    return metric, loss_fn, n_samples, eval_batch_size


def _measure(metric: str, loss_fn: LossFn) -> LossFn:
    """The quantity ``M`` whose expected rise is bounded.

    ``metric="loss"`` returns ``loss_fn`` itself; ``metric="error"`` returns the 0-1 error of a
    one-logit binary classifier (``logit > 0`` vs a 0/1 target), which raises
    :class:`FlatpriorError` when called on logits with more than one column.
    """
    if metric == "error":
        def zero_one(logits: Tensor, t: Tensor) -> Tensor:
            if logits.ndim > 1 and logits.shape[-1] != 1:
                raise FlatpriorError("metric='error' needs a one-logit binary classifier")
            return ((logits.reshape(-1) > 0).to(logits.dtype) != t.reshape(-1)).to(
                logits.dtype).mean()
        return zero_one
    return loss_fn


def _rise_estimator(
    prob: _Problem, x: Tensor, y: Tensor, base: float, z: Tensor, w2: Tensor,
    magnitude_aware: bool, mag_eps: float, n_samples: int, eval_bs: int | None,
    cache: dict[float, tuple[float, float]],
) -> Callable[[float], tuple[float, float]]:
    """The memoised Monte-Carlo estimate of the rise as a function of ``sigma``.

    Every ``sigma`` reuses the same standard normals ``z`` (common random numbers). Results are
    stored in ``cache`` (keyed by ``sigma``), whose size is the number of ``sigma`` evaluated.
    """

    def rise(sigma: float) -> tuple[float, float]:
        """(mean, standard error) of ``M(w + s(sigma) z_k) - M(w)`` over the draws."""
        if sigma not in cache:
            if magnitude_aware:
                s = torch.sqrt(sigma**2 * w2 + mag_eps**2).to(prob.dtype)
            else:
                s = torch.full_like(prob.w0, sigma)
            d = torch.tensor([prob.full_loss(s * zk, x, y, eval_bs) - base for zk in z],
                             dtype=torch.float64)
            cache[sigma] = (float(d.mean()), float(d.std(unbiased=True)) / math.sqrt(n_samples))
        return cache[sigma]

    return rise


def _sigma_ci(
    curve: Callable[[float], Callable[[float], float]], sigma: float, t_q: float, rtol: float,
) -> tuple[float, float]:
    """Confidence interval ``(s_lo, s_hi)`` of ``sigma'`` by bracketing and bisection.

    ``curve(k)`` is ``mean + k * se - target`` as a function of ``sigma``. The upper confidence
    curve (``k = t_q``) crosses first (smaller sigma), the lower one (``k = -t_q``) later; both
    searches start from the point estimate ``sigma``, upper curve first.
    """
    s_lo = _root_log_bisect(curve(t_q), *_bracket(curve(t_q), sigma, 60), rtol)
    s_hi = _root_log_bisect(curve(-t_q), *_bracket(curve(-t_q), sigma, 60), rtol)
    return s_lo, s_hi


def _details(
    sigma: float, s_lo: float, s_hi: float, mean: float, se: float, t_q: float, base: float,
    metric: str, target: float, magnitude_aware: bool, n_samples: int, n_evals: int,
    t0: float,
) -> PacBayesFlatnessResult:
    """Assemble the :class:`PacBayesFlatnessResult`.

    ``(mean, se)`` is the rise estimate at ``sigma``; ``t0`` the ``perf_counter`` start time.
    """
    return PacBayesFlatnessResult(
        value=1.0 / sigma**2, value_ci=(1.0 / s_hi**2, 1.0 / s_lo**2), sigma=sigma,
        sigma_ci=(s_lo, s_hi), increase=mean, increase_ci=(mean - t_q * se, mean + t_q * se),
        base=base, metric=metric, target=float(target), magnitude_aware=bool(magnitude_aware),
        n_samples=n_samples, n_evals=n_evals, wall_time_s=time.perf_counter() - t0,
    )


def pac_bayes_flatness(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    target: float = 0.1,
    magnitude_aware: bool = False,
    *,
    metric: str = "loss",
    n_samples: int = 10,
    sigma0: float = 0.01,
    rtol: float = 0.02,
    mag_eps: float = MAG_EPS,
    confidence: float = 0.95,
    eval_batch_size: int | None = 4096,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    return_details: bool = False,
) -> float | PacBayesFlatnessResult:
    """PAC-Bayes flatness ``1 / sigma'^2`` (see the module docstring for the maths).

    Args:
        model: the trained network (deep-copied in eval mode; the original is untouched).
        loss_fn: ``(logits, targets) -> mean loss``, e.g. ``BCEWithLogitsLoss()``.
        inputs: ``[N, ...]`` (the training set S).
        targets: ``[N, ...]``.
        target: tolerated rise of the expected ``metric`` (``> 0``; Jiang et al.: 0.1).
        magnitude_aware: perturb weight ``i`` with variance ``sigma^2 w_i^2 + mag_eps^2``.
        metric: ``"loss"`` (mean ``loss_fn``) or ``"error"`` (0-1 error of a one-logit
            classifier, ``logit > 0`` vs a 0/1 target).
        n_samples: Monte-Carlo draws per ``sigma`` (Dziugaite et al.: 10).
        sigma0: first ``sigma`` of the bracketing search.
        rtol: relative precision of ``sigma'`` (bisection stops when ``hi / lo <= 1 + rtol``).
        mag_eps: ``eps`` of the magnitude-aware variance.
        confidence: level of the confidence intervals.
        eval_batch_size: examples per forward pass (memory only).
        dtype: compute dtype (``None`` keeps the model's: the rise is not a tiny difference).
        seed: seeds the draws.
        return_details: return a :class:`PacBayesFlatnessResult` instead of the float (this
            also computes the confidence intervals: two more bisections, ~3x the cost).

    Returns:
        ``1 / sigma'^2`` (float), or the details.

    Raises:
        FlatpriorError: bad options or data, or a target the curve never crosses.
    """
    metric, loss_fn, n_samples, eval_batch_size = _check_options(
        model, loss_fn, inputs, targets, target, metric, n_samples, sigma0, rtol, mag_eps,
        confidence, eval_batch_size,
    )
    from scipy import stats

    t0 = time.perf_counter()
    net = eval_copy(model, dtype)
    prob = _Problem(net, _measure(metric, loss_fn), None, seed, 1.0)
    x, y = cast_data(inputs, targets, prob.dtype, prob.w0.device)
    base = prob.full_loss(torch.zeros_like(prob.w0), x, y, eval_batch_size)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_samples, prob.w0.numel(), generator=gen, dtype=torch.float64).to(prob.dtype)
    w2 = prob.w0.double() ** 2
    t_q = float(stats.t.ppf(0.5 + confidence / 2, df=n_samples - 1))
    cache: dict[float, tuple[float, float]] = {}
    rise = _rise_estimator(prob, x, y, base, z, w2, magnitude_aware, mag_eps, n_samples,
                           eval_batch_size, cache)

    def curve(k: float) -> Callable[[float], float]:
        return lambda s: rise(s)[0] + k * rise(s)[1] - target

    lo, hi = _bracket(curve(0.0), float(sigma0), 60)
    sigma = _root_log_bisect(curve(0.0), lo, hi, rtol)
    if not return_details:
        return 1.0 / sigma**2
    s_lo, s_hi = _sigma_ci(curve, sigma, t_q, rtol)
    mean, se = rise(sigma)
    return _details(sigma, s_lo, s_hi, mean, se, t_q, base, metric, target, magnitude_aware,
                    n_samples, len(cache), t0)
