"""Adaptive sharpness: worst-case and average-case loss increase in a ball scaled by ``|w|``.

Kwon et al., "ASAM: Adaptive sharpness-aware minimization", ICML 2021; Andriushchenko, Croce,
Mueller, Hein, Flammarion, "A modern look at the relationship between sharpness and
generalization", ICML 2023 (code: tml-epfl/sharpness-vs-generalization). With ``c = |w|``
(``adaptive=True``) or ``c = 1`` (``adaptive=False``), element-wise over every trainable
parameter (biases included), and ``L_B`` the mean loss over a set ``B``::

    worst:   S_max = mean_B [ max_{||u||_p <= rho} L_B(w + c * u) - L_B(w) ]
    average: S_avg = E_u [ L(w + c * u) - L(w) ],  u ~ N(0, rho^2 I)  (l2)
                                                    u ~ U[-rho, rho]^p (linf)

``p`` is ``inf`` or ``2`` (``norm``). For the worst case the set is cut into chunks ``B`` of
``m`` examples (Foret et al.'s m-sharpness; ``m=None``: one chunk, the whole set) and the
per-chunk maxima are averaged.

Why ``u``: everything is computed in the rescaled variable ``u = delta / c``. Under Dinh
alpha-scaling of layer ``l`` the loss *as a function of u* is the same function (``c`` scales like
``w``), so with the same seed the ascent visits the same ``u``'s and the Monte-Carlo draws are the
same: the adaptive values are invariant up to rounding. (Andriushchenko et al. project onto the
ellipsoid in ``delta``-space; in ``u``-space the ball is round and the projection exact.)

Worst case maximiser: projected steepest ascent with APGD's step-size control (Croce & Hein,
"Reliable evaluation of adversarial robustness ...", ICML 2020): start at a random point of the
ball (seeded) with step ``eta = 2 rho``; ``z = P(u_k + eta d_k)``, ``u_{k+1} = P(u_k +
0.75 (z - u_k) + 0.25 (u_k - u_{k-1}))`` with ``d = sign(g)`` (linf) or ``g / ||g||`` (l2),
``g = dL/du``; at the checkpoints ``ceil(p_j n_iters)`` (``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j +
max(p_j - p_{j-1} - 0.03, 0.06)``) the step is halved and the search restarts from the best
point if fewer than 75 % of the steps since the last checkpoint increased the loss, or if
neither the step nor the best loss changed. One full-chunk loss + gradient per iteration; the
value is the largest loss actually evaluated, so it is a lower bound of the true maximum.
"""

from __future__ import annotations

import math
import time
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

NORMS = ("linf", "l2")
KINDS = ("worst", "average")
MOMENTUM = 0.75  # APGD's alpha (weight of the new gradient step)
MIN_SUCCESS = 0.75  # APGD's rho: fraction of loss-increasing steps between checkpoints


@dataclass
class AdaptiveSharpnessResult:
    """Details of one adaptive-sharpness computation.

    Attributes:
        value: the sharpness (mean loss increase, loss units).
        base_loss: ``L(w)`` (mean over the chunks for the worst case).
        perturbed_loss: ``base_loss + value``.
        kind, norm, adaptive, rho, m: the options used.
        ci: ``(low, high)`` confidence interval of ``value`` (average case: Student-t over the
            Monte-Carlo draws); ``None`` for the worst case.
        std_err: standard error of the Monte-Carlo mean (average case), else ``None``.
        n_evals: loss evaluations on a whole chunk (worst: per chunk, ``n_restarts *
            (n_iters + 1)``; average: draws).
        n_chunks: number of chunks (worst case) or 1.
        step_halvings: APGD step-size reductions summed over the chunks (worst case).
        wall_time_s: seconds spent.
    """

    value: float
    base_loss: float
    perturbed_loss: float
    kind: str
    norm: str
    adaptive: bool
    rho: float
    m: int | None
    ci: tuple[float, float] | None
    std_err: float | None
    n_evals: int
    n_chunks: int
    step_halvings: int
    wall_time_s: float


def apgd_checkpoints(n_iters: int) -> list[int]:
    """APGD's checkpoint iterations ``ceil(p_j * n_iters)``, ``j >= 1`` (Croce & Hein 2020)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    cps = sorted({math.ceil(q * n_iters - 1e-9) for q in p[1:]})  # 0.57 * 100 is 57.0000…1
    return [c for c in cps if 0 < c < n_iters]


def _project(u: Tensor, rho: float, norm: str) -> Tensor:
    if norm == "linf":
        return u.clamp(-rho, rho)
    n = float(u.norm())
    return u if n <= rho else u * (rho / n)


def _direction(g: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return g.sign()
    n = float(g.norm())
    return g / n if n > 0 else torch.zeros_like(g)


def _random_in_ball(p: int, rho: float, norm: str, gen: torch.Generator, dtype) -> Tensor:
    if norm == "linf":
        return (2 * torch.rand(p, generator=gen, dtype=torch.float64) - 1).to(dtype) * rho
    g = torch.randn(p, generator=gen, dtype=torch.float64)
    r = float(torch.rand((), generator=gen, dtype=torch.float64)) ** (1.0 / p)
    return (g * (rho * r / float(g.norm()))).to(dtype)  # uniform in the l2 ball


def _worst_chunk(prob: _Problem, c: Tensor, x: Tensor, y: Tensor, rho: float, norm: str,
                 n_iters: int, step0: float, rand_init: bool, gen: torch.Generator,
                 eval_bs: int | None) -> tuple[float, float, int]:
    """APGD ascent on one chunk; returns ``(base_loss, max_loss, step_halvings)``."""
    base = prob.full_loss(torch.zeros_like(c), x, y, eval_bs)
    u = (_random_in_ball(c.numel(), rho, norm, gen, c.dtype) if rand_init
         else torch.zeros_like(c))
    checkpoints = set(apgd_checkpoints(n_iters))
    eta = step0
    f, g = prob.full_loss_and_grad(c * u, x, y, eval_bs)
    g = g * c  # dL/du
    # the ascent's best point (restarts go back to it); delta = 0 (base) enters only the result
    best_f, best_u, best_g = f, u.clone(), g.clone()
    u_prev = u.clone()
    u = _project(u + eta * _direction(g, norm), rho, norm)
    f_prev = f
    successes, halvings = 0, 0
    last_cp, eta_at_cp, best_at_cp = 0, eta, best_f
    for k in range(1, n_iters + 1):
        f, g = prob.full_loss_and_grad(c * u, x, y, eval_bs)
        g = g * c
        successes += f > f_prev
        f_prev = f
        if f > best_f:
            best_f, best_u, best_g = f, u.clone(), g.clone()
        if k == n_iters:
            break
        if k in checkpoints:
            few_gains = successes < MIN_SUCCESS * (k - last_cp)
            stuck = eta == eta_at_cp and best_f == best_at_cp
            eta_at_cp, best_at_cp, last_cp, successes = eta, best_f, k, 0
            if few_gains or stuck:
                eta *= 0.5
                halvings += 1
                u, g, u_prev = best_u.clone(), best_g.clone(), best_u.clone()
        z = _project(u + eta * _direction(g, norm), rho, norm)
        u, u_prev = _project(u + MOMENTUM * (z - u) + (1 - MOMENTUM) * (u - u_prev), rho,
                             norm), u
    return base, max(best_f, base), halvings


def _check_options(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, rho: float, norm: str,
    kind: str, m: int | None, n_iters: int, n_samples: int, n_restarts: int, rand_init: bool,
    step_size_mult: float, confidence: float, eval_batch_size: int | None,
) -> tuple[str, str, LossFn, int, int, int, int, int | None, int | None]:
    """Validate and normalise the options of :func:`adaptive_sharpness`.

    The checks run in a fixed order, so the first bad option is the one reported.

    Returns:
        ``(norm, kind, loss_fn, n, n_iters, n_samples, n_restarts, m, eval_batch_size)``: the
        normalised options, ``loss_fn`` wrapped by ``align_targets`` and ``n`` the number of
        examples.

    Raises:
        FlatpriorError: a bad option, empty data or a model that cannot take the inputs.
    """
    check_positive("rho", rho)
    norm = check_choice("norm", norm, NORMS)
    kind = check_choice("sharpness kind", kind, KINDS)
    check_loss_fn(loss_fn)
    loss_fn = align_targets(loss_fn)
    n = check_data(inputs, targets, model)
    n_iters = check_int("n_iters", n_iters)
    n_samples = check_int("n_samples", n_samples, minimum=2)
    n_restarts = check_int("n_restarts", n_restarts)
    if n_restarts > 1 and not rand_init:
        raise FlatpriorError("n_restarts > 1 needs rand_init=True (else every restart is equal)")
    check_positive("step_size_mult", step_size_mult)
    if not 0 < float(confidence) < 1:
        raise FlatpriorError(f"confidence must be in (0, 1), got {confidence!r}")
    if m is not None:
        if kind != "worst":
            raise FlatpriorError(
                "m applies to kind='worst' only (the average case is linear in the loss, so "
                "chunking changes nothing); pass m=None"
            )
        m = check_int("m", m)
    if eval_batch_size is not None:
        eval_batch_size = check_int("eval_batch_size", eval_batch_size)
    return norm, kind, loss_fn, n, n_iters, n_samples, n_restarts, m, eval_batch_size


def _worst_case(
    prob: _Problem, c: Tensor, x: Tensor, y: Tensor, n: int, rho: float, norm: str,
    m: int | None, n_iters: int, n_restarts: int, rand_init: bool, step_size_mult: float,
    gen: torch.Generator, eval_bs: int | None,
) -> tuple[float, float, int, int, int]:
    """Worst-case sharpness: APGD maxima over the chunks of ``m`` examples, averaged.

    With ``m`` set the examples are shuffled by ``gen`` (before any ascent) and cut into chunks
    of ``min(m, n)``; otherwise one chunk holds the whole set in order. Each chunk runs
    ``n_restarts`` ascents (sharing ``gen``) and keeps the largest maximum.

    Returns:
        ``(base, value, n_evals, n_chunks, step_halvings)``: the mean base loss over the chunks,
        the mean increase, loss evaluations per chunk, the number of chunks and the APGD
        step-size reductions summed over chunks and restarts.
    """
    halvings = 0
    perm = torch.randperm(n, generator=gen) if m is not None else torch.arange(n)
    size = n if m is None else min(m, n)
    chunks = [perm[i:i + size] for i in range(0, n, size)]
    bases, maxima = [], []
    for idx in chunks:
        best = -math.inf
        for _ in range(n_restarts):
            b, mx, h = _worst_chunk(prob, c, x[idx], y[idx], rho, norm, n_iters,
                                    2 * rho * step_size_mult, rand_init, gen,
                                    eval_bs)
            best = max(best, mx)
            halvings += h
        bases.append(b)
        maxima.append(best)
    base = sum(bases) / len(bases)
    value = sum(mx - b for mx, b in zip(maxima, bases, strict=True)) / len(bases)
    return base, value, n_restarts * (n_iters + 1), len(chunks), halvings


def _average_case(
    prob: _Problem, c: Tensor, x: Tensor, y: Tensor, rho: float, norm: str, n_samples: int,
    confidence: float, gen: torch.Generator, eval_bs: int | None,
) -> tuple[float, float, float, tuple[float, float]]:
    """Average-case sharpness: Monte-Carlo mean of the loss increase with a Student-t CI.

    Draws ``u ~ N(0, rho^2 I)`` (l2) or ``U[-rho, rho]^p`` (linf) in float64 from ``gen``, one
    draw per loss evaluation, and evaluates ``L(w + c * u) - L(w)`` on the whole set.

    Returns:
        ``(base, value, std_err, ci)``: ``L(w)``, the mean increase, its standard error and the
        ``confidence`` interval of the mean.
    """
    from scipy import stats

    base = prob.full_loss(torch.zeros_like(c), x, y, eval_bs)
    diffs = torch.empty(n_samples, dtype=torch.float64)
    for k in range(n_samples):
        if norm == "l2":
            u = torch.randn(c.numel(), generator=gen, dtype=torch.float64) * rho
        else:
            u = (2 * torch.rand(c.numel(), generator=gen, dtype=torch.float64) - 1) * rho
        diffs[k] = prob.full_loss(c * u.to(c.dtype), x, y, eval_bs) - base
    value = float(diffs.mean())
    std_err = float(diffs.std(unbiased=True)) / math.sqrt(n_samples)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n_samples - 1)) * std_err
    return base, value, std_err, (value - half, value + half)


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    rho: float,
    norm: str = "linf",
    kind: str = "worst",
    adaptive: bool = True,
    m: int | None = None,
    *,
    n_iters: int = 20,
    n_samples: int = 100,
    n_restarts: int = 1,
    rand_init: bool = True,
    step_size_mult: float = 1.0,
    confidence: float = 0.95,
    eval_batch_size: int | None = 4096,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
    return_details: bool = False,
) -> float | AdaptiveSharpnessResult:
    """Worst-case or average-case (adaptive) sharpness; see the module docstring for the maths.

    Args:
        model: the trained network (deep-copied in eval mode; the original is untouched).
        loss_fn: ``(logits, targets) -> mean loss``, e.g. ``BCEWithLogitsLoss()``.
        inputs: ``[N, ...]`` inputs (the training set S).
        targets: ``[N, ...]``.
        rho: radius of the ball in ``u = delta / c`` (``> 0``; with ``adaptive`` a relative
            perturbation size, e.g. ``rho = 0.01`` lets every weight move by 1 % in linf).
        norm: ``"linf"`` or ``"l2"``.
        kind: ``"worst"`` (APGD maximisation) or ``"average"`` (Monte-Carlo).
        adaptive: scale the ball element-wise by ``|w|`` (invariant to alpha-scaling).
        m: worst case only: chunk size of m-sharpness (``None``: the whole set at once).
        n_iters: APGD iterations per chunk (worst case; Andriushchenko et al. use 20).
        n_samples: Monte-Carlo draws (average case).
        n_restarts: worst case: APGD runs from independent random starts per chunk, the largest
            maximum is kept (a non-concave loss has several local maxima in the ball).
        rand_init: start the ascent at a random (seeded) point of the ball instead of ``w``.
        step_size_mult: initial step ``2 * rho * step_size_mult``.
        confidence: level of the average case's confidence interval.
        eval_batch_size: examples per forward pass (memory only, not the value).
        dtype: compute dtype of the copy (default float64); ``None`` keeps the model's.
        seed: seeds the chunks, the random start and the draws.
        return_details: return an :class:`AdaptiveSharpnessResult` instead of the float.

    Returns:
        The sharpness (float, loss units; the worst case is ``>= 0``), or the details.

    Raises:
        FlatpriorError: bad option, empty data, a model that cannot take the inputs, or a
            non-finite loss.
    """
    norm, kind, loss_fn, n, n_iters, n_samples, n_restarts, m, eval_batch_size = _check_options(
        model, loss_fn, inputs, targets, rho, norm, kind, m, n_iters, n_samples, n_restarts,
        rand_init, step_size_mult, confidence, eval_batch_size,
    )
    t0 = time.perf_counter()
    net = eval_copy(model, dtype)
    prob = _Problem(net, loss_fn, None, seed, 1.0)
    x, y = cast_data(inputs, targets, prob.dtype, prob.w0.device)
    c = prob.w0.abs() if adaptive else torch.ones_like(prob.w0)
    gen = torch.Generator().manual_seed(seed)
    rho = float(rho)
    ci = std_err = None
    halvings = 0
    if kind == "worst":
        base, value, n_evals, n_chunks, halvings = _worst_case(
            prob, c, x, y, n, rho, norm, m, n_iters, n_restarts, rand_init, step_size_mult, gen,
            eval_batch_size,
        )
    else:
        base, value, std_err, ci = _average_case(
            prob, c, x, y, rho, norm, n_samples, confidence, gen, eval_batch_size,
        )
        n_evals, n_chunks = n_samples, 1
    if not return_details:
        return value
    return AdaptiveSharpnessResult(
        value=value, base_loss=base, perturbed_loss=base + value, kind=kind, norm=norm,
        adaptive=bool(adaptive), rho=rho, m=m, ci=ci, std_err=std_err, n_evals=n_evals,
        n_chunks=n_chunks, step_halvings=halvings, wall_time_s=time.perf_counter() - t0,
    )
