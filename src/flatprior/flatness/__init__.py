"""Flatness measures: Keskar sharpness, Hessian spectrum/trace, relative flatness (and FAM),
adaptive sharpness, PAC-Bayes flatness, and the norm baselines (path norm, layer-norm products).

All measures are pure functions of ``(model, loss_fn, inputs, targets)``: they work on a deep copy
of the model in eval mode (float64 by default) and leave the model untouched.
:func:`flatness_measures` bundles them for the trainer's records, with wall times.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from flatprior.errors import check_choice
from flatprior.flatness._common import LossFn
from flatprior.flatness.adaptive import AdaptiveSharpnessResult, adaptive_sharpness
from flatprior.flatness.hessian import (
    hessian_log_product_topk,
    hessian_operator,
    hessian_spectral_norm,
    hessian_top_eigenvalues,
    hessian_trace,
)
from flatprior.flatness.keskar import SharpnessResult, keskar_sharpness
from flatprior.flatness.norms import layer_norms, log_prod_frobenius, log_prod_spectral, path_norm
from flatprior.flatness.pac_bayes_flatness import PacBayesFlatnessResult, pac_bayes_flatness
from flatprior.flatness.relative import fam_regularizer, relative_flatness

MEASURES = ("sharpness", "spectral_norm", "logprod_topk", "trace", "relative_flatness",
            "adaptive_worst", "adaptive_average", "pac_bayes_flatness", "pac_bayes_mag_flatness",
            "path_norm", "log_prod_spectral", "log_prod_frobenius")

__all__ = [
    "MEASURES", "AdaptiveSharpnessResult", "PacBayesFlatnessResult", "SharpnessResult",
    "adaptive_sharpness", "fam_regularizer", "flatness_measures", "hessian_log_product_topk",
    "hessian_operator", "hessian_spectral_norm", "hessian_top_eigenvalues", "hessian_trace",
    "keskar_sharpness", "layer_norms", "log_prod_frobenius", "log_prod_spectral",
    "pac_bayes_flatness", "path_norm", "relative_flatness",
]


def flatness_measures(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: LossFn | None = None,
    which: Iterable[str] = MEASURES,
    eps: float = 1e-4,
    sharpness_method: str = "sgd",
    sharpness_lr: float = 1e-3,
    sharpness_batch_size: int = 128,
    sharpness_epochs: int = 100,
    lbfgs_maxiter: int = 10,
    topk: int = 50,
    trace_method: str = "hutchinson",
    trace_samples: int = 100,
    relative_layer: int | nn.Module | None = None,
    adaptive_norm: str = "linf",
    adaptive_rho: float = 0.01,
    adaptive_avg_rho: float = 0.1,
    adaptive_iters: int = 20,
    adaptive_m: int | None = None,
    adaptive_samples: int = 100,
    pac_bayes_target: float = 0.1,
    pac_bayes_metric: str = "loss",
    pac_bayes_samples: int = 10,
    batch_size: int | None = 1024,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """Compute the selected flatness measures of ``model`` on ``(inputs, targets)`` (the set S).

    Keys (only for the measures in ``which``; each value comes with ``<key>_time_s``):

    - ``sharpness`` (+ ``sharpness_method``, ``sharpness_eps``, ``sharpness_steps``):
      :func:`keskar_sharpness`;
    - ``spectral_norm``: :func:`hessian_spectral_norm`;
    - ``logprod_top{topk}`` (+ ``logprod_top{topk}_npos``, the number of positive eigenvalues
      used): :func:`hessian_log_product_topk` (natural log);
    - ``trace`` (+ ``trace_method``): :func:`hessian_trace`;
    - ``relative_flatness``: :func:`relative_flatness` of ``relative_layer`` (default: last layer).
    - ``adaptive_worst``: :func:`adaptive_sharpness`, ``kind="worst"``, ``adaptive_norm`` ball of
      radius ``adaptive_rho`` scaled by ``|w|``, ``adaptive_iters`` APGD steps, m-sharpness with
      ``adaptive_m`` (+ ``adaptive_worst_norm``, ``adaptive_worst_rho``);
    - ``adaptive_average``: :func:`adaptive_sharpness`, ``kind="average"``, Gaussian
      ``u ~ N(0, adaptive_avg_rho^2)`` scaled by ``|w|`` (l2), ``adaptive_samples`` draws
      (+ ``adaptive_average_ci_low``/``_ci_high``, ``adaptive_average_rho``);
    - ``pac_bayes_flatness`` / ``pac_bayes_mag_flatness``: :func:`pac_bayes_flatness` (plain /
      magnitude-aware) ``1/sigma'^2`` with ``pac_bayes_target``, ``pac_bayes_metric``,
      ``pac_bayes_samples`` (+ ``<key>_ci_low``/``_ci_high``, ``<key>_sigma``);
    - ``path_norm``, ``log_prod_spectral``, ``log_prod_frobenius``: :mod:`.norms`.

    Args:
        loss_fn: mean loss; default ``BCEWithLogitsLoss()`` (one logit, float 0/1 targets whose
            shape is made to match the logits ``[N, 1]``).
        which: subset of ``MEASURES`` to compute.
        topk: ``k`` of the log-product (capped at the number of parameters).
        Other arguments are passed to the respective measure.
    """
    which = [check_choice("flatness measure", w, MEASURES) for w in which]
    if loss_fn is None:
        loss_fn = nn.BCEWithLogitsLoss()
        if targets.ndim == 1:
            targets = targets.reshape(-1, 1)
    out: dict[str, float | int | str] = {}
    common = {"batch_size": batch_size, "dtype": dtype}
    for name in which:
        t0 = time.perf_counter()
        if name == "sharpness":
            res = keskar_sharpness(
                model, loss_fn, inputs, targets, eps, sharpness_method, lr=sharpness_lr,
                batch_size=sharpness_batch_size, epochs=sharpness_epochs,
                lbfgs_maxiter=lbfgs_maxiter, dtype=dtype, seed=seed, return_details=True,
            )
            out.update(sharpness=res.value, sharpness_method=sharpness_method,
                       sharpness_eps=float(eps), sharpness_steps=res.n_steps)
            key = "sharpness"
        elif name == "spectral_norm":
            out["spectral_norm"] = hessian_spectral_norm(
                model, loss_fn, inputs, targets, seed=seed, **common
            )
            key = "spectral_norm"
        elif name == "logprod_topk":
            n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            key = f"logprod_top{topk}"
            val, npos = hessian_log_product_topk(
                model, loss_fn, inputs, targets, min(topk, n_params), seed=seed,
                return_count=True, **common,
            )
            out[key] = val  # -inf if no eigenvalue is positive
            out[f"{key}_npos"] = npos
        elif name == "trace":
            out["trace"] = hessian_trace(
                model, loss_fn, inputs, targets, method=trace_method, n_samples=trace_samples,
                seed=seed, **common,
            )
            out["trace_method"] = trace_method
            key = "trace"
        elif name == "relative_flatness":
            out["relative_flatness"] = relative_flatness(
                model, loss_fn, inputs, targets, relative_layer, **common
            )
            key = "relative_flatness"
        elif name == "adaptive_worst":
            key = name
            out[key] = adaptive_sharpness(
                model, loss_fn, inputs, targets, adaptive_rho, adaptive_norm, "worst", True,
                adaptive_m, n_iters=adaptive_iters, eval_batch_size=batch_size, dtype=dtype,
                seed=seed,
            )
            out.update(adaptive_worst_norm=adaptive_norm, adaptive_worst_rho=float(adaptive_rho))
        elif name == "adaptive_average":
            key = name
            res = adaptive_sharpness(
                model, loss_fn, inputs, targets, adaptive_avg_rho, "l2", "average", True,
                n_samples=adaptive_samples, eval_batch_size=batch_size, dtype=dtype, seed=seed,
                return_details=True,
            )
            out.update({key: res.value, f"{key}_ci_low": res.ci[0], f"{key}_ci_high": res.ci[1],
                        f"{key}_rho": float(adaptive_avg_rho)})
        elif name in ("pac_bayes_flatness", "pac_bayes_mag_flatness"):
            key = name
            res = pac_bayes_flatness(
                model, loss_fn, inputs, targets, pac_bayes_target,
                name == "pac_bayes_mag_flatness", metric=pac_bayes_metric,
                n_samples=pac_bayes_samples, eval_batch_size=batch_size, seed=seed,
                return_details=True,
            )
            out.update({key: res.value, f"{key}_ci_low": res.value_ci[0],
                        f"{key}_ci_high": res.value_ci[1], f"{key}_sigma": res.sigma})
        else:
            key = name
            if name == "path_norm":
                out[key] = path_norm(model, tuple(inputs.shape[1:]))
            elif name == "log_prod_spectral":
                out[key] = log_prod_spectral(model)
            else:
                out[key] = log_prod_frobenius(model)
        out[f"{key}_time_s"] = time.perf_counter() - t0
    return out
