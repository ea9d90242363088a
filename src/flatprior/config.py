"""The run configuration: every choice of one run, validated by pydantic, without torch.

:class:`RunConfig` is the one declaration of a run's settings: the pipeline executes it, the
experiment specs sweep its fields, and the CLI's ``train`` options are checked against it
(``tests/test_config.py``). Names of datasets, models and optimizers come from
:mod:`flatprior.names` and measure names from :mod:`flatprior.measures`, so validating a config
(e.g. ``flatprior list`` / ``run --dry-run``) never imports PyTorch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flatprior import names
from flatprior.errors import RENAMED_PARAMETERS, FlatpriorError, renamed_message
from flatprior.measures import FLATNESS_MEASURES, MEASURES, PRIOR_MEASURES, REGISTRY

if TYPE_CHECKING:
    from flatprior.train import TrainConfig

__all__ = ["LATER_FIELDS", "NON_KEY_FIELDS", "TRAIN_FIELDS", "RunConfig", "canonical_measures",
           "config_key", "make_config", "migrate_config", "validation_message"]

#: fields that say where things are, not what is computed: left out of the run key
NON_KEY_FIELDS = ("data_root",)
#: fields added after runs were first stored: in the key only when set away from their default,
#: so the keys (and resumability) of existing result databases do not change
LATER_FIELDS = ("data_path", "label_column", "sam_rho", "adaptive_norm", "adaptive_rho",
                "adaptive_avg_rho", "adaptive_iters", "adaptive_m", "adaptive_samples",
                "pac_bayes_target", "pac_bayes_metric", "pac_bayes_samples")
#: fields copied one to one into :class:`flatprior.train.TrainConfig`
TRAIN_FIELDS = ("optimizer", "lr", "batch_size", "max_epochs", "overtrain_epochs",
                "zero_error_on", "loss_reduction", "augment", "fam_strength", "seed")


class RunConfig(BaseModel):
    """Every choice of one run. Unknown fields and wrong types are errors."""

    # allow_inf_nan=False: an inf/NaN number in a config is always a mistake
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # data
    dataset: str = "digits"
    data_root: str | None = None
    data_path: str | None = None  # dataset "file": your .npz / .csv (flatprior.data.files)
    label_column: str = "label"  # dataset "file", .csv: the label column
    n_train: int = Field(500, ge=1)
    n_attack: int = Field(0, ge=0)
    n_test: int | None = Field(1000, ge=0)
    boolean_target: str | None = None
    # seeds up to 2^32 - 1: what every RNG used here accepts (torch fails above 2^64 - 1,
    # numpy's legacy RandomState and scikit-learn above 2^32 - 1)
    data_seed: int | None = Field(None, ge=0, le=2**32 - 1)  # None: use ``seed``
    # model
    model: str = "fcn"
    hidden: tuple[Annotated[int, Field(ge=1)], ...] = names.DEFAULT_HIDDEN
    width: int | None = Field(None, ge=1)
    # variances, spelled the same everywhere (models, kernels, Boolean sampler): weights
    # N(0, sigma_w2 / fan_in), biases N(0, sigma_b2)
    sigma_w2: float = Field(2.0, gt=0)
    sigma_b2: float = Field(1.0, ge=0)
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
    sam_rho: float | None = Field(None, ge=0)  # rho of sam/asam; None: the optimizer's default
    # measures at the end of training (names: flatprior.measures.REGISTRY)
    measures: tuple[str, ...] = ("sharpness", "log_prior")
    sharpness_eps: float = Field(1e-4, gt=0)
    sharpness_method: Literal["sgd", "lbfgsb"] = "sgd"
    sharpness_epochs: int = Field(100, ge=1)
    topk: int = Field(50, ge=1)
    prior_method: Literal["ep", "tilting", "mc"] = "ep"
    kernel: Literal["arccos", "empirical"] = "arccos"
    kernel_draws: int = Field(200, ge=1)
    pac_bayes_delta: float = Field(0.05, gt=0, lt=1)
    # adaptive sharpness (worst: APGD in the |w|-scaled ball; average: Gaussian, l2) and
    # PAC-Bayes flatness (see flatprior.flatness.flatness_measures)
    adaptive_norm: Literal["linf", "l2"] = "linf"
    adaptive_rho: float = Field(0.01, gt=0)
    adaptive_avg_rho: float = Field(0.1, gt=0)
    adaptive_iters: int = Field(20, ge=1)
    adaptive_m: int | None = Field(None, ge=1)
    adaptive_samples: int = Field(100, ge=2)
    pac_bayes_target: float = Field(0.1, gt=0)
    pac_bayes_metric: Literal["loss", "error"] = "loss"
    pac_bayes_samples: int = Field(10, ge=2)
    # per-epoch measures (Fig 5): every ``measure_every`` epochs, 0 = never
    measure_every: int = Field(0, ge=0)
    epoch_measures: tuple[str, ...] = ("sharpness", "log_prior")
    # Dinh alpha-scaling applied in place at the end of epoch ``alpha_epoch`` (after zero error
    # if ``alpha_after_zero_error``)
    alpha_epoch: int | None = Field(None, ge=0)
    alpha_after_zero_error: bool = True
    alpha_layer: int = Field(0, ge=0)
    alpha: float = Field(5.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data):
        # an old spelling (sigma_b = a standard deviation) would otherwise be "extra field"
        if isinstance(data, dict):
            for old in sorted(RENAMED_PARAMETERS.keys() & data.keys()):
                raise ValueError(renamed_message(old, data[old]))
        return data

    @field_validator("measures", "epoch_measures")
    @classmethod
    def _known_measures(cls, v):
        bad = [m for m in v if m not in MEASURES]
        if bad:
            raise ValueError(f"unknown measure(s) {bad}; choose from {list(MEASURES)}")
        return canonical_measures(v)

    @model_validator(mode="after")
    def _epoch_measures_taken_per_epoch(self):
        # epoch_measures count only when they are measured (measure_every > 0)
        final_only = [m for m in self.epoch_measures if not REGISTRY[m].per_epoch]
        if self.measure_every and final_only:
            raise ValueError(f"measure(s) {final_only} are taken only at the end of training; "
                             "remove them from epoch_measures")
        return self

    @field_validator("dataset", "model", "optimizer")
    @classmethod
    def _known_name(cls, v, info):
        choices = {"dataset": names.DATASETS, "model": names.MODELS,
                   "optimizer": names.OPTIMIZERS}[info.field_name]
        if v not in choices:
            raise ValueError(f"unknown {info.field_name} {v!r}; choose one of {list(choices)}")
        return v

    @model_validator(mode="after")
    def _size_fields_fit_the_model(self):
        why = names.architecture_mismatch(self.model, self.hidden, self.width)
        if why is not None:
            raise ValueError(why)
        return self

    @model_validator(mode="after")
    def _file_needs_path(self):
        if self.dataset == "file" and not self.data_path:
            raise ValueError("dataset 'file' needs data_path (a .npz with arrays x, y or a .csv)")
        if self.dataset != "file" and self.data_path:
            raise ValueError(f"data_path is only read with dataset='file' (got {self.dataset!r})")
        return self

    def key(self) -> str:
        """16-hex-digit hash of the config (without paths): the run's identity in a store.

        Measure lists enter in canonical form (:func:`canonical_measures`), so
        ``measures=log_prior,sharpness``, ``sharpness,log_prior`` and ``sharpness,sharpness,
        log_prior`` are one run with one key. Fields in :data:`LATER_FIELDS` enter only when set
        away from their default.

        Migration: before the canonical rule (stores written before issue #17) the key hashed
        the lists as typed. Configs whose lists were already in canonical order (all shipped
        specs, all defaults) keep their keys; a run stored under a list in another order or with
        a repeated name is run once more by the next sweep (stored under the new key), and
        reports count the two records as one run (:func:`config_key` of the stored config).

        Migration of the variance rename (``sigma_b`` -> ``sigma_b2 = sigma_b**2``): the key
        hashes the bias under its old name and value, ``sigma_b = sqrt(sigma_b2)``, so every
        stored run keeps its key (``sqrt(x * x) == x`` for every float
        ``1e-150 <= x <= 1e150``; tested).
        """
        return config_key(self.model_dump(mode="json"))

    def train_config(self) -> TrainConfig:
        """The :class:`flatprior.train.TrainConfig` of this run (the fields in TRAIN_FIELDS)."""
        from flatprior.train import TrainConfig

        return TrainConfig(**{f: getattr(self, f) for f in TRAIN_FIELDS},
                           optimizer_kwargs={} if self.sam_rho is None else {"rho": self.sam_rho})


def canonical_measures(names) -> tuple[str, ...]:
    """Measure names de-duplicated and sorted: flatness measures first, then the prior ones.

    The order within each kind is the registry's; it is the order every spec and default
    already uses, so their keys did not change. Unknown names sort last, alphabetically.
    """
    order = (*FLATNESS_MEASURES, *PRIOR_MEASURES)
    rank = {m: i for i, m in enumerate(order)}
    return tuple(sorted(set(names), key=lambda m: (rank.get(m, len(rank)), m)))


@functools.cache
def _later_defaults() -> dict[str, Any]:
    """Defaults of :data:`LATER_FIELDS`, looked up once.

    pydantic's ``model_fields`` access is slow, and a report keys every stored record.
    """
    return {f: RunConfig.model_fields[f].default for f in LATER_FIELDS}


def config_key(config: dict[str, Any], *, canonical: bool = True) -> str:
    """:meth:`RunConfig.key` of a config dict (e.g. a stored record's ``config``).

    sha256 of its sorted JSON without :data:`NON_KEY_FIELDS` (and without the
    :data:`LATER_FIELDS` at their default), measure lists in canonical form; the first 16 hex
    digits. ``canonical=False``: the lists as they are (the recipe of stores written before
    issue #17).
    """
    d = {k: v for k, v in config.items() if k not in NON_KEY_FIELDS}
    if isinstance(d.get("sigma_b2"), (int, float)):  # keyed as before the rename (see key())
        d["sigma_b"] = math.sqrt(d.pop("sigma_b2"))
    for f, default in _later_defaults().items():
        if f in d and d[f] == default:
            del d[f]
    for name in ("measures", "epoch_measures"):
        if canonical and isinstance(d.get(name), (list, tuple)):
            d[name] = list(canonical_measures(d[name]))
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def migrate_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config dict in today's field names (records written before a rename).

    ``sigma_b`` (bias standard deviation, before issue #14) becomes ``sigma_b2 = sigma_b**2``;
    everything else is copied. :func:`config_key` gives the migrated dict the stored key.

    >>> migrate_config({"sigma_w2": 2.0, "sigma_b": 0.5})
    {'sigma_w2': 2.0, 'sigma_b2': 0.25}
    """
    out = dict(config)
    if "sigma_b" in out and "sigma_b2" not in out:
        v = out.pop("sigma_b")
        out["sigma_b2"] = v * v if isinstance(v, (int, float)) else v
    return out


def make_config(**fields: Any) -> RunConfig:
    """Build a :class:`RunConfig`, turning pydantic's report into one FlatpriorError line.

    Raises:
        FlatpriorError: unknown field, wrong type or out-of-range value (one line per config).

    >>> make_config(n_train=100).n_train
    100
    >>> make_config(optimizer="lion")
    Traceback (most recent call last):
    ...
    flatprior.errors.FlatpriorError: invalid run config: optimizer: unknown optimizer 'lion'; ...
    """
    try:
        return RunConfig(**fields)
    except ValidationError as exc:
        raise FlatpriorError(validation_message(exc)) from None


def validation_message(exc: ValidationError) -> str:
    """One line naming each invalid field of a :class:`RunConfig` and what is wrong with it."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field (valid: {', '.join(RunConfig.model_fields)})"
        parts.append(f"{loc}: {msg}")
    return "invalid run config: " + "; ".join(parts)
