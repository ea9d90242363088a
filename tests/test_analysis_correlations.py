import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flatprior.analysis.correlations import (
    boolean_table,
    correlation,
    correlation_table,
    measure_columns,
    wide_table,
)
from flatprior.errors import FlatpriorError


def test_estimates_equal_scipy_and_ci_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = 0.6 * x + rng.normal(size=40)
    for method, fn in [("kendall", stats.kendalltau), ("spearman", stats.spearmanr),
                       ("pearson", stats.pearsonr)]:
        r = correlation(x, y, method, n_boot=300, seed=7)
        ref = fn(x, y)
        assert r["estimate"] == pytest.approx(ref.statistic, abs=1e-12)
        assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert r["ci_low"] < r["estimate"] < r["ci_high"] and r["n"] == 40
        assert correlation(x, y, method, n_boot=300, seed=7) == r
        assert correlation(x, y, method, n_boot=300, seed=8)["ci_low"] != r["ci_low"]


def test_percentile_bootstrap_matches_a_hand_rolled_one():
    """Same resampling distribution: the intervals agree to Monte-Carlo precision."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    r = correlation(x, y, "spearman", n_boot=4000, seed=0)
    idx = np.random.default_rng(123).integers(0, 60, size=(4000, 60))
    boots = [stats.spearmanr(x[i], y[i]).statistic for i in idx]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    assert r["ci_low"] == pytest.approx(lo, abs=0.03)
    assert r["ci_high"] == pytest.approx(hi, abs=0.03)


def test_perfect_and_degenerate_cases():
    x = np.arange(10.0)
    r = correlation(x, -2 * x + 1, "kendall", n_boot=200)
    assert r["estimate"] == pytest.approx(-1)
    assert r["ci_low"] == pytest.approx(-1) and r["ci_high"] == pytest.approx(-1)
    assert np.isnan(correlation(x, np.ones(10), "pearson")["estimate"])
    assert np.isnan(correlation([1.0, 2.0], [3.0, 4.0], "kendall")["estimate"])
    r = correlation([1, 2, np.nan, 4, 5], [2, 1, 3, np.inf, 6], "spearman", n_boot=0)
    assert r["n"] == 3 and np.isnan(r["ci_low"])
    with pytest.raises(FlatpriorError, match="unknown correlation"):
        correlation(x, x, "tau")


def frame():
    rng = np.random.default_rng(3)
    rows = []
    for opt in ("sgd", "adam"):
        for ot in (0, 100):
            for a in range(0, 300, 25):
                err = 0.05 + a / 1000 + rng.normal(0, 0.01)
                rows.append({"optimizer": opt, "overtrain_epochs": ot, "n_attack": a,
                             "status": "zero_error", "test_error": err,
                             "log_prior": -100 - 800 * err, "sharpness": np.exp(rng.normal()),
                             "logprod_top50": rng.normal(), "lr": None})
    rows.append({"optimizer": "sgd", "overtrain_epochs": 0, "n_attack": 0, "status": "failed",
                 "test_error": 0.9, "log_prior": 0.0, "sharpness": 1e9})
    return pd.DataFrame(rows)


def test_table_groups_by_optimizer_and_overtraining_and_filters_status():
    df = frame()
    assert measure_columns(df) == ["log_prior", "sharpness", "logprod_top50"]
    t = correlation_table(df, n_boot=100)
    assert set(t.columns) >= {"optimizer", "overtrain_epochs", "measure", "method", "n",
                              "estimate", "ci_low", "ci_high", "p_value", "log10"}
    assert len(t) == 2 * 2 * 3 * 3 and set(t["n"]) == {12}  # the failed run is out
    lp = t[(t.measure == "log_prior") & (t.method == "pearson")]
    assert (lp["estimate"] < -0.999).all()
    sub = df[(df.optimizer == "adam") & (df.overtrain_epochs == 100)]
    got = t[(t.optimizer == "adam") & (t.overtrain_epochs == 100) & (t.measure == "sharpness")
            & (t.method == "pearson")]
    assert got["estimate"].item() == pytest.approx(
        stats.pearsonr(np.log10(sub.sharpness), sub.test_error).statistic)
    assert got["log10"].item()
    # no split at all
    t1 = correlation_table(df, group_by=None, n_boot=0, methods=("kendall",))
    assert len(t1) == 3 and set(t1["n"]) == {48}
    w = wide_table(t)
    assert list(w.columns[-3:]) == ["kendall", "spearman", "pearson"] and len(w) == 12
    assert w["pearson"].iloc[0].count("[") == 1


def test_boolean_table_counts_and_sampled_prior():
    from flatprior.prior import sample_boolean_prior

    prior = sample_boolean_prior(3000, (7, 8, 1), seed=0)
    top = prior.table(top=3)
    from flatprior.prior import function_bits

    f = ["".join(map(str, function_bits(h, 7))) for h in top["function"]]
    parity = "".join(str(bin(i).count("1") % 2) for i in range(128))  # never drawn by 3000 nets
    rows = ([{"function": f[0], "sharpness": 1.0, "log_prior": -5.0, "test_error": 0.1,
              "status": "zero_error"}] * 3
            + [{"function": f[1], "sharpness": 3.0, "log_prior": -9.0, "test_error": 0.3,
                "status": "zero_error"}, {"function": f[1], "sharpness": 5.0,
                                          "log_prior": -9.0, "test_error": 0.5,
                                          "status": "zero_error"}]
            + [{"function": parity, "sharpness": 9.0, "log_prior": -50.0,
                "test_error": 0.4, "status": "zero_error"},
               {"function": f[2], "sharpness": 1.0, "status": "failed"}])
    bt = boolean_table(pd.DataFrame(rows), top=2, prior=prior)
    assert list(bt["function"]) == f[:2] and list(bt["sgd_count"]) == [3, 2]
    assert bt["sgd_frequency"].tolist() == pytest.approx([3 / 6, 2 / 6])
    assert bt["sharpness"].tolist() == pytest.approx([1.0, 4.0])
    assert bt["sampled_count"].tolist() == top["count"].tolist()[:2]
    assert bt["log_p_sampled"].tolist() == pytest.approx(top["log_p"].tolist()[:2])
    allf = boolean_table(pd.DataFrame(rows), top=None, prior=prior)
    never = allf[allf.function == parity]
    assert prior.count_of([int(c) for c in parity]) == 0
    assert np.isnan(never["log_p_sampled"].item()) and never["sgd_count"].item() == 1
    with pytest.raises(FlatpriorError, match="function"):
        boolean_table(pd.DataFrame({"x": [1]}))


def test_epochs_summary_picks_the_moments():
    from flatprior.analysis.correlations import epochs_summary

    hist = []
    for e in range(0, 61):
        m = {"epoch": e, "train_acc": 1.0 if e >= 18 else 0.5, "train_loss": 1.0 / (1 + e)}
        if e % 10 == 0 or e == 35:
            m.update(sharpness=float(e), log_prior=-50.0 - e)
        if e == 35:
            m["alpha_scaled"] = True
        hist.append(m)
    t = epochs_summary({"history": hist, "epochs_to_zero_error": 18})
    assert t["moment"].tolist() == ["zero error", "before α-scaling", "α-scaling",
                                    "after α-scaling", "end"]
    assert t["epoch"].tolist() == [20, 30, 35, 40, 60]
    assert t["sharpness"].tolist() == [20.0, 30.0, 35.0, 40.0, 60.0]
    assert t["log_prior"].tolist() == [-70.0, -80.0, -85.0, -90.0, -110.0]
    assert epochs_summary({"history": []}).empty


# ------------------------------------------------------------- granulated Kendall (Jiang et al.)
def hand_grid():
    """lr in {1, 2, 3} x bs in {a, b}. By hand:
    axis lr (groups bs=a, bs=b): pairs (lr1,lr2) +, (lr1,lr3) +, (lr2,lr3) - in both groups
      -> tau = 1/3 each, psi_lr = 1/3;
    axis bs (groups lr=1,2,3): every pair concordant -> psi_bs = 1;  Psi = 2/3.
    pooled over the 6 runs (sorted by m, e = .1 .3 .2 .4 .6 .5): 2 of 15 pairs discordant
      -> tau = 11/15."""
    rows = [(1, "a", 1.0, 0.10), (2, "a", 2.0, 0.30), (3, "a", 3.0, 0.20),
            (1, "b", 4.0, 0.40), (2, "b", 6.0, 0.50), (3, "b", 5.0, 0.60)]
    return pd.DataFrame([{"lr": lr, "batch_size": bs, "m": m, "test_error": e, "seed": 0,
                          "status": "zero_error"} for lr, bs, m, e in rows])


def test_granulated_kendall_on_a_hand_computed_grid():
    from flatprior.analysis.correlations import granulated_kendall, swept_axes

    df = hand_grid()
    assert swept_axes(df) == ["lr", "batch_size"]
    g = granulated_kendall(df, "m", ["lr", "batch_size"], n_boot=0)
    assert g["tau_lr"] == pytest.approx(1 / 3) and g["groups_lr"] == 2
    assert g["tau_batch_size"] == pytest.approx(1.0) and g["groups_batch_size"] == 3
    assert g["psi"] == pytest.approx(2 / 3)
    assert g["pooled_tau"] == pytest.approx(11 / 15)
    assert np.isnan(g["psi_ci_low"])
    # with a bootstrap: seeded, and the interval holds the estimate
    b = granulated_kendall(df, "m", ["lr", "batch_size"], n_boot=300, seed=4)
    assert b["psi"] == g["psi"] and b["psi_ci_low"] <= b["psi"] <= b["psi_ci_high"]
    assert b == granulated_kendall(df, "m", ["lr", "batch_size"], n_boot=300, seed=4)


def test_granulated_groups_with_replicates_match_scipy():
    from flatprior.analysis.correlations import granulated_kendall

    rng = np.random.default_rng(0)
    rows = [{"lr": lr, "width": w, "seed": s, "m": float(rng.integers(0, 4)),
             "test_error": float(rng.normal()), "status": "zero_error"}
            for lr in (0.1, 0.2, 0.3) for w in (10, 20) for s in range(3)]
    df = pd.DataFrame(rows)
    g = granulated_kendall(df, "m", ["lr", "width"], n_boot=0)
    want_lr = np.mean([stats.kendalltau(p.m, p.test_error).statistic
                       for _, p in df.groupby("width")])
    want_w = np.nanmean([stats.kendalltau(p.m, p.test_error).statistic
                         for _, p in df.groupby("lr")])
    assert g["tau_lr"] == pytest.approx(want_lr, abs=1e-12)
    assert g["tau_width"] == pytest.approx(want_w, abs=1e-12)
    assert g["psi"] == pytest.approx((want_lr + want_w) / 2, abs=1e-12)


def test_granulated_table_ranks_by_expected_sign_and_shows_beside_pooled_tau():
    from flatprior.analysis.correlations import granulated_table, wide_granulated

    df = hand_grid()
    df["log_prior"] = -df["m"]  # a perfect mirror: Psi = -2/3, expected sign -1 -> score 2/3
    df["sharpness"] = [3.0, 1.0, 2.0, 1.0, 3.0, 2.0]
    t = granulated_table(df, n_boot=0)
    assert t["measure"].tolist()[0] == "log_prior"
    assert t.loc[0, "psi"] == pytest.approx(-2 / 3) and t.loc[0, "rank_score"] == pytest.approx(
        2 / 3)
    w = wide_granulated(t)
    assert list(w.columns) == ["measure", "n", "pooled τ", "Ψ", "τ|lr", "τ|batch_size"]
    assert w.loc[0, "Ψ"] == "-0.67"
    corr = correlation_table(df, group_by=None, n_boot=0, methods=("kendall", "spearman"))
    wt = wide_table(corr, granulated=t)
    assert list(wt.columns) == ["measure", "n", "kendall", "Ψ", "τ|lr", "τ|batch_size",
                                "spearman"]
    row = wt[wt.measure == "log_prior"].iloc[0]
    assert row["kendall"] == "-0.73" and row["Ψ"] == "-0.67"


def test_psi_figure_lists_the_measures_in_rank_order():
    from flatprior.analysis.correlations import granulated_table
    from flatprior.analysis.plots import psi_figure, to_png

    df = hand_grid()
    df["log_prior"] = -df["m"]
    df["sharpness"] = [3.0, 1.0, 2.0, 1.0, 3.0, 2.0]
    t = granulated_table(df, n_boot=50)
    fig = psi_figure(t)
    ax = fig.axes[0]
    by_height = dict(zip(ax.get_yticks(), [tk.get_text() for tk in ax.get_yticklabels()],
                         strict=True))
    assert [by_height[k] for k in sorted(by_height, reverse=True)] == ["log P(f)", "sharpness"]
    assert to_png(fig)[:4] == b"\x89PNG"
