"""A self-contained HTML report of a results database.

Figures (base64 PNG), correlation tables, the configuration of every run, and the library
versions. No external files or scripts.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from flatprior.analysis.claims import evaluate_claims
from flatprior.analysis.correlations import (
    boolean_table,
    correlation_table,
    epochs_summary,
    granulated_table,
    measure_columns,
    swept_axes,
    wide_table,
)
from flatprior.analysis.plots import (
    attack_figure,
    boolean_figure,
    epochs_figure,
    psi_figure,
    to_png,
)
from flatprior.errors import FlatpriorError

#: per-run columns shown in the run tables (when present), after the varying config fields
RESULT_COLUMNS = (
    "status",
    "epochs_to_zero_error",
    "train_error",
    "attack_error",
    "test_error",
    "log_prior",
    "sharpness",
    "spectral_norm",
    "relative_flatness",
    "pac_bayes_bound",
    "wall_time_s",
    "error",
)
MAX_RUN_ROWS = 3000
MAX_EPOCH_FIGURES = 6


@dataclass
class SpecSection:
    """Analysis of the runs of one spec label."""

    label: str
    info: dict[str, Any]
    frame: pd.DataFrame
    correlations: pd.DataFrame = field(default_factory=pd.DataFrame)
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, png)
    # granulated Kendall (>= 2 swept axes): one row per measure, and the pooled correlations
    granulated: pd.DataFrame = field(default_factory=pd.DataFrame)
    pooled: pd.DataFrame = field(default_factory=pd.DataFrame)
    extra_tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    #: keys of this spec's stored records that could not be read (invalid JSON; skipped)
    unreadable: list[str] = field(default_factory=list)


def analyse_spec(
    store,
    label: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    boolean_samples: int = 0,
    make_figures: bool = True,
) -> SpecSection:
    """Correlations (and figures) of one spec label's runs in ``store``."""
    info = store.spec_info(label) or {"label": label}
    before = set(store.unreadable)
    df = store.to_frame(spec=label)
    sec = SpecSection(label, info, df, unreadable=sorted(store.unreadable - before))
    if df.empty:
        return sec
    kind = info.get("analysis", "attack")
    group_by = info.get("group_by", ["optimizer"])
    if kind == "boolean" and "function" in df.columns:
        prior = None
        if boolean_samples > 0:
            prior = _sample_prior(df, boolean_samples, seed)
        bt = boolean_table(df, top=info.get("boolean_top", 1000), prior=prior)
        from flatprior.prior import function_hex

        shown = bt.head(20).copy()
        shown["function"] = [function_hex([c == "1" for c in f]) for f in shown["function"]]
        sec.extra_tables.append(
            (f"The {len(shown)} functions SGD found most often (of {len(bt)} kept; function as "
             "32 hex digits, input 0 = the high bit)", shown)
        )
        flat = [c for c in measure_columns(bt) if c not in ("log_prior", "pac_bayes_bound")]
        parts = []
        for tgt in ("log_prior", "log_p_sampled"):
            if tgt in bt and bt[tgt].notna().sum() >= 3:
                t = correlation_table(bt, target=tgt, measures=flat, group_by=None, status=None,
                                      n_boot=n_boot, seed=seed)
                t.insert(0, "versus", tgt)
                parts.append(t)
        sec.correlations = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if make_figures:
            sec.figures.append((
                "Flatness of the most frequent SGD functions against their log P(f) "
                "(colour: how often SGD found the function)",
                to_png(boolean_figure(bt)),
            ))
        return sec
    if kind == "epochs":
        # one trajectory per run: key moments instead of cross-run correlations
        recs = list(store.records(spec=label))
        for rec in recs[:MAX_EPOCH_FIGURES]:
            sec.extra_tables.append(
                (f"Run {rec['key']}: measures around zero error and the α-scaling",
                 epochs_summary(rec))
            )
            if not make_figures:
                continue
            cfg = rec.get("config", {})
            cap = (f"Run {rec['key']} ({cfg.get('dataset')}, seed {cfg.get('seed')}, "
                   f"{cfg.get('optimizer')}, α = {cfg.get('alpha')} at +{cfg.get('alpha_epoch')} "
                   "epochs): grey dotted = first zero training error, red dashed = α-scaling")
            sec.figures.append((cap, to_png(epochs_figure(rec))))
        return sec
    sec.correlations = correlation_table(df, group_by=group_by, n_boot=n_boot, seed=seed)
    axes = swept_axes(df)
    if len(axes) >= 2:
        sec.granulated = granulated_table(df, axes, n_boot=n_boot, seed=seed)
        sec.pooled = correlation_table(df, group_by=None, n_boot=n_boot, seed=seed)
        if make_figures and not sec.granulated.empty:
            sec.figures.append((
                "Predictors ranked by the granulated Kendall coefficient Ψ (Jiang et al. 2020) "
                f"over the swept axes {', '.join(axes)}: Ψ with its 95 % bootstrap interval and "
                "the τ along each axis", to_png(psi_figure(sec.granulated)),
            ))
    if make_figures:
        sec.figures.append((
            "Each measure against the generalization error; colour = attack-set size |A| "
            "(runs that reached zero training error)",
            to_png(attack_figure(df, group_by=group_by)),
        ))
    return sec


def _sample_prior(df: pd.DataFrame, n_samples: int, seed: int):
    from flatprior.prior import sample_boolean_prior

    hidden = json.loads(df["hidden"].iloc[0]) if isinstance(df["hidden"].iloc[0], str) else [40, 40]
    sw2 = float(df["sigma_w2"].iloc[0]) if "sigma_w2" in df else 2.0
    sb2 = float(df["sigma_b2"].iloc[0]) if "sigma_b2" in df else 1.0
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    # ~150 k networks/s on 2 cores: a bar for anything longer than a few seconds (stderr)
    with Progress(TextColumn("sampling random networks"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                  disable=n_samples < 1_000_000) as prog:
        task = prog.add_task("sample", total=int(n_samples))
        return sample_boolean_prior(
            int(n_samples), (7, *hidden, 1), sigma_w2=sw2, sigma_b2=sb2, seed=seed,
            progress=lambda k: prog.advance(task, k),
        )


# -- HTML -----------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}.muted{color:#777}
.scroll{max-height:480px;overflow:auto}
"""


def _table_html(df: pd.DataFrame, cls: str = "data") -> str:
    if df.empty:
        return "<p class='muted'>(none)</p>"
    return df.to_html(index=False, escape=True, classes=cls, na_rep="", float_format=_fmt)


def _fmt(v: float) -> str:
    if v != v:
        return ""
    a = abs(v)
    return f"{v:.4g}" if a == 0 or 1e-3 <= a < 1e5 else f"{v:.3e}"


def _img(png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>"


def _runs_html(df: pd.DataFrame) -> str:
    """The configuration of every run.

    The fields common to all (one JSON block) and, per run, the fields that vary plus its
    results.
    """
    from flatprior.config import RunConfig

    fields = [f for f in RunConfig.model_fields if f in df.columns]
    common = {f: df[f].iloc[0] for f in fields if df[f].nunique(dropna=False) <= 1}
    varying = [f for f in fields if f not in common]
    common_json = json.dumps({k: _py(v) for k, v in common.items()}, indent=1)
    cols = ["key", *varying, *[c for c in RESULT_COLUMNS if c in df.columns and c not in varying]]
    shown = df[cols]
    note = ""
    if len(shown) > MAX_RUN_ROWS:
        note = f"<p class='muted'>first {MAX_RUN_ROWS} of {len(shown)} runs shown</p>"
        shown = shown.head(MAX_RUN_ROWS)
    return (
        "<details><summary>Configuration shared by all runs</summary>"
        f"<pre>{html.escape(common_json)}</pre></details>"
        f"<p>Per-run configuration (fields that vary) and results:</p>{note}"
        f"<div class='scroll'>{_table_html(shown)}</div>"
    )


def _py(v):
    if isinstance(v, str):
        try:
            return json.loads(v) if v[:1] in "[{" else v
        except ValueError:
            return v
    if hasattr(v, "item"):
        return v.item()
    return v


def _claims_html(claims: list | str | None) -> str:
    """The verdict table of :mod:`flatprior.analysis.claims` (or why there is none)."""
    head = ("<h2 id='claims'>The study's claims</h2><p>Each claim of the study with its "
            "statistic, 95 % interval, the rule fixed in advance and the verdict "
            "(<code>flatprior claims DB</code> prints the same).</p>")
    if claims is None:
        return ""
    if isinstance(claims, str):
        return head + f"<p class='muted'>{html.escape(claims)}</p>"
    from flatprior.analysis.claims import claims_frame

    t = claims_frame(claims)[["id", "claim", "statistic", "value", "ci_low", "ci_high", "n",
                             "rule", "verdict", "detail"]]
    return head + f"<div class='scroll'>{_table_html(t)}</div>"


def render_html(sections: list[SpecSection], *, title: str, source: str,
                versions: list[dict[str, Any]], claims: list | str | None = None) -> str:
    """The report page as one HTML string (no external resources).

    ``claims``: the verdicts (first section), or a sentence saying why there are none.
    """
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='muted'>Results database <code>{html.escape(source)}</code>; generated {now}."
        "</p>",
        "<p>Correlations: Kendall τ, Spearman ρ and Pearson r between each measure and the "
        "generalization error (test error), with 95 % percentile-bootstrap intervals, over the "
        "runs that reached zero training error. Pearson r uses log10 of the flatness measures. "
        "log P(f) is the natural log of the NNGP prior probability of the function on S ∪ E.</p>",
        _claims_html(claims),
        "<ul>",
    ]
    if claims is not None:
        parts.append("<li><a href='#claims'>The study's claims: verdicts</a></li>")
    for s in sections:
        parts.append(f"<li><a href='#{_anchor(s.label)}'>{html.escape(s.label)}</a> — "
                     f"{html.escape(s.info.get('title', ''))} ({len(s.frame)} runs)</li>")
    parts.append("</ul>")
    for s in sections:
        info = s.info
        parts.append(f"<h2 id='{_anchor(s.label)}'>{html.escape(s.label)}: "
                     f"{html.escape(info.get('title', ''))}</h2>")
        if info.get("reproduces"):
            parts.append(f"<p><b>Reproduces:</b> {html.escape(info['reproduces'])}</p>")
        if info.get("description"):
            parts.append(f"<p>{html.escape(info['description'])}</p>")
        if s.unreadable:
            parts.append(f"<p><b>{len(s.unreadable)} stored record(s) unreadable</b> (invalid "
                         "JSON), left out: " + html.escape(", ".join(s.unreadable)) + "</p>")
        if not s.frame.empty and "status" in s.frame:
            counts = s.frame["status"].value_counts().to_dict()
            parts.append("<p><b>Runs:</b> " + ", ".join(
                f"{html.escape(str(k))}: {v}" for k, v in counts.items()) + "</p>")
        if info.get("analysis") != "epochs":  # a trajectory per run: no cross-run correlation
            parts.append("<h3>Correlations</h3>")
            if not s.correlations.empty:
                parts.append(_table_html(wide_table(s.correlations)))
                parts.append("<details><summary>long form (with p-values)</summary>"
                             f"{_table_html(s.correlations)}</details>")
            else:
                parts.append("<p class='muted'>not enough zero-error runs with measures "
                             "to correlate</p>")
        if not s.granulated.empty:
            axes = [c[4:] for c in s.granulated.columns if c.startswith("tau_")
                    and not c.endswith(("_ci_low", "_ci_high"))]
            parts.append(
                "<h3>Granulated Kendall Ψ beside the pooled τ</h3><p>Ψ (Jiang et al. 2020): "
                "for each swept axis, Kendall τ over groups of runs that differ only in that "
                "axis (seeds are replicates within a group), averaged over the groups, then "
                "over the axes (" + html.escape(", ".join(axes)) + "). Pooled: one τ over all "
                "runs. Ranked by Ψ in the direction each measure should predict (log P(f): "
                "negative; the others are complexity measures: positive).</p>")
            parts.append(_table_html(wide_table(s.pooled, granulated=s.granulated)))
        for cap, png in s.figures:
            parts.append(f"<figure>{_img(png, cap)}<figcaption>{html.escape(cap)}"
                         "</figcaption></figure>")
        for cap, t in s.extra_tables:
            parts.append(f"<h3>{html.escape(cap)}</h3><div class='scroll'>{_table_html(t)}</div>")
        if not s.frame.empty and "status" in s.frame and (s.frame["status"] == "failed").any():
            f = s.frame[s.frame["status"] == "failed"][["key", "error"]]
            parts.append(f"<h3>Failed runs</h3>{_table_html(f)}")
        if not s.frame.empty:
            parts.append(f"<h3>Runs</h3>{_runs_html(s.frame)}")
    parts.append("<h2 id='versions'>Versions</h2>")
    uniq = {json.dumps(v, sort_keys=True) for v in versions if v}
    for v in sorted(uniq):
        parts.append(f"<pre>{html.escape(v)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _anchor(label: str) -> str:
    return "spec-" + "".join(c if c.isalnum() else "-" for c in label)


def write_report(
    db: str | Path,
    out: str | Path,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    boolean_samples: int = 0,
    title: str = "flatprior report",
) -> tuple[Path, list[SpecSection]]:
    """Analyse every spec in the results database ``db`` and write the HTML page ``out``.

    Returns the path written and the analysed sections (their ``correlations`` DataFrames).
    """
    from flatprior.experiments.store import Store

    out = Path(out).expanduser()
    if out.is_dir():
        out = out / "report.html"
    if not out.parent.is_dir():
        raise FlatpriorError(f"cannot write the report to {out}: folder {out.parent} is missing")
    with Store(db, readonly=True) as store:
        labels = store.specs()
        if not labels:
            raise FlatpriorError(f"{db} holds no runs yet; run `flatprior run SPEC --out {db}`")
        sections = [
            analyse_spec(store, lab, n_boot=n_boot, seed=seed, boolean_samples=boolean_samples)
            for lab in labels
        ]
        versions = [r.get("versions", {}) for r in store.records()]
        try:
            claims = evaluate_claims(store, n_boot=max(n_boot, 1), seed=seed)
        except FlatpriorError as exc:  # e.g. no run reached zero error: say so on the page
            claims = f"no verdicts: {exc}"
    page = render_html(sections, title=title, source=str(db), versions=versions, claims=claims)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise FlatpriorError(f"cannot write the report to {out} ({exc.strerror})") from None
    return out, sections
