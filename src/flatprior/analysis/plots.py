"""Figures like the study's panels (matplotlib, no pyplot: safe without a display or in threads).

* :func:`attack_figure` — each measure (log P(f), sharpness, …) against the generalization error,
  points coloured by the attack-set size |A|; one row per group (e.g. optimizer) (Figs 3, 4, S18).
* :func:`epochs_figure` — per-epoch train error, loss, sharpness and log P(f) of one run, with the
  first zero-error epoch and the alpha-scaling epoch marked (Figs 5, S9).
* :func:`boolean_figure` — mean sharpness / spectral norm of the functions SGD finds against
  their log P(f) (Figs 2, S3).
* :func:`psgd_figure` — how often SGD finds each function, P_SGD(f), against its Bayesian
  posterior P_B(f | S) from sampled random networks, log-log, one panel per optimizer
  (Mingard et al. 2021).
* :func:`psi_figure` — granulated Kendall Ψ of every predictor with its bootstrap interval, and
  the per-axis τ's (Jiang et al. 2020), ranked.

Every function returns a :class:`matplotlib.figure.Figure`; :func:`to_png` renders it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from flatprior.analysis.correlations import (
    LOG_SCALE,
    correlation,
    measure_columns,
    split_fields,
)
from flatprior.measures import REGISTRY, column_label

#: axis labels of the non-measure columns; measure labels come from the measure registry
LABELS = {
    **{m.column: m.label.format(k="k") for m in REGISTRY.values()},
    "log_p_sampled": "log P(f) (sampled)",
    "log_p_tilting": "log P(f) (tilting)",
    "test_error": "generalization error",
    "train_error": "train error",
    "train_loss": "train loss",
}


def label(col: str) -> str:
    """Axis label of column ``col`` (the column name itself if it has none)."""
    return column_label(col) or LABELS.get(col, col)


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of ``fig``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _scatter(ax, x, y, c, cmap="viridis", **kw):
    return ax.scatter(x, y, c=c, cmap=cmap, s=22, edgecolors="k", linewidths=0.3, **kw)


def attack_figure(
    df: pd.DataFrame,
    measures: Sequence[str] | None = None,
    *,
    target: str = "test_error",
    group_by: Sequence[str] = ("optimizer",),
    color_by: str = "n_attack",
    title: str | None = None,
    max_rows: int = 8,
) -> Figure:
    """Measure vs generalization error, coloured by ``color_by`` (zero-error runs only).

    Columns of panels: ``measures`` (default: every measure present); rows: the groups of
    :func:`flatprior.analysis.correlations.split_fields` (at most ``max_rows``). Flatness
    measures are on a log10 axis, as in the study.
    """
    if "status" in df.columns:
        df = df[df["status"] == "zero_error"]
    measures = list(measures) if measures is not None else measure_columns(df)
    measures = [m for m in measures if m != "pac_bayes_bound"] or measures
    groups = split_fields(df, group_by) if not df.empty else []
    parts = list(df.groupby(groups, sort=True)) if groups else [((), df)]
    parts = parts[:max_rows]
    ncol, nrow = max(1, len(measures)), max(1, len(parts))
    fig = Figure(figsize=(3.6 * ncol + 0.8, 3.0 * nrow), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrow, ncol, squeeze=False))
    cvals = pd.to_numeric(df.get(color_by, pd.Series(dtype=float)), errors="coerce")
    vmin, vmax = (cvals.min(), cvals.max()) if cvals.notna().any() else (0, 1)
    sc = None
    for i, (gkey, part) in enumerate(parts):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        gname = ", ".join(f"{g}={v}" for g, v in zip(groups, gkey, strict=True))
        for j, m in enumerate(measures):
            ax = axes[i, j]
            x = pd.to_numeric(part[target], errors="coerce")
            y = pd.to_numeric(part[m], errors="coerce")
            c = pd.to_numeric(part[color_by], errors="coerce") if color_by in part else None
            if m in LOG_SCALE and (y > 0).all():
                ax.set_yscale("log")
            sc = _scatter(ax, x, y, c, vmin=vmin, vmax=vmax)
            ax.set_xlabel(label(target))
            ax.set_ylabel(label(m))
            if gname:
                ax.set_title(gname, fontsize=9)
            ax.grid(alpha=0.3)
    if sc is not None and color_by in df.columns:
        fig.colorbar(sc, ax=axes, label="|A| (attack-set size)" if color_by == "n_attack"
                     else color_by, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def epochs_figure(record: dict[str, Any], *, title: str | None = None) -> Figure:
    """Per-epoch curves of one run (its ``history``).

    Train/test error, train loss, and the per-epoch measures (``sharpness``, ``log_prior``, …)
    where they were taken.

    Dotted grey line: first epoch of zero training error; red dashed line: the alpha-scaling.
    """
    hist = pd.DataFrame(record.get("history") or [])
    if hist.empty:
        fig = Figure(figsize=(4, 2))
        fig.text(0.5, 0.5, "no per-epoch history", ha="center")
        return fig
    hist["train_error"] = 1.0 - hist["train_acc"]
    if "test_acc" in hist:
        hist["test_error"] = 1.0 - hist["test_acc"]
    extra = [c for c in measure_columns(hist) if c != "pac_bayes_bound"]
    extra.sort(key=lambda c: c == "log_prior")  # as in Fig 5: flatness first, log P(f) last
    panels = ["train_error", "train_loss", *extra]
    fig = Figure(figsize=(3.4 * len(panels), 3.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    zero = record.get("epochs_to_zero_error")
    alpha_epochs = (
        hist.loc[hist["alpha_scaled"].fillna(False).astype(bool), "epoch"].tolist()
        if "alpha_scaled" in hist
        else []
    )
    for ax, col in zip(axes, panels, strict=True):
        if col == "train_error":
            ax.plot(hist["epoch"], hist["train_error"], label="train (S)")
            if "test_error" in hist:
                ax.plot(hist["epoch"], hist["test_error"], label="test (E)")
            ax.legend(fontsize=8)
            ax.set_ylabel("error")
        else:
            h = hist[["epoch", col]].dropna()
            ax.plot(h["epoch"], h[col], marker="o" if col in extra else None, ms=3)
            if "before_alpha" in hist:  # the same weights just before the scaling
                pre = [(e, b[col]) for e, b in zip(hist["epoch"], hist["before_alpha"],
                                                   strict=True)
                       if isinstance(b, dict) and b.get(col) is not None]
                if pre:
                    ax.plot(*zip(*pre, strict=True), "kx", ms=6, label="just before α")
            ax.set_ylabel(label(col))
            if col in LOG_SCALE and len(h) and (h[col] > 0).all():
                ax.set_yscale("log")
            if col == "train_loss":
                ax.set_yscale("log")
        if zero is not None:
            ax.axvline(zero, color="grey", ls=":", lw=1)
        for a in alpha_epochs:
            ax.axvline(a, color="red", ls="--", lw=1)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if alpha_epochs:
        axes[0].text(alpha_epochs[0], axes[0].get_ylim()[1], " α-scaling", color="red",
                     fontsize=8, va="top")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def boolean_figure(table: pd.DataFrame, *, title: str | None = None,
                   n_boot: int = 1000) -> Figure:
    """Flatness of the functions SGD finds vs their log P(f) (one point per function).

    Panels: every flatness column of :func:`flatprior.analysis.correlations.boolean_table`
    (``sharpness``, ``spectral_norm``, …) against ``log_prior`` (EP) and, if present,
    ``log_p_tilting`` and ``log_p_sampled`` (with their 95 % intervals as grey bars); colour =
    how often SGD found the function (log10 of the count); each panel's title gives Kendall τ
    with its percentile-bootstrap 95 % interval (``n_boot`` resamples) (Figs 2, S3).
    """
    priors = [c for c in ("log_prior", "log_p_tilting", "log_p_sampled")
              if c in table and table[c].notna().any()]
    flat = [c for c in measure_columns(table) if c not in ("log_prior", "pac_bayes_bound")]
    if not priors or not flat:
        fig = Figure(figsize=(4, 2))
        fig.text(0.5, 0.5, "needs log_prior and a flatness measure", ha="center")
        return fig
    fig = Figure(figsize=(3.6 * len(flat) + 0.8, 3.0 * len(priors)), layout="constrained")
    axes = fig.subplots(len(priors), len(flat), squeeze=False)
    c = np.log10(table["sgd_count"].to_numpy(float))
    sc = None
    for i, p in enumerate(priors):
        for j, m in enumerate(flat):
            ax = axes[i, j]
            y = pd.to_numeric(table[m], errors="coerce")
            sc = _scatter(ax, table[p], y, c, cmap="plasma")
            if f"{p}_ci_low" in table:  # the estimator's 95 % interval of log P
                ax.errorbar(table[p], y, xerr=[(table[p] - table[f"{p}_ci_low"]).clip(lower=0),
                                               (table[f"{p}_ci_high"] - table[p]).clip(lower=0)],
                            fmt="none", ecolor="grey", elinewidth=0.5, alpha=0.6, zorder=0)
            if m in LOG_SCALE and (y > 0).all():
                ax.set_yscale("log")
            tau = correlation(table[p], y, "kendall", n_boot=n_boot, seed=0)
            if np.isfinite(tau["estimate"]):
                ci = (f" [{tau['ci_low']:+.2f}, {tau['ci_high']:+.2f}]"
                      if np.isfinite(tau["ci_low"]) else "")
                ax.set_title(f"τ = {tau['estimate']:+.2f}{ci}, n = {tau['n']}", fontsize=9)
            ax.set_xlabel(label(p))
            ax.set_ylabel(label(m))
            ax.grid(alpha=0.3)
    if sc is not None:
        fig.colorbar(sc, ax=axes, label="log10 (times SGD found f)", shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def psgd_figure(table: pd.DataFrame, summary: pd.DataFrame | None = None, *,
                group_by: Sequence[str] = ("optimizer",), title: str | None = None) -> Figure:
    """``P_SGD(f)`` against ``P_B(f | S)``, log-log, one panel per group (Mingard et al. 2021).

    Points: the functions both SGD and the sampled posterior found
    (:func:`flatprior.analysis.correlations.psgd_table`), with the Wilson 95 % interval of
    ``P_B`` as a grey bar; the dashed line is ``P_SGD = P_B``. Panel titles: Pearson r of the
    log10 values and Kendall τ from ``summary``
    (:func:`flatprior.analysis.correlations.psgd_summary`) when given.
    """
    groups = [g for g in group_by if g in table.columns]
    keys = list(table.groupby([*groups, "training_set"], sort=True, dropna=False).groups)
    if not keys:
        fig = Figure(figsize=(4, 2))
        fig.text(0.5, 0.5, "no functions to plot", ha="center")
        return fig
    fig = Figure(figsize=(4.2 * len(keys), 4.0), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        key = key if isinstance(key, tuple) else (key,)
        sel = np.ones(len(table), dtype=bool)
        for name, v in zip([*groups, "training_set"], key, strict=True):
            sel &= (table[name] == v).to_numpy()
        t = table[sel & (table["sgd_count"] > 0).to_numpy() & (table["sampled_count"] > 0)
                  .to_numpy()]
        ax.errorbar(t["p_b"], t["p_sgd"], xerr=[(t["p_b"] - t["p_b_ci_low"]).clip(lower=0),
                                                (t["p_b_ci_high"] - t["p_b"]).clip(lower=0)],
                    fmt="none", ecolor="grey", elinewidth=0.5, alpha=0.6, zorder=1)
        ax.scatter(t["p_b"], t["p_sgd"], s=14, edgecolors="k", linewidths=0.3, zorder=2)
        if len(t):
            lo = float(min(t["p_b"].min(), t["p_sgd"].min())) / 2
            ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, zorder=0)
            ax.set_xscale("log")
            ax.set_yscale("log")
        head = ", ".join(str(v) for v in key[:-1])
        stats_line = ""
        if summary is not None and len(summary):
            ssel = np.ones(len(summary), dtype=bool)
            for name, v in zip([*groups, "training_set"], key, strict=True):
                ssel &= (summary[name] == v).to_numpy()
            if ssel.any():
                r = summary[ssel].iloc[0]
                stats_line = (f"\nr(log) = {r['pearson_log10']:+.2f}, τ = {r['kendall']:+.2f}, "
                              f"{int(r['functions_both'])} functions")
        ax.set_title(f"{head} ({key[-1]}){stats_line}", fontsize=9)
        ax.set_xlabel("P_B(f | S) (sampled random networks)")
        ax.set_ylabel("P_SGD(f) (fraction of runs)")
        ax.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def psi_figure(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Ψ and the per-axis τ's of every measure of a granulated table.

    Ψ in black with its bootstrap interval, the per-axis τ's as coloured markers, for every
    measure in a :func:`flatprior.analysis.correlations.granulated_table`, in its rank order
    (best first, at the top). The sign is the raw one: log P(f) predicts with Ψ < 0.
    """
    t = table.reset_index(drop=True)
    axes = [c[4:] for c in t.columns if c.startswith("tau_") and not c.endswith(
        ("_ci_low", "_ci_high"))]
    fig = Figure(figsize=(7.5, 0.45 * len(t) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    ypos = np.arange(len(t))[::-1]
    for k, a in enumerate(axes):
        ax.scatter(t[f"tau_{a}"], ypos + 0.12 * (k - (len(axes) - 1) / 2), s=16, marker="o",
                   alpha=0.75, label=f"τ along {a}", zorder=2)
    lo = (t["psi"] - t["psi_ci_low"]).clip(lower=0).fillna(0)
    hi = (t["psi_ci_high"] - t["psi"]).clip(lower=0).fillna(0)
    ax.errorbar(t["psi"], ypos, xerr=[lo, hi], fmt="D", color="k", ms=6, capsize=3, zorder=3,
                label="Ψ (95 % bootstrap CI)")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(ypos, [label(m) for m in t["measure"]])
    ax.set_xlim(-1.08, 1.08)
    ax.set_xlabel("Kendall τ with the generalization error")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "Predictors ranked by granulated Kendall Ψ", fontsize=10)
    return fig
