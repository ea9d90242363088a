"""Flatness measures of a trained network's loss around its weights, and norm baselines.

Keskar sharpness, Hessian spectrum/trace, relative flatness (and FAM), adaptive sharpness,
PAC-Bayes flatness, and the norm baselines (path norm, layer-norm products).

All measures are pure functions of ``(model, loss_fn, inputs, targets)``: they work on a deep copy
of the model in eval mode (float64 by default) and leave the model untouched.
:func:`flatness_measures` bundles them for the trainer's records, with wall times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from flatprior.errors import check_choice
from flatprior.flatness._common import LossFn
from flatprior.flatness.adaptive import AdaptiveSharpnessResult, adaptive_sharpness
from flatprior.flatness.hessian import (
    CurvatureOptions,
    hessian_log_product_topk,
    hessian_operator,
    hessian_spectral_norm,
    hessian_top_eigenvalues,
    hessian_trace,
    log_product_topk,
    spectral_norm,
    top_eigenvalues,
    trace,
)
from flatprior.flatness.keskar import SharpnessResult, keskar_sharpness
from flatprior.flatness.norms import layer_norms, log_prod_frobenius, log_prod_spectral, path_norm
from flatprior.flatness.pac_bayes_flatness import PacBayesFlatnessResult, pac_bayes_flatness
from flatprior.flatness.relative import fam_regularizer, relative_flatness

MEASURES = ("sharpness", "spectral_norm", "logprod_topk", "trace", "relative_flatness",
            "adaptive_worst", "adaptive_average", "pac_bayes_flatness", "pac_bayes_mag_flatness",
            "path_norm", "log_prod_spectral", "log_prod_frobenius")

__all__ = [
    "MEASURES", "AdaptiveSharpnessResult", "CurvatureOptions", "FlatnessOptions",
    "PacBayesFlatnessResult", "SharpnessResult", "adaptive_sharpness", "fam_regularizer",
    "flatness_measures", "hessian_log_product_topk", "hessian_operator", "hessian_spectral_norm",
    "hessian_top_eigenvalues", "hessian_trace", "keskar_sharpness", "layer_norms",
    "log_prod_frobenius", "log_prod_spectral", "log_product_topk", "pac_bayes_flatness",
    "path_norm", "relative_flatness", "spectral_norm", "top_eigenvalues", "trace",
]


@dataclass(frozen=True)
class FlatnessOptions:
    """Settings of :func:`flatness_measures` (each passed to the measure named in brackets).

    Attributes:
        eps: box radius ``epsilon`` [sharpness].
        sharpness_method: ``"sgd"`` or ``"lbfgsb"`` [sharpness].
        sharpness_lr, sharpness_batch_size, sharpness_epochs: SGD ascent [sharpness].
        lbfgs_maxiter: L-BFGS-B iterations [sharpness].
        topk: ``k`` of the log-product, capped at the number of parameters [logprod_topk].
        trace_method, trace_samples: estimator and its matrix-vector products [trace].
        relative_layer: layer (default: last Linear/Conv) [relative_flatness].
        adaptive_norm, adaptive_rho, adaptive_iters, adaptive_m: ball, radius (scaled by
            ``|w|``), APGD steps and m-sharpness [adaptive_worst].
        adaptive_avg_rho, adaptive_samples: Gaussian scale and draws [adaptive_average].
        pac_bayes_target, pac_bayes_metric, pac_bayes_samples: the allowed rise of the
            expected loss (or error), and Monte-Carlo draws [pac_bayes_flatness,
            pac_bayes_mag_flatness].
        batch_size: examples per chunk of every loss/HVP evaluation [Hessian measures,
            relative_flatness].
        dtype: compute dtype (default float64) [all].
        seed: seeds every random choice (ascent batches, ARPACK start, trace probes) [all].
    """

    eps: float = 1e-4
    sharpness_method: str = "sgd"
    sharpness_lr: float = 1e-3
    sharpness_batch_size: int = 128
    sharpness_epochs: int = 100
    lbfgs_maxiter: int = 10
    topk: int = 50
    trace_method: str = "hutchinson"
    trace_samples: int = 100
    relative_layer: int | nn.Module | None = None
    adaptive_norm: str = "linf"
    adaptive_rho: float = 0.01
    adaptive_avg_rho: float = 0.1
    adaptive_iters: int = 20
    adaptive_m: int | None = None
    adaptive_samples: int = 100
    pac_bayes_target: float = 0.1
    pac_bayes_metric: str = "loss"
    pac_bayes_samples: int = 10
    batch_size: int | None = 1024
    dtype: torch.dtype | None = torch.float64
    seed: int = 0

    def curvature(self) -> CurvatureOptions:
        """The Hessian operator's options."""
        return CurvatureOptions(batch_size=self.batch_size, dtype=self.dtype, seed=self.seed)


@dataclass
class _Problem:
    """One model and data set, with the Hessian operator built at most once."""

    model: nn.Module
    loss_fn: LossFn
    inputs: Tensor
    targets: Tensor
    opts: FlatnessOptions
    _op: Any = None

    def hessian(self):
        if self._op is None:
            c = self.opts.curvature()
            self._op = hessian_operator(self.model, self.loss_fn, self.inputs, self.targets,
                                        batch_size=c.batch_size, dtype=c.dtype, hvp=c.hvp,
                                        cache_graph=c.cache_graph)
        return self._op


def _sharpness(pb: _Problem) -> tuple[str, dict[str, Any]]:
    o = pb.opts
    res = keskar_sharpness(
        pb.model, pb.loss_fn, pb.inputs, pb.targets, o.eps, o.sharpness_method,
        lr=o.sharpness_lr, batch_size=o.sharpness_batch_size, epochs=o.sharpness_epochs,
        lbfgs_maxiter=o.lbfgs_maxiter, dtype=o.dtype, seed=o.seed, return_details=True,
    )
    return "sharpness", {"sharpness": res.value, "sharpness_method": o.sharpness_method,
                         "sharpness_eps": float(o.eps), "sharpness_steps": res.n_steps}


def _spectral_norm(pb: _Problem) -> tuple[str, dict[str, Any]]:
    c = pb.opts.curvature()
    return "spectral_norm", {"spectral_norm": spectral_norm(pb.hessian(), tol=c.tol, ncv=c.ncv,
                                                            seed=c.seed)}


def _logprod_topk(pb: _Problem) -> tuple[str, dict[str, Any]]:
    n_params = sum(p.numel() for p in pb.model.parameters() if p.requires_grad)
    key = f"logprod_top{pb.opts.topk}"
    c = pb.opts.curvature()
    val, npos = log_product_topk(pb.hessian(), min(pb.opts.topk, n_params), tol=c.tol,
                                 ncv=c.ncv, seed=c.seed, return_count=True)
    return key, {key: val, f"{key}_npos": npos}  # val is -inf if no eigenvalue is positive


def _trace(pb: _Problem) -> tuple[str, dict[str, Any]]:
    o = pb.opts
    val = trace(pb.hessian(), method=o.trace_method, n_samples=o.trace_samples, seed=o.seed)
    return "trace", {"trace": val, "trace_method": o.trace_method}


def _relative_flatness(pb: _Problem) -> tuple[str, dict[str, Any]]:
    o = pb.opts
    val = relative_flatness(pb.model, pb.loss_fn, pb.inputs, pb.targets, o.relative_layer,
                            batch_size=o.batch_size, dtype=o.dtype)
    return "relative_flatness", {"relative_flatness": val}


def _adaptive_worst(pb: _Problem) -> tuple[str, dict[str, Any]]:
    o = pb.opts
    val = adaptive_sharpness(
        pb.model, pb.loss_fn, pb.inputs, pb.targets, o.adaptive_rho, o.adaptive_norm, "worst",
        True, o.adaptive_m, n_iters=o.adaptive_iters, eval_batch_size=o.batch_size,
        dtype=o.dtype, seed=o.seed,
    )
    return "adaptive_worst", {"adaptive_worst": val, "adaptive_worst_norm": o.adaptive_norm,
                              "adaptive_worst_rho": float(o.adaptive_rho)}


def _adaptive_average(pb: _Problem) -> tuple[str, dict[str, Any]]:
    o = pb.opts
    res = adaptive_sharpness(
        pb.model, pb.loss_fn, pb.inputs, pb.targets, o.adaptive_avg_rho, "l2", "average", True,
        n_samples=o.adaptive_samples, eval_batch_size=o.batch_size, dtype=o.dtype, seed=o.seed,
        return_details=True,
    )
    key = "adaptive_average"
    return key, {key: res.value, f"{key}_ci_low": res.ci[0], f"{key}_ci_high": res.ci[1],
                 f"{key}_rho": float(o.adaptive_avg_rho)}


def _pac_bayes(magnitude_aware: bool) -> Callable[[_Problem], tuple[str, dict[str, Any]]]:
    key = "pac_bayes_mag_flatness" if magnitude_aware else "pac_bayes_flatness"

    def compute(pb: _Problem) -> tuple[str, dict[str, Any]]:
        o = pb.opts
        res = pac_bayes_flatness(
            pb.model, pb.loss_fn, pb.inputs, pb.targets, o.pac_bayes_target, magnitude_aware,
            metric=o.pac_bayes_metric, n_samples=o.pac_bayes_samples,
            eval_batch_size=o.batch_size, seed=o.seed, return_details=True,
        )
        return key, {key: res.value, f"{key}_ci_low": res.value_ci[0],
                     f"{key}_ci_high": res.value_ci[1], f"{key}_sigma": res.sigma}

    return compute


def _norm(key: str, fn: Callable[[_Problem], float]):
    return lambda pb: (key, {key: fn(pb)})


_COMPUTE: dict[str, Callable[[_Problem], tuple[str, dict[str, Any]]]] = {
    "sharpness": _sharpness,
    "spectral_norm": _spectral_norm,
    "logprod_topk": _logprod_topk,
    "trace": _trace,
    "relative_flatness": _relative_flatness,
    "adaptive_worst": _adaptive_worst,
    "adaptive_average": _adaptive_average,
    "pac_bayes_flatness": _pac_bayes(False),
    "pac_bayes_mag_flatness": _pac_bayes(True),
    "path_norm": _norm("path_norm", lambda pb: path_norm(pb.model, tuple(pb.inputs.shape[1:]))),
    "log_prod_spectral": _norm("log_prod_spectral", lambda pb: log_prod_spectral(pb.model)),
    "log_prod_frobenius": _norm("log_prod_frobenius", lambda pb: log_prod_frobenius(pb.model)),
}


def flatness_measures(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: LossFn | None = None,
    which: Iterable[str] = MEASURES,
    options: FlatnessOptions | None = None,
    **settings: Any,
) -> dict[str, float | int | str]:
    """Compute the selected flatness measures of ``model`` on ``(inputs, targets)`` (the set S).

    Keys (only for the measures in ``which``; each value comes with ``<key>_time_s``):

    - ``sharpness`` (+ ``sharpness_method``, ``sharpness_eps``, ``sharpness_steps``):
      :func:`keskar_sharpness`;
    - ``spectral_norm``: :func:`spectral_norm` of the Hessian;
    - ``logprod_top{topk}`` (+ ``logprod_top{topk}_npos``, the number of positive eigenvalues
      used): :func:`log_product_topk` (natural log);
    - ``trace`` (+ ``trace_method``): :func:`trace` of the Hessian;
    - ``relative_flatness``: :func:`relative_flatness` of ``relative_layer`` (default: last layer).
    - ``adaptive_worst`` (+ ``adaptive_worst_norm``, ``adaptive_worst_rho``) and
      ``adaptive_average`` (+ ``_ci_low``/``_ci_high``, ``_rho``): :func:`adaptive_sharpness`;
    - ``pac_bayes_flatness`` / ``pac_bayes_mag_flatness`` (+ ``_ci_low``/``_ci_high``,
      ``_sigma``): :func:`pac_bayes_flatness` (plain / magnitude-aware), ``1/sigma'^2``;
    - ``path_norm``, ``log_prod_spectral``, ``log_prod_frobenius``: :mod:`.norms`.

    The Hessian operator is built once and shared by the spectral norm, the log-product and the
    trace.

    Args:
        model: the trained network (not modified).
        inputs: the set S, ``[N, ...]``.
        targets: its 0/1 labels, ``[N]`` or ``[N, 1]``.
        loss_fn: mean loss; default ``BCEWithLogitsLoss()`` (one logit, float 0/1 targets whose
            shape is made to match the logits ``[N, 1]``).
        which: subset of ``MEASURES`` to compute.
        options: :class:`FlatnessOptions`.
        **settings: fields of :class:`FlatnessOptions` given one by one (e.g. ``eps=1e-3,
            topk=20``); they override ``options``.
    """
    known = {f.name for f in fields(FlatnessOptions)}
    for name in settings:
        if name not in known:
            raise TypeError(f"flatness_measures() got an unexpected keyword argument {name!r}")
    opts = replace(options or FlatnessOptions(), **settings)
    which = [check_choice("flatness measure", w, MEASURES) for w in which]
    if loss_fn is None:
        loss_fn = nn.BCEWithLogitsLoss()
        if targets.ndim == 1:
            targets = targets.reshape(-1, 1)
    pb = _Problem(model, loss_fn, inputs, targets, opts)
    out: dict[str, float | int | str] = {}
    for name in which:
        t0 = time.perf_counter()
        key, values = _COMPUTE[name](pb)
        out.update(values)
        out[f"{key}_time_s"] = time.perf_counter() - t0
    return out
