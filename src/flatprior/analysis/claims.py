"""Verdicts on the study's claims, read from the runs stored in a results database.

Each claim of Zhang et al. (arXiv 2103.06219) is a hypothesis with a statistic, an uncertainty
and a rule decided in advance; :func:`evaluate_claims` applies the rules to stored rows only
(no training, no measuring) and returns one :class:`Claim` per line:

- **(a)** log P(f) predicts the test error, for every optimizer: Kendall τ(log P, test error)
  with a bootstrap 95 % CI; holds if the CI's upper end < 0.
- **(b)** sharpness correlates with the test error for plain SGD (holds if the CI's lower end
  > 0), and *less* for Adam / Entropy-SGD than for SGD: τ_SGD − τ_other with a paired bootstrap
  CI (runs paired by data seed and |A|); holds if its lower end > 0.
- **(c)** α-scaling moves sharpness arbitrarily while f and log P(f) stay: at the α event of
  fig5/figS9 runs, the sharpness ratio after/before (same weights up to the scaling); holds if
  every run has ratio ≥ 10 or ≤ 0.1 with identical predictions and |Δ log P| ≤ 1e-9.
  Precondition: the network stays at zero training error after the event.
- **(d)** on the Boolean system, flatter functions have larger prior: τ(sharpness, log P) over
  the functions SGD finds most often (fig2-boolean); holds if the CI's upper end < 0.
- **(e)** EP is accurate enough: |log P_EP − log P_tilting| over runs measured both ways
  (same network, ``prior_method`` differing); holds if the median is ≤ 1 nat and the ranking
  agrees (Kendall τ between the two ≥ 0.9).
- **(f)** overtraining changes sharpness while f and log P(f) barely move: sharpness ratio
  end / first-zero-error (figS11-16 pairs differing only in ``overtrain_epochs``, and the
  pre-α part of fig5/figS9 runs), bootstrap CI of the median ratio; holds if the CI excludes 1
  and the median |Δ log P| ≤ 1 nat.

Verdicts: ``holds``, ``does not hold``, ``not enough runs`` (with how many are needed and which
spec and preset produce them), ``precondition failed``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from flatprior.analysis.correlations import correlation
from flatprior.errors import FlatpriorError
from flatprior.experiments.store import records_frame

HOLDS, FAILS, TOO_FEW, PRECONDITION = (
    "holds", "does not hold", "not enough runs", "precondition failed"
)
#: fewest runs (or functions, pairs) a correlation verdict is drawn from
MIN_RUNS = 10
MIN_PAIRS = 5
MIN_ALPHA_RUNS = 1
ALPHA_RATIO = 10.0
SAME_LOG_PRIOR = 1e-9
EP_MEDIAN_NATS = 1.0
EP_RANK_TAU = 0.9
OVERTRAIN_LOG_PRIOR_NATS = 1.0
CONTRAST_OPTIMIZERS = ("adam", "entropy-sgd")
ATTACK_SOURCE = "fig3 mnist-fcn / fig4 / figS18 / figS11-16 (--preset paper)"


@dataclass
class Claim:
    """One verdict line.

    Attributes:
        id: claim letter and qualifier, e.g. ``"a/sgd"``.
        claim: the claim in one sentence.
        statistic: what was computed.
        value: its value (NaN when not computed).
        ci_low, ci_high: 95 % interval (NaN when none).
        n: runs (or functions, pairs) it rests on.
        rule: the decision rule, fixed in advance.
        verdict: ``holds`` | ``does not hold`` | ``not enough runs`` | ``precondition failed``.
        detail: what else the reader needs (how many runs are needed, which spec produces
            them, precondition counts, ...).
    """

    id: str
    claim: str
    statistic: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    rule: str
    verdict: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The claim as a JSON-able dict (non-finite numbers become ``None``)."""
        d = asdict(self)
        for k in ("value", "ci_low", "ci_high"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None
        return d


def _nan() -> float:
    return float("nan")


def _too_few(cid, claim, statistic, rule, n, need, source) -> Claim:
    return Claim(cid, claim, statistic, _nan(), _nan(), _nan(), n, rule, TOO_FEW,
                 f"have {n}, need >= {need}; produced by {source}")


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    if col not in df:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)


# -- (a), (b): attack-set sweeps -----------------------------------------------------------------
def attack_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs of attack-set sweeps that reached zero error, measured at zero error.

    No overtraining; one row per distinct key, sorted by key (row order never matters).
    """
    if df.empty or "status" not in df:
        return df.iloc[0:0]
    d = df[(df["status"] == "zero_error")]
    if "analysis" in d:
        d = d[d["analysis"] == "attack"]
    if "overtrain_epochs" in d:
        d = d[pd.to_numeric(d["overtrain_epochs"], errors="coerce").fillna(0) == 0]
    return d.drop_duplicates("key").sort_values("key").reset_index(drop=True)


def attack_claims(df: pd.DataFrame, *, n_boot: int, seed: int) -> list[Claim]:
    """Claims (a) and (b) for each system (dataset, model, |S|) with attack-set runs.

    Runs of different systems are never pooled.
    """
    runs = attack_runs(df)
    cols = [c for c in ("dataset", "model", "n_train", "prior_method") if c in runs]
    if runs.empty or not cols:
        return [*claim_log_prior(runs, n_boot=n_boot, seed=seed),
                *claim_sharpness(runs, n_boot=n_boot, seed=seed)]
    out: list[Claim] = []
    for vals, part in runs.groupby(cols, sort=True):
        vals = vals if isinstance(vals, tuple) else (vals,)
        system = dict(zip(cols, vals, strict=True))
        tag = f"{system.get('dataset')} {system.get('model')} |S|={system.get('n_train')}"
        if system.get("prior_method", "ep") != "ep":
            tag += f", log P by {system['prior_method']}"
        for c in (*claim_log_prior(part, n_boot=n_boot, seed=seed),
                  *claim_sharpness(part, n_boot=n_boot, seed=seed, missing_contrast=False)):
            c.id = f"{c.id} ({tag})"
            c.extra["system"] = system
            out.append(c)
    if not any(c.id.startswith("b/sgd-vs-") for c in out):  # no system has the contrast's runs
        out.append(_contrast_claim(runs.iloc[0:0], "adam", "sharpness", n_boot=n_boot, seed=seed))
    return out


def claim_log_prior(runs: pd.DataFrame, *, n_boot: int, seed: int) -> list[Claim]:
    """(a) per optimizer: τ(log P, test error) < 0."""
    text = "log P(f) correlates negatively with the test error (higher prior, lower error)"
    rule = "holds if the 95 % CI's upper end < 0"
    stat = "Kendall tau(log P, test error)"
    out = []
    optimizers = sorted(runs["optimizer"].dropna().unique()) if len(runs) else []
    for opt in optimizers or ["sgd"]:
        part = runs[runs["optimizer"] == opt] if len(runs) else runs
        out.append(_tau_claim(f"a/{opt}", f"{text} [{opt}]", stat, part, "log_prior",
                              "test_error", rule, upper_below_zero=True, n_boot=n_boot, seed=seed,
                              source=ATTACK_SOURCE))
    return out


def _tau_claim(cid, text, stat, part, x, y, rule, *, upper_below_zero, n_boot, seed, source):
    xs, ys = _num(part, x), _num(part, y)
    ok = np.isfinite(xs) & np.isfinite(ys)
    n = int(ok.sum())
    if n < MIN_RUNS:
        return _too_few(cid, text, stat, rule, n, MIN_RUNS, source)
    r = correlation(xs[ok], ys[ok], "kendall", n_boot=n_boot, seed=seed)
    if upper_below_zero:
        verdict = HOLDS if r["ci_high"] < 0 else FAILS
    else:
        verdict = HOLDS if r["ci_low"] > 0 else FAILS
    return Claim(cid, text, stat, r["estimate"], r["ci_low"], r["ci_high"], n, rule, verdict)


def claim_sharpness(runs: pd.DataFrame, *, n_boot: int, seed: int,
                    measure: str = "sharpness", missing_contrast: bool = True) -> list[Claim]:
    """(b) τ(sharpness, test error) > 0 for SGD, and τ_SGD − τ_other > 0 (paired bootstrap)."""
    out = []
    stat = f"Kendall tau({measure}, test error)"
    sgd = runs[runs["optimizer"] == "sgd"] if len(runs) else runs
    out.append(_tau_claim(
        "b/sgd", "sharpness correlates positively with the test error for plain SGD", stat, sgd,
        measure, "test_error", "holds if the 95 % CI's lower end > 0", upper_below_zero=False,
        n_boot=n_boot, seed=seed, source="fig3 mnist-fcn --preset paper"))
    if measure == "sharpness" and len(sgd) and "sharpness_lbfgsb" in sgd \
            and pd.to_numeric(sgd["sharpness_lbfgsb"], errors="coerce").notna().any():
        # the same claim read with Keskar's own (converged) maximiser, where it was stored
        c = _tau_claim(
            "b/sgd/lbfgsb", "sharpness (maximised by L-BFGS-B) correlates positively with the "
            "test error for plain SGD", "Kendall tau(sharpness_lbfgsb, test error)", sgd,
            "sharpness_lbfgsb", "test_error", "holds if the 95 % CI's lower end > 0",
            upper_below_zero=False, n_boot=n_boot, seed=seed,
            source="fig3 mnist-fcn --preset paper")
        out.append(c)
    present = set(runs["optimizer"].dropna()) if len(runs) else set()
    others = [o for o in CONTRAST_OPTIMIZERS if o in present]
    for other in others or (["adam"] if missing_contrast else []):
        out.append(_contrast_claim(runs, other, measure, n_boot=n_boot, seed=seed))
    return out


def _pair_keys(df: pd.DataFrame) -> pd.Series:
    """What pairs an SGD run with another optimizer's run: the data and the attack set."""
    cols = [c for c in ("dataset", "n_train", "n_test", "n_attack", "seed", "data_seed")
            if c in df]
    return pd.Series(["|".join(map(str, r)) for r in df[cols].itertuples(index=False)],
                     index=df.index, dtype=object)


def _contrast_claim(runs, other, measure, *, n_boot, seed) -> Claim:
    text = f"sharpness correlates less with the test error for {other} than for SGD"
    stat = f"tau_sgd - tau_{other} of ({measure}, test error), paired bootstrap"
    rule = "holds if the 95 % CI's lower end > 0"
    cid = f"b/sgd-vs-{other}"
    if not len(runs):
        return _too_few(cid, text, stat, rule, 0, MIN_RUNS, "fig4 --preset paper")
    a = runs[runs["optimizer"] == "sgd"].assign(pair=lambda d: _pair_keys(d))
    b = runs[runs["optimizer"] == other].assign(pair=lambda d: _pair_keys(d))
    # one run per pair on each side (a sweep repeated with other settings must not pair twice)
    a = a.drop_duplicates("pair")
    b = b.drop_duplicates("pair")
    both = sorted(set(a["pair"]) & set(b["pair"]))
    a = a.set_index("pair").loc[both]
    b = b.set_index("pair").loc[both]
    xa, ya, xb, yb = (_num(a, measure), _num(a, "test_error"), _num(b, measure),
                      _num(b, "test_error"))
    ok = np.isfinite(xa) & np.isfinite(ya) & np.isfinite(xb) & np.isfinite(yb)
    n = int(ok.sum())
    if n < MIN_RUNS:
        return _too_few(cid, text, stat, rule, n, MIN_RUNS,
                        "fig4 --preset paper (SGD and the other optimizer on the same seeds/|A|)")
    xa, ya, xb, yb = xa[ok], ya[ok], xb[ok], yb[ok]

    def diff(idx):
        return (stats.kendalltau(xa[idx], ya[idx]).statistic
                - stats.kendalltau(xb[idx], yb[idx]).statistic)

    est = float(diff(np.arange(n)))
    rng = np.random.default_rng(seed)
    boots = np.array([diff(rng.integers(0, n, n)) for _ in range(n_boot)])
    boots = boots[np.isfinite(boots)]
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if len(boots) else (_nan(), _nan()))
    verdict = HOLDS if lo > 0 else FAILS
    return Claim(cid, text, stat, est, float(lo), float(hi), n, rule, verdict,
                 f"tau_sgd {stats.kendalltau(xa, ya).statistic:+.2f}, "
                 f"tau_{other} {stats.kendalltau(xb, yb).statistic:+.2f} on {n} paired runs")


# -- (c), (f): per-epoch runs ------------------------------------------------------------------
def _sharp_key(entry: dict[str, Any]) -> str | None:
    for k in ("sharpness_lbfgsb", "sharpness"):
        if entry.get(k) is not None:
            return k
    return None


def alpha_events(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per α event of the per-epoch runs.

    Columns: ratio of sharpness after/before on the same weights, Δ log P, whether the
    predictions stayed identical, and train-error epochs after the event.
    """
    rows = []
    for rec in records:
        hist = rec.get("history") or []
        ev = next((m for m in hist if m.get("alpha_scaled")), None)
        if ev is None:
            continue
        before = ev.get("before_alpha") or {}
        key = _sharp_key(before)
        cfg = rec.get("config") or {}
        after_epochs = [m for m in hist if m["epoch"] > ev["epoch"]]
        row = {
            "key": rec.get("key"), "alpha": cfg.get("alpha"), "alpha_layer": cfg.get("alpha_layer"),
            "lr": cfg.get("lr"),
            "epoch": ev["epoch"], "measure": key,
            "ratio": (ev[key] / before[key]) if key and before.get(key) else _nan(),
            "d_log_prior": (abs(ev["log_prior"] - before["log_prior"])
                            if ev.get("log_prior") is not None
                            and before.get("log_prior") is not None else _nan()),
            "same_function": ev.get("alpha_same_function"),
            "epochs_with_train_error_after": sum(m["train_acc"] < 1.0 for m in after_epochs),
            "epochs_after": len(after_epochs),
            "max_train_error_after": max((1 - m["train_acc"] for m in after_epochs), default=0.0),
        }
        later = [m for m in after_epochs if m.get(key) is not None] if key else []
        if later:
            row["sharpness_end_over_before"] = later[-1][key] / before[key]
        rows.append(row)
    return pd.DataFrame(rows)


def claim_alpha(records: Sequence[dict[str, Any]]) -> list[Claim]:
    """(c) per α value: ratio >= 10 or <= 0.1 while f and log P(f) are unchanged."""
    ev = alpha_events(records)
    text = ("alpha-scaling changes sharpness by a factor >= 10 while f and log P(f) are "
            "unchanged")
    rule = (f"holds if every run has ratio >= {ALPHA_RATIO:g} or <= {1 / ALPHA_RATIO:g}, identical "
            f"predictions on S+E and |d log P| <= {SAME_LOG_PRIOR:g}; precondition: zero train "
            "error after the event")
    stat = "sharpness after / before the alpha event (median over runs)"
    if ev.empty or ev["ratio"].notna().sum() < MIN_ALPHA_RUNS:
        return [_too_few("c", text, stat, rule, 0, MIN_ALPHA_RUNS,
                         "fig5 or figS9 (--preset paper; needs per-epoch sharpness and log_prior)")]
    out = []
    ev["lr"] = ev["lr"].astype(object).where(ev["lr"].notna(), "default")
    groups = sorted(ev.groupby(["alpha", "lr"]), key=lambda t: (t[0][0], str(t[0][1])))
    several_lr = ev["lr"].nunique() > 1
    for (alpha, lr), part in groups:
        part = part[part["ratio"].notna()]
        if part.empty:
            continue
        ratios = part["ratio"].to_numpy(float)
        big = (ratios >= ALPHA_RATIO) | (ratios <= 1 / ALPHA_RATIO)
        same = part["same_function"].fillna(False).astype(bool).to_numpy()
        dlp = part["d_log_prior"].to_numpy(float)
        unchanged = same & (np.nan_to_num(dlp, nan=np.inf) <= SAME_LOG_PRIOR)
        left = int((part["epochs_with_train_error_after"] > 0).sum())
        detail = (f"ratios {', '.join(f'{r:.3g}' for r in ratios)}; identical f in "
                  f"{int(same.sum())}/{len(part)} runs, max |d log P| {np.nanmax(dlp):.2g}; "
                  f"runs leaving zero train error after the event: {left}/{len(part)} "
                  f"(max train error {part['max_train_error_after'].max():.3f})")
        if "sharpness_end_over_before" in part:
            detail += ("; sharpness at the end / before the event: "
                       + ", ".join(f"{r:.3g}" for r in part["sharpness_end_over_before"]))
        if left:
            verdict = PRECONDITION
        else:
            verdict = HOLDS if bool(big.all() and unchanged.all()) else FAILS
        lo, hi = float(ratios.min()), float(ratios.max())
        tag = f"alpha={alpha:g}" + (f", lr={lr}" if several_lr else "")
        out.append(Claim(f"c/{tag}", f"{text} [{tag.replace('=', ' = ')}]", stat,
                         float(np.median(ratios)), lo, hi, len(part), rule, verdict, detail,
                         extra={"interval": "min-max over runs"}))
    return out


def overtraining_pairs(df: pd.DataFrame, records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Sharpness and log P at first zero error vs after overtraining, one row per network.

    Sources: runs differing only in ``overtrain_epochs`` (0 vs the longest; same seed, hence the
    same network up to zero error) and per-epoch runs (first zero-error measurement vs the last
    one before any α event, or the end).
    """
    rows = []
    if not df.empty and "overtrain_epochs" in df and "status" in df:
        d = df[df["status"] == "zero_error"].drop_duplicates("key")
        d = d.assign(ot=pd.to_numeric(d["overtrain_epochs"], errors="coerce").fillna(0))
        ignore = {"key", "overtrain_epochs", "ot", "spec", "created", "analysis"}
        cfg_cols = [c for c in ("dataset", "n_train", "n_test", "n_attack", "seed", "optimizer",
                                "lr", "batch_size", "model", "hidden", "data_seed")
                    if c in d and c not in ignore]
        # only configurations run with >= 2 overtraining lengths pair up (a Boolean sweep has
        # 1e5 single runs: skip them without a Python loop)
        several = d.groupby(cfg_cols, dropna=False)["ot"].transform("nunique") >= 2
        for _, g in d[several].groupby(cfg_cols, dropna=False):
            g = g.sort_values("ot")
            first, last = g.iloc[0], g.iloc[-1]
            if first["ot"] != 0:
                continue
            rows.append({"source": "overtrain_epochs pair", "epochs": last["ot"],
                         "sharp0": first.get("sharpness"), "sharp1": last.get("sharpness"),
                         "lp0": first.get("log_prior"), "lp1": last.get("log_prior"),
                         "te0": first.get("test_error"), "te1": last.get("test_error")})
    for rec in records:
        hist = rec.get("history") or []
        zero = rec.get("epochs_to_zero_error")
        if zero is None:
            continue
        measured = [m for m in hist if _sharp_key(m) and m.get("log_prior") is not None]
        start = next((m for m in measured if m["epoch"] >= zero), None)
        ev = next((m for m in hist if m.get("alpha_scaled")), None)
        if ev is not None and ev.get("before_alpha"):
            end = {**ev["before_alpha"], "epoch": ev["epoch"], "test_acc": ev.get("test_acc")}
        else:
            cands = [m for m in measured if ev is None or m["epoch"] < ev["epoch"]]
            end = cands[-1] if cands else None
        if start is None or end is None or end["epoch"] <= start["epoch"]:
            continue
        k = _sharp_key(start)
        rows.append({"source": "per-epoch run", "epochs": end["epoch"] - start["epoch"],
                     "sharp0": start.get(k), "sharp1": end.get(k),
                     "lp0": start.get("log_prior"), "lp1": end.get("log_prior"),
                     "te0": 1 - start["test_acc"] if start.get("test_acc") is not None else None,
                     "te1": 1 - end["test_acc"] if end.get("test_acc") is not None else None})
    return pd.DataFrame(rows)


def claim_overtraining(df, records, *, n_boot: int, seed: int) -> list[Claim]:
    """(f) sharpness changes with overtraining while log P(f) barely moves."""
    text = ("overtraining past the first zero-error epoch changes sharpness while f and "
            "log P(f) barely move")
    rule = (f"holds if the 95 % CI of the median sharpness ratio excludes 1 and the median "
            f"|d log P| <= {OVERTRAIN_LOG_PRIOR_NATS:g} nat")
    stat = "sharpness after / at first zero error (median over networks)"
    pairs = overtraining_pairs(df, records)
    if not pairs.empty:
        s0, s1 = _num(pairs, "sharp0"), _num(pairs, "sharp1")
        pairs = pairs[np.isfinite(s0) & np.isfinite(s1) & (s0 > 0)]
    n = len(pairs)
    if n < MIN_PAIRS:
        return [_too_few("f", text, stat, rule, n, MIN_PAIRS,
                         "figS11-16 --preset paper, or fig5 / figS9")]
    ratio = _num(pairs, "sharp1") / _num(pairs, "sharp0")
    dlp = np.abs(_num(pairs, "lp1") - _num(pairs, "lp0"))
    dte = np.abs(_num(pairs, "te1") - _num(pairs, "te0"))
    rng = np.random.default_rng(seed)
    boots = np.array([np.median(ratio[rng.integers(0, n, n)]) for _ in range(n_boot)])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    med_dlp = float(np.nanmedian(dlp))
    verdict = HOLDS if ((lo > 1 or hi < 1) and med_dlp <= OVERTRAIN_LOG_PRIOR_NATS) else FAILS
    detail = (f"median |d log P| {med_dlp:.3g} nat (max {np.nanmax(dlp):.3g}), median |d test "
              f"error| {np.nanmedian(dte):.4f}; sharpness fell in {int((ratio < 1).sum())}/{n}; "
              f"sources: {', '.join(sorted(set(pairs['source'])))}")
    return [Claim("f", text, stat, float(np.median(ratio)), float(lo), float(hi), n, rule,
                  verdict, detail)]


# -- (d), (e) ------------------------------------------------------------------------------------
def claim_boolean(df: pd.DataFrame, *, top: int, n_boot: int, seed: int) -> list[Claim]:
    """(d) τ(sharpness, log P) < 0 over the functions SGD finds most often."""
    from flatprior.analysis.correlations import boolean_table

    text = ("on the Boolean system, functions with larger prior are flatter (lower sharpness)")
    rule = "holds if the 95 % CI's upper end < 0"
    stat = "Kendall tau(sharpness, log P) over SGD's most frequent functions"
    d = df[(df.get("dataset") == "boolean") & (df["status"] == "zero_error")] \
        if not df.empty and "dataset" in df and "status" in df else df.iloc[0:0]
    if "analysis" in d:  # psgd-boolean runs count functions and measure nothing
        d = d[d["analysis"] == "boolean"]
    if d.empty or "function" not in d:
        return [_too_few("d", text, stat, rule, 0, MIN_RUNS, "fig2-boolean (--preset quick/paper)")]
    bt = boolean_table(d.drop_duplicates("key"), top=top)
    return [_tau_claim("d", text, stat, bt, "sharpness", "log_prior", rule, upper_below_zero=True,
                       n_boot=n_boot, seed=seed, source="fig2-boolean")]


def claim_ep_accuracy(df: pd.DataFrame) -> list[Claim]:
    """(e) |log P_EP − log P_tilting| on the same networks."""
    text = "EP's log P(f) agrees with the certified (tilting) estimate"
    rule = (f"holds if the median |d| <= {EP_MEDIAN_NATS:g} nat and Kendall tau(EP, tilting) >= "
            f"{EP_RANK_TAU:g}")
    stat = "median |log P_EP - log P_tilting| (nats)"
    source = "the same spec run twice: default (EP) and --set prior_method=tilting"
    if df.empty or "prior_method" not in df or "log_prior" not in df:
        return [_too_few("e", text, stat, rule, 0, MIN_PAIRS, source)]
    d = df[df["status"] == "zero_error"].drop_duplicates("key")
    ignore = {"key", "prior_method", "created", "spec", "wall_time_s"}
    cfg_cols = [c for c in ("dataset", "n_train", "n_test", "n_attack", "seed", "optimizer", "lr",
                            "batch_size", "model", "hidden", "overtrain_epochs", "data_seed",
                            "kernel", "sigma_w2", "sigma_b2") if c in d and c not in ignore]
    ep = d[d["prior_method"] == "ep"].set_index(cfg_cols)["log_prior"]
    ti = d[d["prior_method"] == "tilting"].set_index(cfg_cols)["log_prior"]
    both = ep.index.intersection(ti.index)
    n = len(both)
    if n < MIN_PAIRS:
        return [_too_few("e", text, stat, rule, n, MIN_PAIRS, source)]
    a = pd.to_numeric(ep.loc[both], errors="coerce").to_numpy(float)
    b = pd.to_numeric(ti.loc[both], errors="coerce").to_numpy(float)
    diff = np.abs(a - b)
    tau = float(stats.kendalltau(a, b).statistic)
    med = float(np.median(diff))
    verdict = HOLDS if med <= EP_MEDIAN_NATS and tau >= EP_RANK_TAU else FAILS
    return [Claim("e", text, stat, med, float(diff.min()), float(diff.max()), n, rule, verdict,
                  f"worst {diff.max():.3g} nat; tau(EP, tilting) {tau:+.3f}",
                  extra={"interval": "min-max over runs"})]


# -- all ----------------------------------------------------------------------------------------
def evaluate_claims(store, *, n_boot: int = 1000, seed: int = 0,
                    frames: dict[str, pd.DataFrame] | None = None) -> list[Claim]:
    """Every claim's verdict from the runs in ``store`` (a :class:`flatprior.experiments.Store`).

    Args:
        store: the results database.
        n_boot: bootstrap resamples of the confidence intervals.
        seed: seed of the bootstrap.
        frames: spec label -> :meth:`flatprior.experiments.Store.to_frame` of that label,
            already read (a report's sections); labels missing here are read from ``store``.

    Raises:
        FlatpriorError: the store holds no runs, only failed runs, or no run that reached zero
            training error (the claims are about networks at zero error).
    """
    records: list[dict[str, Any]] = []
    known = frames or {}
    parts = []
    for label in store.specs():
        info = store.spec_info(label) or {}
        epochs = info.get("analysis") == "epochs"
        if label in known and not epochs:
            f = known[label].copy()
        else:
            recs = list(store.records(spec=label))  # parsed once: the frame and the histories
            f = records_frame(recs, spec=label)
            if epochs:
                records.extend(r for r in recs if r.get("status") == "zero_error")
        if f.empty:
            continue
        f["analysis"] = info.get("analysis", "attack")
        parts.append(f)
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if df.empty:
        raise FlatpriorError("the database holds no runs; run `flatprior run SPEC --out DB` first")
    statuses = df["status"].value_counts().to_dict() if "status" in df else {}
    if set(statuses) <= {"failed"}:
        raise FlatpriorError(
            f"all {len(df)} runs in the database failed; see `flatprior report`, fix the cause "
            "and re-run with --retry-failed")
    if not statuses.get("zero_error"):
        raise FlatpriorError(
            f"none of the {len(df)} runs reached zero training error "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))}); the claims are "
            "about networks at zero error: raise max_epochs or change the learning rate")
    records.sort(key=lambda r: str(r.get("key")))
    top = 1000
    return [
        *attack_claims(df, n_boot=n_boot, seed=seed),
        *claim_alpha(records),
        *claim_boolean(df, top=top, n_boot=n_boot, seed=seed),
        *claim_ep_accuracy(df),
        *claim_overtraining(df, records, n_boot=n_boot, seed=seed),
    ]


def claims_frame(claims: Sequence[Claim]) -> pd.DataFrame:
    """The verdicts as a table (one row per claim)."""
    return pd.DataFrame([c.to_json() for c in claims]).drop(columns=["extra"])


def claims_json(claims: Sequence[Claim]) -> str:
    """One JSON object per claim, one per line."""
    return "\n".join(json.dumps(c.to_json(), sort_keys=True) for c in claims)
