"""Correlation of each measure with the generalization error, with bootstrap confidence intervals.

For every group of runs (by default per optimizer, and per any other run field that varies, such
as the overtraining length in Figs S11-S16) and every measure column present (log P(f),
sharpness, spectral norm, log-product of the top-k Hessian eigenvalues, trace, relative
flatness, PAC-Bayes bound), :func:`correlation_table` gives Kendall's τ, Spearman's ρ and
Pearson's r with the test error, each with a seeded percentile-bootstrap 95 % interval
(``scipy.stats.bootstrap``, runs resampled in pairs).

Only runs that reached zero training error enter (the measures are defined at that point).
Pearson's r is computed on ``log10`` of the strictly positive flatness measures (sharpness,
spectral norm, trace, relative flatness), the scale on which the study plots them; rank
correlations do not depend on that choice.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from flatprior.errors import FlatpriorError

#: measure columns, in display order; ``logprod_top<k>`` is matched by pattern
MEASURE_COLUMNS = (
    "log_prior",
    "sharpness",
    "spectral_norm",
    "logprod_topk",
    "trace",
    "relative_flatness",
    "pac_bayes_bound",
)
LOG_SCALE = ("sharpness", "spectral_norm", "trace", "relative_flatness")
METHODS = ("kendall", "spearman", "pearson")
#: run fields that split the correlations when they take more than one value
SPLIT_FIELDS = ("dataset", "model", "optimizer", "n_train", "overtrain_epochs", "lr")
_LOGPROD = re.compile(r"^logprod_top\d+$")


def measure_columns(df: pd.DataFrame) -> list[str]:
    """The measure columns of ``df`` that hold at least one number, in display order."""
    out = []
    for m in MEASURE_COLUMNS:
        cols = [c for c in df.columns if _LOGPROD.match(c)] if m == "logprod_topk" else [m]
        for c in cols:
            if c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any():
                out.append(c)
    return out


def _stat(method: str):
    if method == "kendall":
        return lambda x, y: stats.kendalltau(x, y).statistic
    if method == "spearman":
        return lambda x, y: stats.spearmanr(x, y).statistic
    return lambda x, y: stats.pearsonr(x, y).statistic


def correlation(
    x: np.ndarray,
    y: np.ndarray,
    method: str = "kendall",
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """One correlation with its p-value and a percentile-bootstrap interval.

    Args:
        x, y: paired samples ``[n]`` (NaN pairs are dropped).
        method: ``kendall`` (τ-b), ``spearman`` (ρ) or ``pearson`` (r).
        n_boot: bootstrap resamples (0: no interval).
        confidence: interval level.
        seed: bootstrap seed (the interval is reproducible).

    Returns:
        ``{"n", "estimate", "p_value", "ci_low", "ci_high"}``; NaN where undefined (n < 3 or a
        constant sample).
    """
    if method not in METHODS:
        raise FlatpriorError(f"unknown correlation {method!r}; choose one of {', '.join(METHODS)}")
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    # pairs in a canonical order (by x, then y): the seeded bootstrap then depends only on the
    # set of runs, not on the order rows arrived in (the order workers finished)
    order = np.lexsort((y[ok], x[ok]))
    x, y = x[ok][order], y[ok][order]
    n = len(x)
    out = {"n": n, "estimate": np.nan, "p_value": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    fn = {"kendall": stats.kendalltau, "spearman": stats.spearmanr, "pearson": stats.pearsonr}
    res = fn[method](x, y)
    out["estimate"], out["p_value"] = float(res.statistic), float(res.pvalue)
    if n_boot > 0:
        with warnings.catch_warnings():
            # constant resamples give NaN statistics; they are dropped by the percentile method
            warnings.simplefilter("ignore")
            bs = stats.bootstrap(
                (x, y),
                _stat(method),
                paired=True,
                vectorized=False,
                n_resamples=n_boot,
                confidence_level=confidence,
                method="percentile",
                random_state=np.random.default_rng(seed),
            )
        out["ci_low"] = float(bs.confidence_interval.low)
        out["ci_high"] = float(bs.confidence_interval.high)
    return out


def split_fields(df: pd.DataFrame, group_by: Sequence[str] = ("optimizer",)) -> list[str]:
    """``group_by`` fields present in ``df`` plus the :data:`SPLIT_FIELDS` that vary in it."""
    out = [g for g in group_by if g in df.columns]
    for f in SPLIT_FIELDS:
        if f in df.columns and f not in out and df[f].nunique(dropna=False) > 1:
            out.append(f)
    return out


def correlation_table(
    df: pd.DataFrame,
    *,
    target: str = "test_error",
    measures: Sequence[str] | None = None,
    group_by: Sequence[str] | None = ("optimizer",),
    methods: Sequence[str] = METHODS,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    status: str | None = "zero_error",
) -> pd.DataFrame:
    """Correlations between every measure and ``target``, per group of runs.

    Args:
        df: one row per run (e.g. :meth:`flatprior.experiments.Store.to_frame`).
        target: the generalization error column.
        measures: measure columns (default: :func:`measure_columns`).
        group_by: fields to split by, extended by any :data:`SPLIT_FIELDS` that vary
            (``None``: no split at all).
        methods: any of ``kendall``, ``spearman``, ``pearson``.
        n_boot, confidence, seed: bootstrap settings (see :func:`correlation`).
        status: keep only runs with this status (``None``: all).

    Returns:
        Long table: the group fields, ``measure``, ``method``, ``n``, ``estimate``, ``p_value``,
        ``ci_low``, ``ci_high``, ``log10`` (Pearson on log10 of the measure).
    """
    if df.empty:
        return pd.DataFrame()
    if status is not None and "status" in df.columns:
        df = df[df["status"] == status]
    if "key" in df.columns:  # the same run twice (e.g. two stores concatenated) counts once
        df = df.drop_duplicates("key", keep="last")
    if target not in df.columns:
        raise FlatpriorError(f"no {target!r} column in the results; nothing to correlate with")
    measures = list(measures) if measures is not None else measure_columns(df)
    groups = [] if group_by is None else split_fields(df, group_by)
    rows = []
    parts = df.groupby(groups, dropna=False, sort=True) if groups else [((), df)]
    for gkey, part in parts:
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        y = pd.to_numeric(part[target], errors="coerce").to_numpy(float)
        for m in measures:
            if m not in part.columns:
                continue
            x = pd.to_numeric(part[m], errors="coerce").to_numpy(float)
            for method in methods:
                log10 = method == "pearson" and m in LOG_SCALE and np.nanmin(x, initial=1) > 0
                xm = np.log10(x) if log10 else x
                res = correlation(xm, y, method, n_boot=n_boot, confidence=confidence, seed=seed)
                rows.append(
                    {**dict(zip(groups, gkey, strict=True)), "measure": m, "method": method,
                     **res, "log10": bool(log10)}
                )
    return pd.DataFrame(rows)


def wide_table(table: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """``measure × method`` strings ``"τ [lo, hi]"`` (one row per group and measure)."""
    if table.empty:
        return table
    groups = [c for c in table.columns if c not in (
        "measure", "method", "n", "estimate", "p_value", "ci_low", "ci_high", "log10")]
    t = table.copy()

    def fmt(r):
        if not np.isfinite(r["estimate"]):
            return "n/a"
        if np.isfinite(r["ci_low"]):
            return f"{r['estimate']:+.{digits}f} [{r['ci_low']:+.{digits}f}, " \
                   f"{r['ci_high']:+.{digits}f}]"
        return f"{r['estimate']:+.{digits}f}"

    t["value"] = t.apply(fmt, axis=1)
    w = t.pivot_table(index=[*groups, "measure", "n"], columns="method", values="value",
                      aggfunc="first", sort=False)
    w = w[[m for m in METHODS if m in w.columns]]
    w.columns.name = None
    return w.reset_index()


def boolean_table(df: pd.DataFrame, top: int | None = 1000, prior=None) -> pd.DataFrame:
    """Per-function summary of Boolean runs (Fig 2): the ``top`` functions SGD finds most often.

    Args:
        df: runs with a ``function`` column (the 128-character 0/1 string recorded by
            :func:`flatprior.pipeline.run` on the boolean dataset).
        top: keep this many of the most frequent functions (``None``: all).
        prior: optional :class:`flatprior.prior.BooleanPrior` (direct sampling); adds
            ``log_p_sampled`` = ln(count / n_samples) (NaN if the function was never sampled)
            and ``sampled_count``.

    Returns:
        One row per function, most frequent first: ``function``, ``sgd_count``,
        ``sgd_frequency`` and the mean over its runs of ``test_error``, ``log_prior`` (EP on
        the arc-cosine kernel of the 128 inputs), ``sharpness``, ``spectral_norm`` and any
        other measure column present.
    """
    if "function" not in df.columns:
        raise FlatpriorError("no 'function' column: the boolean analysis needs boolean runs")
    d = df[df["function"].notna()]
    if "status" in d.columns:
        d = d[d["status"] == "zero_error"]
    if d.empty:
        return pd.DataFrame(columns=["function", "sgd_count", "sgd_frequency"])
    cols = [c for c in ("test_error", *measure_columns(d)) if c in d.columns]
    g = d.groupby("function", sort=False)
    out = g[cols].mean(numeric_only=False) if cols else pd.DataFrame(index=g.size().index)
    out.insert(0, "sgd_count", g.size())
    out.insert(1, "sgd_frequency", out["sgd_count"] / len(d))
    out = out.reset_index().sort_values(["sgd_count", "function"], ascending=[False, True])
    if top is not None:
        out = out.head(int(top))
    if prior is not None:
        counts = [
            prior.count_of(np.frombuffer(f.encode(), dtype=np.uint8) - ord("0"))
            for f in out["function"]
        ]
        out["sampled_count"] = counts
        with np.errstate(divide="ignore"):
            lp = np.log(np.asarray(counts, dtype=float) / prior.n_samples)
        out["log_p_sampled"] = np.where(np.asarray(counts) > 0, lp, np.nan)
    return out.reset_index(drop=True)


def epochs_summary(record: dict) -> pd.DataFrame:
    """Key moments of a per-epoch run (Figs 5, S9): the measures at the first measurement at or
    after zero training error, the last one before the alpha-scaling, at the scaling, the first
    one after it, and at the end.

    Returns one row per moment: ``moment``, ``epoch``, ``train_error``, ``train_loss`` and each
    per-epoch measure (``sharpness``, ``log_prior``, …) recorded in ``history``.
    """
    hist = pd.DataFrame(record.get("history") or [])
    if hist.empty:
        return pd.DataFrame()
    hist["train_error"] = 1.0 - hist["train_acc"]
    meas = [c for c in measure_columns(hist) if c != "pac_bayes_bound"]
    if not meas:
        return pd.DataFrame()
    measured = hist[hist[meas].notna().any(axis=1)]
    zero = record.get("epochs_to_zero_error")
    alpha = (hist.loc[hist["alpha_scaled"].fillna(False).astype(bool), "epoch"].tolist()
             if "alpha_scaled" in hist else [])
    moments: list[tuple[str, pd.DataFrame]] = []
    if zero is not None:
        moments.append(("zero error", measured[measured.epoch >= zero].head(1)))
    if alpha:
        a = alpha[0]
        moments += [("before α-scaling", measured[measured.epoch < a].tail(1)),
                    ("α-scaling", measured[measured.epoch == a]),
                    ("after α-scaling", measured[measured.epoch > a].head(1))]
    moments.append(("end", measured.tail(1)))
    rows = []
    for name, part in moments:
        if len(part):
            r = part.iloc[0]
            rows.append({"moment": name, "epoch": int(r["epoch"]),
                         "train_error": r["train_error"], "train_loss": r.get("train_loss"),
                         **{m: r[m] for m in meas}})
    return pd.DataFrame(rows)
