"""The measure registry: every measure a run can take, in one table (no torch import).

Each :class:`Measure` says how the pipeline computes it, what it writes into the record and how
the analysis shows it. The pipeline (validation of ``RunConfig.measures`` and the dispatch in
:func:`flatprior.pipeline.compute_measures`), the correlations (:data:`MEASURE_COLUMNS`,
:data:`LOG_SCALE`), the figures' axis labels and the CLI help all read :data:`REGISTRY`.

Adding a measure is one entry here plus its function. The function is named by a lazy import
path ``"module:function"`` and is called as ``fn(model, task, cfg, which) -> dict`` with the
model in eval mode, the run's :class:`flatprior.data.Task` and
:class:`flatprior.config.RunConfig`; ``which`` holds the requested measures that share this
function (measures that share one, such as the Hessian measures sharing one operator or
``log_prior`` and ``pac_bayes`` sharing one kernel, are computed by a single call). Example,
for a function ``my_norm(model, task, cfg, which)`` in ``flatprior/flatness/norms.py`` returning
``{"my_norm": value, "my_norm_time_s": seconds}``::

    Measure("my_norm", "flatness", "my norm", "1", "cheap",
            "flatprior.flatness.norms:my_norm", keys=("my_norm", "my_norm_time_s"),
            log_scale=True, doc="sum of squared weights (Neyshabur et al. 2017)")

Registry order is display order (tables, figures, ``--measures`` help).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "FLATNESS_MEASURES",
    "LOG_SCALE",
    "MEASURES",
    "MEASURE_COLUMNS",
    "PRIOR_MEASURES",
    "REGISTRY",
    "Measure",
    "column_label",
    "get",
    "measure_of_column",
]

Cost = Literal["cheap", "moderate", "expensive"]


@dataclass(frozen=True)
class Measure:
    """One measure of a trained network.

    Attributes:
        name: the name in ``RunConfig.measures`` / ``--measures``.
        kind: ``"flatness"`` (of the loss around the weights) or ``"prior"`` (of the function).
        label: axis label; ``{k}`` is replaced by the number in a patterned column.
        unit: unit of the recorded value (``"nats"``, ``"%"``, ...).
        cost: rough cost class on the quick presets' networks: ``cheap`` (< 1 s),
            ``moderate`` (seconds), ``expensive`` (many Hessian-vector products or O(n^3)).
        compute: lazy import path ``"module:function"`` of ``fn(model, task, cfg, which)``.
        keys: record keys the function may write (``{topk}`` stands for ``cfg.topk``).
        column: the record column the analysis correlates and plots (default: ``name``).
        column_pattern: regular expression for columns named after a setting
            (``logprod_top50``); ``column`` is then the placeholder used in displays.
        log_scale: strictly positive and spread over decades: Pearson's r and the figures use
            ``log10`` of it.
        needs_fcn: needs the FCN's arc-cosine NNGP kernel when ``kernel="arccos"`` (other
            architectures must use ``kernel="empirical"``).
        per_epoch: may be taken every ``measure_every`` epochs (``RunConfig.epoch_measures``).
        doc: one line for the CLI help and the reference.
    """

    name: str
    kind: Literal["flatness", "prior"]
    label: str
    unit: str
    cost: Cost
    compute: str
    keys: tuple[str, ...]
    column: str = ""
    column_pattern: str | None = None
    log_scale: bool = False
    needs_fcn: bool = False
    per_epoch: bool = True
    doc: str = ""

    def __post_init__(self) -> None:
        """Default ``column`` to ``name``."""
        if not self.column:
            object.__setattr__(self, "column", self.name)

    def function(self) -> Callable[..., dict[str, Any]]:
        """Import and return the compute function (imports torch, lazily)."""
        module, _, attr = self.compute.partition(":")
        return getattr(importlib.import_module(module), attr)

    def matches(self, column: str) -> bool:
        """Whether record column ``column`` holds this measure (or is its placeholder)."""
        if column == self.column:
            return True
        return self.column_pattern is not None and bool(re.fullmatch(self.column_pattern, column))


_FLATNESS = "flatprior.pipeline:flatness_group"
_PRIOR = "flatprior.pipeline:prior_group"

#: every measure, in display order
REGISTRY: dict[str, Measure] = {m.name: m for m in (
    Measure("log_prior", "prior", "log P(f)", "nats", "moderate", _PRIOR,
            keys=("log_prior", "log_prior_converged", "log_prior_std_err", "log_prior_ci_low",
                  "log_prior_ci_high", "log_prior_time_s", "kernel_time_s"),
            needs_fcn=True,
            doc="log prior probability of the learned function on S ∪ E (NNGP, natural log)"),
    Measure("sharpness", "flatness", "sharpness", "%", "moderate", _FLATNESS,
            keys=("sharpness", "sharpness_method", "sharpness_eps", "sharpness_steps",
                  "sharpness_time_s"),
            log_scale=True, doc="Keskar sharpness on S by the configured maximiser"),
    Measure("sharpness_lbfgsb", "flatness", "sharpness (L-BFGS-B)", "%", "moderate",
            "flatprior.pipeline:sharpness_lbfgsb",
            keys=("sharpness_lbfgsb", "sharpness_lbfgsb_time_s"),
            log_scale=True, doc="Keskar sharpness on S maximised by L-BFGS-B (maxiter 10)"),
    Measure("spectral_norm", "flatness", "Hessian spectral norm", "loss / parameter²",
            "moderate", _FLATNESS, keys=("spectral_norm", "spectral_norm_time_s"),
            log_scale=True, doc="largest Hessian eigenvalue of the loss on S"),
    Measure("logprod_topk", "flatness", "log Π top-{k} Hessian eigenvalues",
            "nats of (loss / parameter²)", "expensive", _FLATNESS,
            keys=("logprod_top{topk}", "logprod_top{topk}_npos", "logprod_top{topk}_time_s"),
            column_pattern=r"logprod_top\d+",
            doc="sum of the logs of the top-k positive Hessian eigenvalues (k = topk)"),
    Measure("trace", "flatness", "Hessian trace", "loss / parameter²", "expensive", _FLATNESS,
            keys=("trace", "trace_method", "trace_time_s"),
            log_scale=True, doc="Hessian trace of the loss on S (Hutchinson)"),
    Measure("relative_flatness", "flatness", "relative flatness", "loss", "cheap", _FLATNESS,
            keys=("relative_flatness", "relative_flatness_time_s"),
            log_scale=True, doc="Petzka et al. relative flatness of the last layer"),
    Measure("adaptive_worst", "flatness", "adaptive worst-case sharpness", "loss", "moderate",
            _FLATNESS, keys=("adaptive_worst", "adaptive_worst_norm", "adaptive_worst_rho",
                             "adaptive_worst_time_s"),
            log_scale=True, doc="worst-case loss rise in the |w|-scaled ball (Kwon et al. 2021)"),
    Measure("adaptive_average", "flatness", "adaptive average sharpness", "loss", "moderate",
            _FLATNESS, keys=("adaptive_average", "adaptive_average_ci_low",
                             "adaptive_average_ci_high", "adaptive_average_rho",
                             "adaptive_average_time_s"),
            log_scale=True, doc="mean loss rise under |w|-scaled Gaussian noise, with CI"),
    Measure("pac_bayes_flatness", "flatness", "PAC-Bayes flatness 1/σ'²", "1 / parameter²",
            "moderate", _FLATNESS, keys=("pac_bayes_flatness", "pac_bayes_flatness_ci_low",
                                         "pac_bayes_flatness_ci_high", "pac_bayes_flatness_sigma",
                                         "pac_bayes_flatness_time_s"),
            log_scale=True, doc="1/σ'² of the largest noise keeping the loss rise <= target "
            "(Jiang et al. 2020)"),
    Measure("pac_bayes_mag_flatness", "flatness", "magnitude-aware PAC-Bayes flatness", "1",
            "moderate", _FLATNESS,
            keys=("pac_bayes_mag_flatness", "pac_bayes_mag_flatness_ci_low",
                  "pac_bayes_mag_flatness_ci_high", "pac_bayes_mag_flatness_sigma",
                  "pac_bayes_mag_flatness_time_s"),
            log_scale=True, doc="the same with noise scaled by |w| (Jiang et al. 2020)"),
    Measure("path_norm", "flatness", "path norm", "1", "cheap", _FLATNESS,
            keys=("path_norm", "path_norm_time_s"), log_scale=True,
            doc="squared l2 path norm (Neyshabur et al. 2015)"),
    Measure("log_prod_spectral", "flatness", "log Π spectral norms²", "nats", "cheap",
            _FLATNESS, keys=("log_prod_spectral", "log_prod_spectral_time_s"),
            doc="sum of log squared layer spectral norms (Jiang et al. 2020)"),
    Measure("log_prod_frobenius", "flatness", "log Π Frobenius norms²", "nats", "cheap",
            _FLATNESS, keys=("log_prod_frobenius", "log_prod_frobenius_time_s"),
            doc="sum of log squared layer Frobenius norms (Jiang et al. 2020)"),
    Measure("pac_bayes", "prior", "PAC-Bayes bound", "error rate", "moderate", _PRIOR,
            keys=("log_p_train", "pac_bayes_bound", "pac_bayes_time_s", "kernel_time_s"),
            column="pac_bayes_bound", needs_fcn=True,
            doc="PAC-Bayes bound on the test error from log P of S's true labels"),
)}

MEASURES: tuple[str, ...] = tuple(REGISTRY)
FLATNESS_MEASURES = tuple(n for n, m in REGISTRY.items() if m.kind == "flatness")
PRIOR_MEASURES = tuple(n for n, m in REGISTRY.items() if m.kind == "prior")
#: record columns the analysis correlates, in display order (patterned ones by placeholder)
MEASURE_COLUMNS = tuple(m.column for m in REGISTRY.values())
#: columns whose Pearson correlation and plots use log10
LOG_SCALE = tuple(m.column for m in REGISTRY.values() if m.log_scale)


def get(name: str) -> Measure:
    """The registry entry of measure ``name``.

    Raises:
        FlatpriorError: unknown name (the message lists the known ones).
    """
    from flatprior.errors import FlatpriorError

    if name not in REGISTRY:
        raise FlatpriorError(f"unknown measure {name!r}; choose from {list(MEASURES)}")
    return REGISTRY[name]


def measure_of_column(column: str) -> Measure | None:
    """The measure whose record column is ``column`` (``logprod_top50`` -> ``logprod_topk``)."""
    for m in REGISTRY.values():
        if m.matches(column):
            return m
    return None


def column_label(column: str) -> str | None:
    """Axis label of a measure column, or ``None`` if ``column`` is not a measure's.

    >>> column_label("logprod_top20")
    'log Π top-20 Hessian eigenvalues'
    >>> column_label("pac_bayes_bound")
    'PAC-Bayes bound'
    """
    m = measure_of_column(column)
    if m is None:
        return None
    digits = re.search(r"\d+$", column) if m.column_pattern else None
    return m.label.format(k=digits.group() if digits else "k")
