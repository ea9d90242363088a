"""One run of the study: task -> model -> train to zero error -> measures -> one flat record.

:class:`RunConfig` holds every choice of a run (validated by pydantic); :func:`run` executes it
and returns a JSON-serialisable record that contains the full config, the library versions, the
results and the per-epoch history. The record's ``key`` is a hash of the config, so a sweep can
skip runs it already has.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flatprior.errors import FlatpriorError

FLATNESS_MEASURES = ("sharpness", "spectral_norm", "logprod_topk", "trace", "relative_flatness")
PRIOR_MEASURES = ("log_prior", "pac_bayes")
MEASURES = FLATNESS_MEASURES + PRIOR_MEASURES
# Fields that say where things are, not what is computed: left out of the run key.
NON_KEY_FIELDS = ("data_root",)


class RunConfig(BaseModel):
    """Every choice of one run. Unknown fields and wrong types are errors."""

    # allow_inf_nan=False: an inf/NaN number in a config is always a mistake
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # data
    dataset: str = "digits"
    data_root: str | None = None
    n_train: int = Field(500, ge=1)
    n_attack: int = Field(0, ge=0)
    n_test: int | None = Field(1000, ge=0)
    boolean_target: str | None = None
    # seeds up to 2^32 - 1: what every RNG used here accepts (torch fails above 2^64 - 1,
    # numpy's legacy RandomState and scikit-learn above 2^32 - 1)
    data_seed: int | None = Field(None, ge=0, le=2**32 - 1)  # None: use ``seed``
    # model
    model: str = "fcn"
    hidden: tuple[Annotated[int, Field(ge=1)], ...] = (40, 40)
    width: int | None = Field(None, ge=1)
    sigma_w2: float = Field(2.0, gt=0)
    sigma_b: float = Field(1.0, ge=0)
    # training
    seed: int = Field(0, ge=0, le=2**32 - 1)
    optimizer: str = "sgd"
    lr: float | None = Field(None, gt=0)
    batch_size: int = Field(128, ge=1)
    max_epochs: int = Field(2000, ge=1)
    overtrain_epochs: int = Field(0, ge=0)
    zero_error_on: Literal["train", "train+attack"] = "train"
    loss_reduction: Literal["mean", "sum"] = "mean"
    augment: bool = False
    fam_strength: float = Field(0.0, ge=0)
    # measures at the end of training
    measures: tuple[str, ...] = ("sharpness", "log_prior")
    sharpness_eps: float = Field(1e-4, gt=0)
    sharpness_method: Literal["sgd", "lbfgsb"] = "sgd"
    sharpness_epochs: int = Field(100, ge=1)
    topk: int = Field(50, ge=1)
    prior_method: Literal["ep", "tilting", "mc"] = "ep"
    kernel: Literal["arccos", "empirical"] = "arccos"
    kernel_draws: int = Field(200, ge=1)
    pac_bayes_delta: float = Field(0.05, gt=0, lt=1)
    # per-epoch measures (Fig 5): every ``measure_every`` epochs, 0 = never
    measure_every: int = Field(0, ge=0)
    epoch_measures: tuple[str, ...] = ("sharpness", "log_prior")
    # Dinh alpha-scaling applied in place at the end of epoch ``alpha_epoch`` (after zero error
    # if ``alpha_after_zero_error``)
    alpha_epoch: int | None = Field(None, ge=0)
    alpha_after_zero_error: bool = True
    alpha_layer: int = Field(0, ge=0)
    alpha: float = Field(5.0, gt=0)

    @field_validator("measures", "epoch_measures")
    @classmethod
    def _known_measures(cls, v):
        bad = [m for m in v if m not in MEASURES]
        if bad:
            raise ValueError(f"unknown measure(s) {bad}; choose from {list(MEASURES)}")
        return canonical_measures(v)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v):
        from flatprior.data import DATASETS

        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of {list(DATASETS)}")
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v):
        from flatprior.models import MODELS

        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; choose one of {list(MODELS)}")
        return v

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v):
        from flatprior.train import OPTIMIZERS

        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {v!r}; choose one of {sorted(OPTIMIZERS)}")
        return v

    def key(self) -> str:
        """16-hex-digit hash of the config (without paths): the run's identity in a store.

        Measure lists enter in canonical form (:func:`canonical_measures`), so
        ``measures=log_prior,sharpness``, ``sharpness,log_prior`` and ``sharpness,sharpness,
        log_prior`` are one run with one key.

        Migration: before this rule (flatprior 0.x stores written before issue #17) the key
        hashed the lists as typed. Configs whose lists were already in canonical order (all
        shipped specs, all defaults) keep their keys; a run stored under a list in another order
        or with a repeated name is run once more by the next sweep (stored under the new key),
        and reports count the two records as one run (:func:`config_key` of the stored config).
        """
        return config_key(self.model_dump(mode="json"))


def canonical_measures(names) -> tuple[str, ...]:
    """Measure names de-duplicated and sorted in the order of :data:`MEASURES` (flatness
    measures first, then the prior ones), the order every spec and default already uses; unknown
    names sort last, alphabetically."""
    rank = {m: i for i, m in enumerate(MEASURES)}
    return tuple(sorted(set(names), key=lambda m: (rank.get(m, len(rank)), m)))


def config_key(config: dict[str, Any], *, canonical: bool = True) -> str:
    """:meth:`RunConfig.key` of a config dict (``model_dump(mode="json")`` of a RunConfig, e.g. a
    stored record's ``config``): sha256 of its sorted JSON without :data:`NON_KEY_FIELDS`, measure
    lists in canonical form; the first 16 hex digits. ``canonical=False``: the lists as they
    are (the key recipe of stores written before issue #17)."""
    d = {k: v for k, v in config.items() if k not in NON_KEY_FIELDS}
    for name in ("measures", "epoch_measures"):
        if canonical and isinstance(d.get(name), (list, tuple)):
            d[name] = list(canonical_measures(d[name]))
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_config(**fields: Any) -> RunConfig:
    """Build a :class:`RunConfig`, turning pydantic's report into one FlatpriorError line."""
    try:
        return RunConfig(**fields)
    except ValidationError as exc:
        raise FlatpriorError(validation_message(exc)) from None


def validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field (valid: {', '.join(RunConfig.model_fields)})"
        parts.append(f"{loc}: {msg}")
    return "invalid run config: " + "; ".join(parts)


def versions() -> dict[str, str]:
    import scipy

    from flatprior import __version__

    return {
        "flatprior": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def build_task(cfg: RunConfig):
    from flatprior.data import make_task

    return make_task(
        cfg.dataset,
        cfg.n_train,
        cfg.n_attack,
        cfg.n_test,
        cfg.seed if cfg.data_seed is None else cfg.data_seed,
        cfg.data_root,
        target=cfg.boolean_target,
    )


def build_model(cfg: RunConfig, input_shape, seed: int | None = None):
    from flatprior.models import make_model

    return make_model(
        cfg.model,
        input_shape,
        hidden=cfg.hidden,
        width=cfg.width,
        sigma_w2=cfg.sigma_w2,
        sigma_b=cfg.sigma_b,
        seed=cfg.seed if seed is None else seed,
    )


def compute_measures(model, task, cfg: RunConfig, which) -> dict[str, Any]:
    """Flatness and prior measures of ``model`` on ``task`` (eval mode, un-augmented data).

    Flatness is measured on the clean training set S with the mean BCE loss. log P(f) is taken on
    X = S ∪ E (attack set excluded) with the network's own predictions as labels; the PAC-Bayes
    bound uses the log marginal likelihood of S's true labels.
    """
    out: dict[str, Any] = {}
    flat = [m for m in which if m in FLATNESS_MEASURES]
    if flat:
        from flatprior.flatness import flatness_measures

        out.update(
            flatness_measures(
                model,
                task.x_train,
                task.y_train,
                which=tuple(flat),
                eps=cfg.sharpness_eps,
                sharpness_method=cfg.sharpness_method,
                sharpness_epochs=cfg.sharpness_epochs,
                topk=cfg.topk,
                seed=cfg.seed,
            )
        )
    if "log_prior" in which or "pac_bayes" in which:
        out.update(
            prior_measures(
                model, task, cfg, pac_bayes="pac_bayes" in which, log_prior="log_prior" in which
            )
        )
    return out


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
            sigma_b2=cfg.sigma_b**2,
        )
    return empirical_kernel(
        lambda s: build_model(cfg, tuple(x.shape[1:]), seed=10_000 + s),
        x,
        cfg.kernel_draws,
        sigma_w2=cfg.sigma_w2,
        sigma_b2=cfg.sigma_b**2,
    )


def prior_measures(model, task, cfg: RunConfig, *, log_prior=True, pac_bayes=True):
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
        res = log_prior_fn(K, labels, method=cfg.prior_method)
        out["log_prior"] = float(res.log_prob)
        out["log_prior_converged"] = bool(getattr(res, "converged", True))
        for name in ("std_err", "ci_low", "ci_high"):
            if getattr(res, name, None) is not None:
                out[f"log_prior_{name}"] = float(getattr(res, name))
        out["log_prior_time_s"] = time.perf_counter() - t0
    if pac_bayes:
        t0 = time.perf_counter()
        m = len(task.y_train)
        res = log_prior_fn(K[:m, :m], task.y_train, method=cfg.prior_method)
        out["log_p_train"] = float(res.log_prob)
        out["pac_bayes_bound"] = float(pac_bayes_bound(res.log_prob, m, cfg.pac_bayes_delta))
        out["pac_bayes_time_s"] = time.perf_counter() - t0
    return out


def _alpha_callback(cfg: RunConfig) -> Callable:
    from flatprior.models import alpha_scale

    state = {"zero": None, "done": False}

    def cb(model, m):
        if state["zero"] is None and m["phase"] == "overtrain":
            state["zero"] = m["epoch"] - 1
        if state["done"] or cfg.alpha_epoch is None:
            return None
        base = state["zero"] if cfg.alpha_after_zero_error else 0
        if base is None or m["epoch"] != base + cfg.alpha_epoch:
            return None
        scaled = alpha_scale(model, cfg.alpha_layer, cfg.alpha)
        with torch.no_grad():
            for p, q in zip(model.parameters(), scaled.parameters(), strict=True):
                p.copy_(q)
        m["alpha_scaled"] = True
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
    from flatprior.train import TrainConfig, train

    if isinstance(cfg, dict):
        cfg = make_config(**cfg)
    t_start = time.perf_counter()
    task = build_task(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task.input_shape)
    tcfg = TrainConfig(
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        max_epochs=cfg.max_epochs,
        overtrain_epochs=cfg.overtrain_epochs,
        zero_error_on=cfg.zero_error_on,
        loss_reduction=cfg.loss_reduction,
        augment=cfg.augment,
        fam_strength=cfg.fam_strength,
        seed=cfg.seed,
    )
    callbacks: list[Callable] = []
    if cfg.alpha_epoch is not None:
        callbacks.append(_alpha_callback(cfg))
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
    }
    record.pop("wall_time_s")
    if cfg.dataset == "boolean":
        from flatprior.data.boolean import boolean_inputs
        from flatprior.train import predict

        bits = predict(model, torch.as_tensor(boolean_inputs())).int().tolist()
        record["function"] = "".join(map(str, bits))  # f on all 128 inputs, input order of
        # flatprior.data.boolean.boolean_inputs
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
