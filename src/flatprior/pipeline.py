"""One run of the study: task -> model -> train to zero error -> measures -> one flat record.

:class:`RunConfig` (defined in :mod:`flatprior.config`, re-exported here) holds every choice of
a run; :func:`run` executes it and returns a JSON-serialisable record that contains the full
config, the library versions, the results and the per-epoch history. The record's ``key`` is a
hash of the config, so a sweep can skip runs it already has. The measures are dispatched
through the registry in :mod:`flatprior.measures`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flatprior._versions import versions
from flatprior.config import (
    LATER_FIELDS,
    NON_KEY_FIELDS,
    RunConfig,
    canonical_measures,
    config_key,
    make_config,
    validation_message,
)
from flatprior.errors import FlatpriorError
from flatprior.measures import FLATNESS_MEASURES, MEASURES, PRIOR_MEASURES, REGISTRY

__all__ = [
    "FLATNESS_MEASURES", "LATER_FIELDS", "MEASURES", "NON_KEY_FIELDS", "PRIOR_MEASURES",
    "RunConfig", "build_model", "build_task", "canonical_measures", "compute_measures",
    "config_key", "flatness_group", "kernel_of",
    "make_config", "prior_group", "train_record", "prior_measures", "run", "sharpness_lbfgsb",
    "validation_message", "versions",
]


def build_task(cfg: RunConfig):
    """The run's :class:`flatprior.data.Task` (S, A, E drawn from ``data_seed`` or ``seed``)."""
    from flatprior.data import make_task

    return make_task(
        cfg.dataset,
        cfg.n_train,
        cfg.n_attack,
        cfg.n_test,
        cfg.seed if cfg.data_seed is None else cfg.data_seed,
        cfg.data_root,
        target=cfg.boolean_target,
        data_path=cfg.data_path,
        label_column=cfg.label_column,
    )


def build_model(cfg: RunConfig, input_shape, seed: int | None = None):
    """The run's initialised network for inputs of ``input_shape`` (``seed`` overrides)."""
    from flatprior.models import make_model

    return make_model(
        cfg.model,
        input_shape,
        hidden=cfg.hidden,
        width=cfg.width,
        sigma_w2=cfg.sigma_w2,
        sigma_b2=cfg.sigma_b2,
        seed=cfg.seed if seed is None else seed,
    )


def compute_measures(model, task, cfg: RunConfig, which) -> dict[str, Any]:
    """Flatness and prior measures of ``model`` on ``task`` (eval mode, un-augmented data).

    Dispatched through :data:`flatprior.measures.REGISTRY`: the requested measures are grouped
    by their compute function (measures that share one are computed by one call, e.g. the
    Hessian measures on one operator), groups in registry order.

    Flatness is measured on the clean training set S with the mean BCE loss. log P(f) is taken on
    X = S ∪ E (attack set excluded) with the network's own predictions as labels; the PAC-Bayes
    bound uses the log marginal likelihood of S's true labels.
    """
    groups: dict[str, list[str]] = {}
    for name in REGISTRY:
        if name in which:
            groups.setdefault(REGISTRY[name].compute, []).append(name)
    out: dict[str, Any] = {}
    for names in groups.values():
        out.update(REGISTRY[names[0]].function()(model, task, cfg, tuple(names)))
    return out


def flatness_group(model, task, cfg: RunConfig, which) -> dict[str, Any]:
    """The measures of :func:`flatprior.flatness.flatness_measures` in ``which``, on S."""
    from flatprior.flatness import flatness_measures

    return flatness_measures(
        model, task.x_train, task.y_train, which=tuple(which), eps=cfg.sharpness_eps,
        sharpness_method=cfg.sharpness_method, sharpness_epochs=cfg.sharpness_epochs,
        topk=cfg.topk, adaptive_norm=cfg.adaptive_norm, adaptive_rho=cfg.adaptive_rho,
        adaptive_avg_rho=cfg.adaptive_avg_rho, adaptive_iters=cfg.adaptive_iters,
        adaptive_m=cfg.adaptive_m, adaptive_samples=cfg.adaptive_samples,
        pac_bayes_target=cfg.pac_bayes_target, pac_bayes_metric=cfg.pac_bayes_metric,
        pac_bayes_samples=cfg.pac_bayes_samples, seed=cfg.seed,
    )


def prior_group(model, task, cfg: RunConfig, which) -> dict[str, Any]:
    """``log_prior`` and/or ``pac_bayes`` (in ``which``) on one kernel: :func:`prior_measures`."""
    return prior_measures(model, task, cfg, log_prior="log_prior" in which,
                          pac_bayes="pac_bayes" in which)


def sharpness_lbfgsb(model, task, cfg: RunConfig, which=("sharpness_lbfgsb",)) -> dict[str, Any]:
    """Keskar sharpness maximised by L-BFGS-B (maxiter 10, full batch, float64) on S.

    Stored beside the ascent's ``sharpness`` so a record shows how converged the ascent was
    (Keskar et al.'s own maximiser; measured converged at maxiter 10 on MNIST FCNs). Keys:
    ``sharpness_lbfgsb``, ``sharpness_lbfgsb_time_s``. ``which`` is the registry's call
    protocol (this function computes one measure).
    """
    from torch import nn

    from flatprior.flatness import keskar_sharpness

    t0 = time.perf_counter()
    value = keskar_sharpness(
        model, nn.BCEWithLogitsLoss(), task.x_train, task.y_train.reshape(-1, 1),
        eps=cfg.sharpness_eps, method="lbfgsb", dtype=torch.float64, seed=cfg.seed,
    )
    return {"sharpness_lbfgsb": float(value),
            "sharpness_lbfgsb_time_s": time.perf_counter() - t0}


def kernel_of(x: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """NNGP kernel of inputs ``x`` for the run's architecture (float64 ``[n, n]``)."""
    from flatprior.prior import arccos_kernel, empirical_kernel

    if cfg.kernel == "arccos":
        if cfg.model != "fcn":
            raise FlatpriorError(
                f"the arc-cosine kernel is the NNGP of an FCN, not of {cfg.model!r}; "
                "use kernel='empirical'"
            )
        return arccos_kernel(
            x.reshape(len(x), -1).double(),
            depth=len(cfg.hidden),
            sigma_w2=cfg.sigma_w2,
            sigma_b2=cfg.sigma_b2,
        )
    return empirical_kernel(
        lambda s: build_model(cfg, tuple(x.shape[1:]), seed=10_000 + s),
        x,
        cfg.kernel_draws,
        sigma_w2=cfg.sigma_w2,
        sigma_b2=cfg.sigma_b2,
    )


def log_prior_fields(res) -> dict[str, Any]:
    """A log P(f) estimate as record fields.

    ``log_prior`` (natural log) and ``log_prior_converged``, plus ``log_prior_std_err`` /
    ``_ci_low`` / ``_ci_high`` where the method gives them.
    """
    out = {"log_prior": float(res.log_prob), "log_prior_converged": bool(res.converged)}
    for name in ("std_err", "ci_low", "ci_high"):
        value = getattr(res, name)
        if value is not None:
            out[f"log_prior_{name}"] = float(value)
    return out


def prior_measures(model, task, cfg: RunConfig, *, log_prior=True, pac_bayes=True):
    """Compute log P(f) on S ∪ E and/or the PAC-Bayes bound (from S's labels) on one kernel.

    Keys: ``kernel_time_s``; ``log_prior`` (natural log), ``log_prior_converged``,
    ``log_prior_std_err``/``_ci_low``/``_ci_high`` (where the method gives them),
    ``log_prior_time_s``; ``log_p_train``, ``pac_bayes_bound``, ``pac_bayes_time_s``.
    """
    from flatprior.prior import log_prior as log_prior_fn
    from flatprior.prior import pac_bayes_bound
    from flatprior.train import predict

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    x = torch.cat([task.x_train, task.x_test])
    K = kernel_of(x, cfg)
    out["kernel_time_s"] = time.perf_counter() - t0
    if log_prior:
        t0 = time.perf_counter()
        labels = predict(model, x)
        out.update(log_prior_fields(log_prior_fn(K, labels, method=cfg.prior_method)))
        out["log_prior_time_s"] = time.perf_counter() - t0
    if pac_bayes:
        t0 = time.perf_counter()
        m = len(task.y_train)
        res = log_prior_fn(K[:m, :m], task.y_train, method=cfg.prior_method)
        out["log_p_train"] = float(res.log_prob)
        out["pac_bayes_bound"] = float(pac_bayes_bound(res.log_prob, m, cfg.pac_bayes_delta))
        out["pac_bayes_time_s"] = time.perf_counter() - t0
    return out


def _alpha_callback(cfg: RunConfig, task) -> Callable:
    """Callback applying the Dinh alpha-scaling in place at epoch ``alpha_epoch``.

    When per-epoch measures are on (``measure_every > 0``), the epoch measures are also taken on
    the weights just *before* the scaling (``m["before_alpha"]``), so the event's effect is read
    on identical functions rather than across an epoch of training; ``m["alpha_same_function"]``
    says whether the predictions on S ∪ E are identical before and after (they must be).
    """
    from flatprior.models import alpha_scale
    from flatprior.train import predict

    state = {"zero": None, "done": False}

    def cb(model, m):
        if state["zero"] is None and m["phase"] == "overtrain":
            state["zero"] = m["epoch"] - 1
        if state["done"] or cfg.alpha_epoch is None:
            return None
        base = state["zero"] if cfg.alpha_after_zero_error else 0
        if base is None or m["epoch"] != base + cfg.alpha_epoch:
            return None
        model.eval()
        x = torch.cat([task.x_train, task.x_test])
        before = predict(model, x)
        if cfg.measure_every:
            m["before_alpha"] = compute_measures(model, task, cfg, cfg.epoch_measures)
        scaled = alpha_scale(model, cfg.alpha_layer, cfg.alpha)
        with torch.no_grad():
            for p, q in zip(model.parameters(), scaled.parameters(), strict=True):
                p.copy_(q)
        m["alpha_scaled"] = True
        m["alpha_same_function"] = bool(torch.equal(before, predict(model, x)))
        state["done"] = True
        return None

    return cb


def run(
    cfg: RunConfig | dict,
    *,
    progress: Callable[[dict], None] | None = None,
    save_model: str | None = None,
) -> dict[str, Any]:
    """Execute one run and return its record (JSON-serialisable dict).

    ``save_model``: also write the trained network to this path as a weights-only checkpoint
    (:func:`flatprior.checkpoint.save_checkpoint`, atomic; the record's config is stored in it).

    The record holds ``key``, ``config`` (all fields), ``versions``, the training outcome
    (``status``, ``epochs_to_zero_error``, ``train_error``, ``attack_error``, ``test_error`` —
    the generalization error, a fraction), every requested measure with its wall time
    (``<measure>_time_s``), and ``history`` (per-epoch metrics, plus measures every
    ``measure_every`` epochs).
    """
    from flatprior.train import train

    if isinstance(cfg, dict):
        cfg = make_config(**cfg)
    t_start = time.perf_counter()
    task = build_task(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task.input_shape)
    tcfg = cfg.train_config()
    callbacks: list[Callable] = []
    if cfg.alpha_epoch is not None:
        callbacks.append(_alpha_callback(cfg, task))
    if cfg.measure_every:

        first_fit = {"seen": False}

        def per_epoch(model, m):
            # also measure at the first epoch that fits S: the study's "at zero error" point
            fit_now = not first_fit["seen"] and m["train_acc"] == 1.0
            first_fit["seen"] |= fit_now
            if m["epoch"] % cfg.measure_every == 0 or m.get("alpha_scaled") or fit_now:
                model.eval()
                m.update(compute_measures(model, task, cfg, cfg.epoch_measures))

        callbacks.append(per_epoch)
    result = train(model, task, tcfg, callbacks, progress=progress)
    model.eval()
    record = train_record(cfg, task, model, result)
    record.update(compute_measures(model, task, cfg, cfg.measures))
    record["history"] = result.history
    record["wall_time_s"] = time.perf_counter() - t_start
    record = _jsonable(record)
    if save_model is not None:
        from pathlib import Path

        from flatprior.checkpoint import save_checkpoint

        path = Path(save_model).expanduser()
        try:
            save_checkpoint(model, path.name, config=record["config"], out_dir=path.parent)
        except FlatpriorError as exc:
            exc.record = record  # the measured run is not lost: callers can still report it
            raise
        record["model_path"] = str(path)
    return record


def train_record(cfg: RunConfig, task, model, result) -> dict[str, Any]:
    """The record's fields up to the measures.

    Key, config, versions, the training outcome, ``train_time_s``, ``notes``, how the run was
    executed (``executed_as``: ``"single"`` here, ``"ensemble"`` on the ensemble path, with
    ``ensemble_size`` members in its work item, 1 here) and (Boolean) ``function``. Shared by
    :func:`run` and the ensemble path (:mod:`flatprior.experiments.ensemble`), so both write the
    same fields.
    """
    record: dict[str, Any] = {
        "key": cfg.key(),
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        **{
            k: v
            for k, v in cfg.model_dump(mode="json").items()
            if k in ("dataset", "n_train", "n_attack", "n_test", "seed", "optimizer", "model")
        },
        **result.summary(),
        "train_time_s": result.wall_time_s,
        "notes": task.notes,
        # provenance: the two paths agree to float32 rounding, which long training can amplify
        "executed_as": "single",
        "ensemble_size": 1,
    }
    record.pop("wall_time_s")
    if cfg.dataset == "boolean":
        from flatprior.data.boolean import boolean_inputs
        from flatprior.train import predict

        bits = predict(model, torch.as_tensor(boolean_inputs())).int().tolist()
        record["function"] = "".join(map(str, bits))  # f on all 128 inputs, input order of
        # flatprior.data.boolean.boolean_inputs
    return record


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:
        return None  # NaN is not JSON; None says "not measured"
    return obj
