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
from flatprior.measures import LOG_SCALE, MEASURE_COLUMNS, REGISTRY

# MEASURE_COLUMNS (display order; ``logprod_top<k>`` matched by pattern) and LOG_SCALE (Pearson r
# on log10) come from the measure registry and are re-exported here
__all__ = [
    "LOG_P_ESTIMATORS", "LOG_SCALE", "MEASURE_COLUMNS", "METHODS", "SPLIT_FIELDS",
    "boolean_table", "boolean_training_set", "correlation", "prior_agreement", "psgd_summary",
    "psgd_table",
    "correlation_table", "epochs_summary", "granulated_kendall", "granulated_table",
    "measure_columns", "split_fields", "swept_axes", "wide_granulated", "wide_table",
]
#: the sign of tau with the test error a measure should have if it predicts generalization:
#: a higher prior probability means a simpler function (Zhang et al.); every other measure is a
#: complexity measure (Jiang et al. 2020), larger = worse generalization.
EXPECTED_SIGN = {"log_prior": -1.0}
#: run fields that are not hyper-parameter axes of a sweep (replicates and locations)
NON_AXES = ("seed", "data_seed", "data_root")
METHODS = ("kendall", "spearman", "pearson")
#: run fields that split the correlations when they take more than one value
SPLIT_FIELDS = ("dataset", "model", "optimizer", "n_train", "overtrain_epochs", "lr")


def measure_columns(df: pd.DataFrame) -> list[str]:
    """The measure columns of ``df`` that hold at least one number, in display order."""
    out = []
    for m in REGISTRY.values():
        cols = ([c for c in df.columns if re.fullmatch(m.column_pattern, c)] if m.column_pattern
                else [m.column])
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
        x: first sample ``[n]`` (pairs with a NaN are dropped).
        y: second sample ``[n]``, paired with ``x``.
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
        n_boot: bootstrap resamples (see :func:`correlation`).
        confidence: interval level.
        seed: bootstrap seed.
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


def wide_table(table: pd.DataFrame, digits: int = 2,
               granulated: pd.DataFrame | None = None) -> pd.DataFrame:
    """``measure × method`` strings ``"τ [lo, hi]"`` (one row per group and measure).

    With ``granulated`` (a :func:`granulated_table`), its Ψ and per-axis τ's are added beside
    the (pooled) Kendall τ, matched by measure, and the rows follow its rank order.
    """
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
    w = w.reset_index()
    if granulated is not None and not granulated.empty:
        g = wide_granulated(granulated, digits).drop(columns=["n", "pooled τ"], errors="ignore")
        at = list(w.columns).index("kendall") + 1 if "kendall" in w.columns else len(w.columns)
        w = w.merge(g, on="measure", how="left")
        cols = [c for c in w.columns if c not in g.columns or c == "measure"]
        extra = [c for c in g.columns if c != "measure"]
        w = w[cols[:at] + extra + cols[at:]]
        rank = {m: i for i, m in enumerate(granulated["measure"])}  # granulated's rank order
        w = w.sort_values("measure", key=lambda c: c.map(rank), kind="stable",
                          ignore_index=True)
    return w


# -- granulated Kendall coefficient (Jiang et al. 2020) --------------------------------------------
def swept_axes(df: pd.DataFrame, status: str | None = "zero_error") -> list[str]:
    """Run-config fields that take more than one value in ``df`` (seeds excluded: replicates)."""
    from flatprior.pipeline import RunConfig

    if status is not None and "status" in df.columns:
        df = df[df["status"] == status]
    return [f for f in RunConfig.model_fields if f in df.columns and f not in NON_AXES
            and df[f].astype(str).nunique() > 1]


def _sign_matrix(v: np.ndarray) -> np.ndarray:
    return np.sign(v[:, None] - v[None, :])


def _group_taus(x: np.ndarray, y: np.ndarray, groups: list[np.ndarray],
                weights: np.ndarray) -> np.ndarray:
    """Kendall τ-b of every group for every row of ``weights [B, n]`` (run multiplicities).

    τ-b = Σ_{i<j} s^x_ij s^y_ij / sqrt(Σ_{i<j} |s^x_ij| · Σ_{i<j} |s^y_ij|) with s_ij =
    sign(v_i - v_j); a run drawn c times contributes c_i c_j to each pair (its copies tie in both
    x and y: zero everywhere, as τ-b counts them). Hand-rolled because it vectorises over the
    bootstrap (scipy's kendalltau is one sample at a time). Returns ``[B, n_groups]``, NaN where
    a group has no untied pair.
    """
    out = np.full((weights.shape[0], len(groups)), np.nan)
    for k, g in enumerate(groups):
        sx, sy = _sign_matrix(x[g]), _sign_matrix(y[g])
        c = weights[:, g]
        num = np.einsum("bi,ij,bj->b", c, sx * sy, c)
        den = np.einsum("bi,ij,bj->b", c, np.abs(sx), c) * np.einsum("bi,ij,bj->b", c,
                                                                       np.abs(sy), c)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, k] = np.where(den > 0, num / np.sqrt(den), np.nan)
    return out


def granulated_kendall(
    df: pd.DataFrame,
    measure: str,
    axes: Sequence[str],
    target: str = "test_error",
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    status: str | None = "zero_error",
) -> dict[str, float]:
    """Granulated Kendall coefficient Ψ of ``measure`` with ``target`` over the sweep ``axes``.

    Jiang et al., "Fantastic generalization measures and where to find them", ICLR 2020, eq. (4):
    for axis ``i``, the runs are grouped by the values of all OTHER axes; ``ψ_i`` is the mean over
    the groups of Kendall's τ between measure and target within the group (runs that differ only
    in axis ``i``; replicates such as seeds stay in their group); ``Ψ = mean_i ψ_i``. Groups
    without an untied pair are left out of the mean. Intervals: percentile bootstrap over runs
    (resampled with replacement, all ψ_i and Ψ recomputed on each resample, seeded).

    Args:
        df: one row per run.
        measure: the measure column.
        axes: the swept hyper-parameter columns (at least one).
        target: the column it should predict.
        n_boot: bootstrap resamples (0: no intervals).
        confidence: interval level.
        seed: bootstrap seed.
        status: keep only runs with this status (``None``: all).

    Returns:
        ``{"measure", "n", "psi", "psi_ci_low", "psi_ci_high", "pooled_tau", "pooled_ci_low",
        "pooled_ci_high"}`` plus, per axis ``a``, ``tau_<a>``, ``tau_<a>_ci_low``,
        ``tau_<a>_ci_high`` and ``groups_<a>`` (groups with a defined τ). NaN where undefined.
    """
    axes = list(axes)
    if not axes:
        raise FlatpriorError("granulated_kendall needs at least one swept axis")
    for col in (measure, target, *axes):
        if col not in df.columns:
            raise FlatpriorError(f"no {col!r} column in the results; choose from "
                                 f"{', '.join(map(str, df.columns))}")
    if status is not None and "status" in df.columns:
        df = df[df["status"] == status]
    x = pd.to_numeric(df[measure], errors="coerce").to_numpy(float)
    y = pd.to_numeric(df[target], errors="coerce").to_numpy(float)
    ok = np.isfinite(x) & np.isfinite(y)
    df, x, y = df[ok], x[ok], y[ok]
    n = len(x)
    keys = df[axes].astype(str).reset_index(drop=True)  # lists/None as comparable strings
    pooled = correlation(x, y, "kendall", n_boot=n_boot, confidence=confidence, seed=seed)
    out: dict[str, float] = {"measure": measure, "n": n, "pooled_tau": pooled["estimate"],
                             "pooled_ci_low": pooled["ci_low"],
                             "pooled_ci_high": pooled["ci_high"]}
    rng = np.random.default_rng(seed)
    weights = np.ones((1, n))
    if n_boot > 0 and n > 0:
        weights = np.vstack([weights, rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)])
    psis = []
    lo_q, hi_q = 50 * (1 - confidence), 50 * (1 + confidence)
    for a in axes:
        others = [b for b in axes if b != a]
        if others:
            groups = [np.asarray(ix) for ix in keys.groupby(others, sort=True).indices.values()]
        else:
            groups = [np.arange(n)]
        groups = [g for g in groups if len(g) >= 2]
        taus = _group_taus(x, y, groups, weights) if groups else np.full((len(weights), 1),
                                                                           np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: undefined psi
            psi = np.nanmean(taus, axis=1)
        psis.append(psi)
        out[f"tau_{a}"] = float(psi[0])
        out[f"groups_{a}"] = int(np.isfinite(taus[0]).sum())
        out[f"tau_{a}_ci_low"], out[f"tau_{a}_ci_high"] = _percentiles(psi[1:], lo_q, hi_q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        total = np.nanmean(np.vstack(psis), axis=0)
    out["psi"] = float(total[0])
    out["psi_ci_low"], out["psi_ci_high"] = _percentiles(total[1:], lo_q, hi_q)
    return out


def _percentiles(v: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return np.nan, np.nan
    a, b = np.percentile(v, [lo, hi])
    return float(a), float(b)


def granulated_table(
    df: pd.DataFrame,
    axes: Sequence[str] | None = None,
    *,
    target: str = "test_error",
    measures: Sequence[str] | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    status: str | None = "zero_error",
) -> pd.DataFrame:
    """:func:`granulated_kendall` of every measure (one row each), ranked.

    Ranked by ``Ψ`` times the measure's :data:`EXPECTED_SIGN` (the predictors that work best
    in the direction their theory says come first; column ``rank_score``). ``axes`` default:
    :func:`swept_axes`.
    """
    if df.empty:
        return pd.DataFrame()
    axes = swept_axes(df, status) if axes is None else list(axes)
    if not axes:
        return pd.DataFrame()
    measures = list(measures) if measures is not None else measure_columns(df)
    rows = [granulated_kendall(df, m, axes, target, n_boot=n_boot, confidence=confidence,
                               seed=seed, status=status) for m in measures if m in df.columns]
    t = pd.DataFrame(rows)
    if t.empty:
        return t
    t["rank_score"] = [r * EXPECTED_SIGN.get(m, 1.0) for m, r in zip(t["measure"], t["psi"],
                                                                     strict=True)]
    t = t.sort_values("rank_score", ascending=False, na_position="last")
    return t.reset_index(drop=True)


def wide_granulated(gt: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """Strings ``"value [lo, hi]"``: ``measure``, ``n``, ``pooled τ``, ``Ψ``, ``τ|<axis>``."""
    if gt.empty:
        return gt

    def fmt(v, lo, hi):
        if not np.isfinite(v):
            return "n/a"
        if np.isfinite(lo):
            return f"{v:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
        return f"{v:+.{digits}f}"

    axes = [c[4:] for c in gt.columns if c.startswith("tau_") and not c.endswith(
        ("_ci_low", "_ci_high"))]
    out = pd.DataFrame({"measure": gt["measure"], "n": gt["n"]})
    out["pooled τ"] = [fmt(*r) for r in gt[["pooled_tau", "pooled_ci_low",
                                            "pooled_ci_high"]].to_numpy()]
    out["Ψ"] = [fmt(*r) for r in gt[["psi", "psi_ci_low", "psi_ci_high"]].to_numpy()]
    for a in axes:
        out[f"τ|{a}"] = [fmt(*r) for r in gt[[f"tau_{a}", f"tau_{a}_ci_low",
                                              f"tau_{a}_ci_high"]].to_numpy()]
    return out


def boolean_table(df: pd.DataFrame, top: int | None = 1000, prior=None) -> pd.DataFrame:
    """Per-function summary of Boolean runs (Fig 2): the ``top`` functions SGD finds most often.

    Args:
        df: runs with a ``function`` column (the 128-character 0/1 string recorded by
            :func:`flatprior.pipeline.run` on the boolean dataset).
        top: keep this many of the most frequent functions (``None``: all).
        prior: optional :class:`flatprior.prior.BooleanPrior` (direct sampling); adds
            ``log_p_sampled`` = ln(count / n_samples) (NaN if the function was never sampled),
            its 95 % Wilson interval ``log_p_sampled_ci_low`` / ``_ci_high``
            (:meth:`flatprior.prior.BooleanPrior.probability_interval`: for antithetic pairs
            that of ``2P`` on ``n / 2`` pairs, halved; low end -inf when never sampled) and
            ``sampled_count``.

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
        counts = prior.counts_of(np.array(
            [np.frombuffer(f.encode(), dtype=np.uint8) - ord("0") for f in out["function"]],
            dtype=np.uint8).reshape(len(out), 2**prior.n_inputs))
        c = np.asarray(counts, dtype=float)
        lo, hi = prior.probability_interval(c)
        out["sampled_count"] = counts
        with np.errstate(divide="ignore"):
            out["log_p_sampled"] = np.where(c > 0, np.log(c / prior.n_samples), np.nan)
            # never sampled: the Wilson upper end still bounds P (lower end 0: -inf)
            out["log_p_sampled_ci_low"] = np.where(c > 0, np.log(lo), -np.inf)
            out["log_p_sampled_ci_high"] = np.log(hi)
    return out.reset_index(drop=True)


def _cfg_value(row, name):
    v = row.get(name) if hasattr(row, "get") else None
    if v is None or (isinstance(v, float) and v != v):
        return None
    return v.item() if hasattr(v, "item") else v


def boolean_training_set(row) -> tuple[np.ndarray, np.ndarray]:
    """The inputs a Boolean run trained on and their training labels.

    Args:
        row: a run's config fields (a DataFrame row or dict with ``n_train``, ``n_attack``,
            ``n_test``, ``data_seed``, ``seed``, ``boolean_target``).

    Returns:
        ``(indices, labels)``: input numbers (order of
        :func:`flatprior.data.boolean.boolean_inputs`) of S then A, and their labels (A's
        flipped), as :func:`flatprior.pipeline.build_task` draws them.
    """
    from flatprior.data import make_task

    data_seed = _cfg_value(row, "data_seed")
    task = make_task("boolean", int(_cfg_value(row, "n_train")),
                     int(_cfg_value(row, "n_attack") or 0),
                     None if _cfg_value(row, "n_test") is None else int(_cfg_value(row, "n_test")),
                     int(_cfg_value(row, "seed") if data_seed is None else data_seed),
                     target=_cfg_value(row, "boolean_target"))
    idx = np.concatenate([task.idx_train, task.idx_attack])
    lab = np.concatenate([task.y_train.numpy(), task.y_attack.numpy()]).astype(np.uint8)
    return idx, lab


def psgd_table(df: pd.DataFrame, prior, group_by: Sequence[str] = ("optimizer",), *,
               top_sampled: int = 1000) -> pd.DataFrame:
    r"""``P_SGD(f)`` against the Bayesian posterior ``P_B(f | S)``, per function (Boolean system).

    For each group of runs (one training set S each, e.g. per optimizer): ``P_SGD(f)`` is the
    fraction of its runs that reached zero training error with function ``f`` (on all 128
    inputs); ``P_B(f | S)`` is the fraction of the sampled random networks that fit S which
    compute ``f`` (:meth:`flatprior.prior.BooleanPrior.posterior`; Mingard et al., "Is SGD a
    Bayesian sampler? Well, almost", JMLR 22, 2021).

    Args:
        df: Boolean runs (``function``, ``status`` and the config fields of S).
        prior: :class:`flatprior.prior.BooleanPrior` sampled for the runs' network.
        group_by: run fields that split the runs (each group must share one S).
        top_sampled: also list this many of the most probable posterior functions that the
            runs did not find (a 1e8-network sample fits S with millions of functions: they
            are counted in ``functions_sampled``, not listed).

    Returns:
        One row per (group, function) found by the runs or among the ``top_sampled`` most
        probable under the sampled posterior: the group fields, ``training_set`` (``|S| = m,
        data seed d``), ``function`` (128-char 0/1 string), ``sgd_count``, ``p_sgd``,
        ``n_sgd`` (zero-error runs of the group), ``sampled_count``, ``p_b``, ``p_b_ci_low``,
        ``p_b_ci_high`` (95 % Wilson), ``n_fit`` (sampled networks that fit S),
        ``functions_sampled`` (distinct sampled functions that fit S). Sorted by group, then
        ``p_sgd`` and ``p_b`` descending.
    """
    if "function" not in df.columns:
        raise FlatpriorError("no 'function' column: P_SGD vs P_B needs Boolean runs")
    d = df[df["function"].notna()]
    if "status" in d.columns:
        d = d[d["status"] == "zero_error"]
    cols = ["training_set", "function", "sgd_count", "p_sgd", "n_sgd", "sampled_count", "p_b",
            "p_b_ci_low", "p_b_ci_high", "n_fit", "functions_sampled"]
    groups = [g for g in group_by if g in d.columns]
    if d.empty:
        return pd.DataFrame(columns=[*groups, *cols])
    set_fields = [f for f in ("n_train", "n_attack", "n_test", "data_seed", "seed",
                              "boolean_target") if f in d.columns]
    d = d.copy()
    # the fields that fix S (the data seed is `seed` when `data_seed` is unset): one task
    # draw per distinct combination, not per run
    d["_dseed"] = [_train_seed(r) for r in d[set_fields].to_dict("records")]
    fixing = [f for f in set_fields if f not in ("seed", "data_seed")] + ["_dseed"]
    d["_set"] = ["|".join(map(str, r)) for r in d[fixing].itertuples(index=False)]
    sets = {k: boolean_training_set(d.loc[d["_set"] == k, set_fields].iloc[0].to_dict())
            for k in d["_set"].unique()}
    n_points = 2**prior.n_inputs
    parts = []
    for gkey, g in d.groupby([*groups, "_set"], sort=True, dropna=False):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        idx, lab = sets[gkey[-1]]
        post = prior.posterior(idx, lab)
        n_sgd = len(g)
        sgd = g["function"].value_counts()
        found = np.frombuffer("".join(sgd.index).encode(), dtype=np.uint8).reshape(
            len(sgd), -1) - ord("0")
        top = np.argsort(-post.counts, kind="stable")[: int(top_sampled)]
        t = pd.DataFrame({"function": sgd.index, "sgd_count": sgd.to_numpy()}).merge(
            pd.DataFrame({"function": _key_strings(post.keys[top], n_points),
                          "sampled_count": post.counts[top]}), on="function", how="outer")
        t["sgd_count"] = t["sgd_count"].fillna(0).astype(np.int64)
        # every function the runs found is looked up, listed among the top or not
        lookup = dict(zip(sgd.index, post.counts_of(found), strict=True))
        t["sampled_count"] = [lookup.get(f, c) for f, c in zip(
            t["function"], t["sampled_count"].fillna(0), strict=True)]
        t["sampled_count"] = t["sampled_count"].astype(np.int64)
        t["p_sgd"] = t["sgd_count"] / n_sgd
        t["n_sgd"] = n_sgd
        t["n_fit"] = post.n_samples
        t["functions_sampled"] = post.n_functions
        if post.n_samples:
            t["p_b"] = t["sampled_count"] / post.n_samples
            t["p_b_ci_low"], t["p_b_ci_high"] = post.probability_interval(t["sampled_count"])
        else:
            t["p_b"] = t["p_b_ci_low"] = t["p_b_ci_high"] = np.nan
        t["training_set"] = f"|S| = {len(idx)}, data seed {_train_seed(g[set_fields].iloc[0])}"
        for name, v in zip(groups, gkey[: len(groups)], strict=True):
            t[name] = v
        parts.append(t.sort_values(["p_sgd", "p_b", "function"],
                                   ascending=[False, False, True])[[*groups, *cols]])
    return pd.concat(parts, ignore_index=True)


def _key_strings(keys: np.ndarray, n_points: int) -> list[str]:
    """Packed function keys ``uint64 [m, 2]`` -> 0/1 strings of their ``n_points`` bits."""
    raw = np.ascontiguousarray(keys).astype(">u8").view(np.uint8).reshape(len(keys), 16)
    bits = np.unpackbits(raw, axis=1, bitorder="big")[:, :n_points] + ord("0")
    return [row.tobytes().decode() for row in bits]


def _train_seed(row) -> int:
    ds = _cfg_value(row, "data_seed")
    return int(_cfg_value(row, "seed") if ds is None else ds)


def psgd_summary(table: pd.DataFrame, group_by: Sequence[str] = ("optimizer",), *,
                 n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Agreement of ``P_SGD`` and ``P_B(f | S)`` per group of a :func:`psgd_table`.

    Correlations over the functions both SGD and the sampled posterior found (log10 of each):
    Pearson ``r`` and Kendall ``tau`` with percentile-bootstrap 95 % intervals.

    Returns:
        One row per group: the group fields, ``training_set``, ``n_sgd`` (runs), ``n_fit``
        (sampled networks fitting S), ``functions_sgd`` / ``functions_sampled`` /
        ``functions_both``, ``sgd_mass_sampled`` (fraction of SGD runs whose function the
        posterior sample contains), ``posterior_mass_sgd`` (posterior mass of the functions SGD
        found), ``pearson_log10``, ``kendall`` and their ``_ci_low`` / ``_ci_high``.
    """
    groups = [g for g in group_by if g in table.columns]
    rows = []
    for gkey, t in table.groupby([*groups, "training_set"], sort=True, dropna=False):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        both = t[(t["sgd_count"] > 0) & (t["sampled_count"] > 0)]
        x, y = np.log10(both["p_b"].to_numpy(float)), np.log10(both["p_sgd"].to_numpy(float))
        row = dict(zip([*groups, "training_set"], gkey, strict=True))
        row.update(n_sgd=int(t["n_sgd"].iloc[0]), n_fit=int(t["n_fit"].iloc[0]),
                   functions_sgd=int((t["sgd_count"] > 0).sum()),
                   functions_sampled=int(t["functions_sampled"].iloc[0]),
                   functions_both=len(both),
                   sgd_mass_sampled=float(t.loc[t["sampled_count"] > 0, "p_sgd"].sum()),
                   posterior_mass_sgd=float(t.loc[t["sgd_count"] > 0, "p_b"].sum()))
        for name, method in (("pearson_log10", "pearson"), ("kendall", "kendall")):
            c = correlation(x, y, method, n_boot=n_boot, seed=seed)
            row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = (
                c["estimate"], c["ci_low"], c["ci_high"])
        rows.append(row)
    return pd.DataFrame(rows)


#: log P(f) estimators of a Boolean table: (name, column); a column ``<col>_ci_low`` /
#: ``<col>_ci_high`` beside it holds its 95 % interval
LOG_P_ESTIMATORS = (("sampling", "log_p_sampled"), ("tilting", "log_p_tilting"),
                    ("EP", "log_prior"))


def prior_agreement(bt: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """How well the log P(f) estimators of a :func:`boolean_table` agree, pair by pair.

    Over the functions both estimators of a pair give a finite value: the difference
    ``d = a - b`` in nats (median, median |d|, max |d|), Kendall τ between them with a
    percentile-bootstrap 95 % interval, and, when both have intervals, the fraction of
    functions whose two 95 % intervals overlap.

    Returns:
        One row per pair: ``a``, ``b``, ``n``, ``median_d``, ``median_abs_d``, ``max_abs_d``,
        ``kendall``, ``kendall_ci_low``, ``kendall_ci_high``, ``ci_overlap``.
    """
    have = [(n, c) for n, c in LOG_P_ESTIMATORS if c in bt and bt[c].notna().sum() >= 1]
    rows = []
    for i, (na, ca) in enumerate(have):
        for nb, cb in have[i + 1:]:
            a = pd.to_numeric(bt[ca], errors="coerce").to_numpy(float)
            b = pd.to_numeric(bt[cb], errors="coerce").to_numpy(float)
            ok = np.isfinite(a) & np.isfinite(b)
            d = a[ok] - b[ok]
            tau = correlation(a[ok], b[ok], "kendall", n_boot=n_boot, seed=seed)
            overlap = np.nan
            if all(f"{c}_ci_{e}" in bt for c in (ca, cb) for e in ("low", "high")) and ok.any():
                lo = np.maximum(bt[f"{ca}_ci_low"].to_numpy(float), bt[f"{cb}_ci_low"].to_numpy(
                    float))
                hi = np.minimum(bt[f"{ca}_ci_high"].to_numpy(float),
                                bt[f"{cb}_ci_high"].to_numpy(float))
                overlap = float(np.mean((lo <= hi)[ok]))
            rows.append({"a": na, "b": nb, "n": int(ok.sum()),
                         "median_d": float(np.median(d)) if d.size else np.nan,
                         "median_abs_d": float(np.median(np.abs(d))) if d.size else np.nan,
                         "max_abs_d": float(np.max(np.abs(d))) if d.size else np.nan,
                         "kendall": tau["estimate"], "kendall_ci_low": tau["ci_low"],
                         "kendall_ci_high": tau["ci_high"], "ci_overlap": overlap})
    return pd.DataFrame(rows)


def epochs_summary(record: dict) -> pd.DataFrame:
    """Key moments of a per-epoch run (Figs 5, S9).

    The measures at the first measurement at or after zero training error, the last one before
    the alpha-scaling, at the scaling, the first one after it, and at the end.

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
