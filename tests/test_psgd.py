"""P_SGD vs P_B(f | S) and the sampleable Fig 2: exact references.

* Wilson intervals against scipy's (``binomtest(...).proportion_ci(method="wilson")``);
* ``BooleanPrior.consistent`` / ``posterior`` on a hand-made count table, and the sampled
  posterior of a threshold unit against the exact ``P(f) / P(S)`` (probabilities derived by
  hand in test_prior_boolean);
* ``counts_of`` against a brute-force lookup;
* ``psgd_table`` / ``psgd_summary`` on synthetic runs whose P_SGD and P_B are known;
* ``prior_agreement`` on a table with known differences;
* ``boolean_prior_for``: chunks, files, incompatible files, Dask = local.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, chisquare

from flatprior.analysis.correlations import (
    boolean_training_set,
    prior_agreement,
    psgd_summary,
    psgd_table,
)
from flatprior.data import make_task
from flatprior.errors import FlatpriorError
from flatprior.prior import BooleanPrior, function_hex, sample_boolean_prior
from flatprior.prior.boolean import _pack
from flatprior.prior.exact import wilson_interval


def _prior_from(functions: dict[str, int], n_inputs: int = 7) -> BooleanPrior:
    """A BooleanPrior holding ``{bit string: count}`` (keys packed as the sampler packs them)."""
    bits = np.array([[c == "1" for c in f] for f in functions], dtype=bool)
    keys = _pack(bits)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    counts = np.array(list(functions.values()), dtype=np.int64)[order]
    return BooleanPrior(n_inputs, (n_inputs, 4, 1), 1.0, 1.0, keys[order], counts,
                        int(counts.sum()), (0,))


def test_wilson_interval_equals_scipy():
    for k, n in [(0, 10), (1, 10), (5, 10), (10, 10), (3, 1000), (931, 10_000_000),
                 (3_641_743, 10_000_000)]:
        ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
        lo, hi = wilson_interval(k, n)
        assert float(lo) == pytest.approx(ref.low, rel=1e-9, abs=1e-15)
        assert float(hi) == pytest.approx(ref.high, rel=1e-9, abs=1e-15)


def test_consistent_and_posterior_on_a_hand_made_table():
    # 2 input bits, 4 points; S = {input 1 -> 1, input 2 -> 0}
    table = {"0000": 50, "0100": 20, "0110": 7, "1101": 3, "1111": 15, "0101": 5}
    prior = _prior_from(table, n_inputs=2)
    fits = {f for f in table if f[1] == "1" and f[2] == "0"}  # 0100, 1101, 0101
    assert prior.n_functions == 6 and prior.n_samples == 100
    post = prior.posterior([1, 2], [1, 0])
    assert post.n_samples == 20 + 3 + 5 and post.n_functions == 3
    t = post.table()
    want = {function_hex([c == "1" for c in f]): table[f] for f in fits}
    assert dict(zip(t["function"], t["count"], strict=True)) == want
    assert t["frequency"].tolist() == pytest.approx([20 / 28, 5 / 28, 3 / 28])
    assert prior.consistent([], []).all()  # empty S: every function fits
    assert not prior.posterior([0, 3], [1, 0]).n_functions  # no 1??0 function was sampled
    for args, match in [(([1, 1], [0, 0]), "repeat"), (([4], [0]), "0..3"),
                        (([1], [2]), "0 or 1"), (([1, 2], [0]), "one label each")]:
        with pytest.raises(FlatpriorError, match=match):
            prior.consistent(*args)


def test_sampled_posterior_of_a_threshold_unit_matches_the_exact_one():
    from test_prior_boolean import _threshold_unit_probs

    probs = _threshold_unit_probs(1.0, 1.0)  # hex of 4 bits -> exact P(f)
    idx, lab = [0, 3], [0, 1]  # S: f(0,0) = 0, f(1,1) = 1
    fits = {h: p for h, p in probs.items()
            if p > 0 and int(h, 16) >> 3 & 1 == 0 and int(h, 16) & 1 == 1}
    p_s = sum(fits.values())
    n = 60_000
    post = sample_boolean_prior(n, widths=(2, 1), sigma_w2=1.0, sigma_b2=1.0, seed=3).posterior(
        idx, lab)
    seen = dict(zip(post.table()["function"], post.table()["count"], strict=True))
    assert set(seen) <= set(fits)
    # the fraction of networks that fit S estimates P(S) (binomial, 4 sigma)
    assert abs(post.n_samples / n - p_s) < 4 * math.sqrt(p_s * (1 - p_s) / n)
    keys = sorted(fits)
    observed = np.array([seen.get(k, 0) for k in keys])
    expected = np.array([fits[k] / p_s * post.n_samples for k in keys])
    assert chisquare(observed, expected).pvalue > 1e-3


def test_counts_of_equals_a_brute_force_lookup():
    prior = sample_boolean_prior(5000, (7, 6, 1), seed=2)
    rng = np.random.default_rng(0)
    sampled = prior.table()["function"].head(40)
    from flatprior.prior import function_bits

    queries = np.array([function_bits(h, 7) for h in sampled]
                       + [rng.integers(0, 2, 128) for _ in range(20)], dtype=np.uint8)
    brute = [int(prior.counts[(prior.keys == _pack(q[None].astype(bool))[0]).all(1)].sum())
             for q in queries]
    assert prior.counts_of(queries).tolist() == brute and sum(brute[:40]) > 0
    assert prior.count_of(queries[0]) == brute[0]
    with pytest.raises(FlatpriorError, match=r"\[B, 128\]"):
        prior.counts_of(queries[:, :64])


def _synthetic_runs():
    """Runs on one S (|S| = 8, majority target, data seed 0) by two optimizers, and a prior.

    Known truth: sgd finds f_a 6 times, f_b 3 times, f_c once (and one failed run); adam finds
    f_a twice and f_b twice. The prior holds f_a 40, f_b 20, f_d 10 (fits S, SGD never found
    it) and g 1000 (does not fit S).
    """
    base = {"dataset": "boolean", "n_train": 8, "n_attack": 0, "n_test": 120, "data_seed": 0,
            "boolean_target": None}
    idx, lab = boolean_training_set({**base, "seed": 0})
    rng = np.random.default_rng(1)

    def fitting():
        f = rng.integers(0, 2, 128)
        f[idx] = lab
        return "".join(map(str, f))

    fa, fb, fc, fd = (fitting() for _ in range(4))
    g = list(fitting())
    g[idx[0]] = "1" if g[idx[0]] == "0" else "0"
    g = "".join(g)
    rows = []
    for opt, funcs in (("sgd", [fa] * 6 + [fb] * 3 + [fc]), ("adam", [fa] * 2 + [fb] * 2)):
        for s, f in enumerate(funcs):
            rows.append({**base, "seed": s, "optimizer": opt, "function": f,
                         "status": "zero_error"})
    rows.append({**base, "seed": 99, "optimizer": "sgd", "function": g, "status": "max_epochs"})
    prior = _prior_from({fa: 40, fb: 20, fd: 10, g: 1000})
    return pd.DataFrame(rows), prior, (fa, fb, fc, fd, g)


def test_psgd_table_on_synthetic_runs_with_known_truth():
    df, prior, (fa, fb, fc, fd, g) = _synthetic_runs()
    t = psgd_table(df, prior)
    sgd = t[t.optimizer == "sgd"].set_index("function")
    assert set(sgd.index) == {fa, fb, fc, fd} and g not in set(t["function"])
    assert sgd.loc[[fa, fb, fc, fd], "sgd_count"].tolist() == [6, 3, 1, 0]
    assert sgd.loc[[fa, fb, fc, fd], "p_sgd"].tolist() == pytest.approx([0.6, 0.3, 0.1, 0.0])
    assert set(sgd["n_sgd"]) == {10} and set(sgd["n_fit"]) == {70}
    assert sgd.loc[[fa, fb, fc, fd], "p_b"].tolist() == pytest.approx([4 / 7, 2 / 7, 0, 1 / 7])
    lo, hi = wilson_interval(40, 70)
    assert sgd.loc[fa, "p_b_ci_low"] == pytest.approx(lo) and sgd.loc[fa, "p_b_ci_high"] == (
        pytest.approx(hi))
    assert set(sgd["training_set"]) == {"|S| = 8, data seed 0"}
    adam = t[t.optimizer == "adam"].set_index("function")
    assert adam.loc[[fa, fb], "p_sgd"].tolist() == [0.5, 0.5] and set(adam["n_sgd"]) == {4}
    s = psgd_summary(t, n_boot=0).set_index("optimizer")
    assert s.loc["sgd", ["functions_sgd", "functions_sampled", "functions_both"]].tolist() == [
        3, 3, 2]
    assert s.loc["sgd", "sgd_mass_sampled"] == pytest.approx(0.9)
    assert s.loc["sgd", "posterior_mass_sgd"] == pytest.approx(6 / 7)
    # two points: a correlation needs three
    assert np.isnan(s.loc["sgd", "kendall"])
    # only the runs' functions listed: the posterior's size and mass are unchanged
    t0 = psgd_table(df, prior, top_sampled=0)
    assert set(t0[t0.optimizer == "sgd"]["function"]) == {fa, fb, fc}
    s0 = psgd_summary(t0, n_boot=0).set_index("optimizer")
    assert s0.equals(s)


def test_psgd_summary_correlation_is_that_of_the_log_frequencies():
    df, prior, _ = _synthetic_runs()
    fs = [f for f in prior.table()["function"]]
    from flatprior.prior import function_bits

    fits = ["".join(map(str, function_bits(h, 7))) for h in fs]
    idx, lab = boolean_training_set(df.iloc[0].to_dict())
    fits = [f for f in fits if all(f[i] == str(y) for i, y in zip(idx, lab, strict=True))]
    rows = [{**df.iloc[0].to_dict(), "seed": s, "function": f}
            for s, f in enumerate([fits[0]] * 5 + [fits[1]] * 2 + [fits[2]] * 1)]
    t = psgd_table(pd.DataFrame(rows), prior)
    s = psgd_summary(t, n_boot=0).iloc[0]
    both = t[(t.sgd_count > 0) & (t.sampled_count > 0)]
    from scipy import stats

    r = stats.pearsonr(np.log10(both.p_b), np.log10(both.p_sgd)).statistic
    assert s["functions_both"] == 3 and s["pearson_log10"] == pytest.approx(r)


def test_boolean_training_set_is_the_runs_s_and_flipped_a():
    row = {"n_train": 10, "n_attack": 5, "n_test": 20, "data_seed": None, "seed": 4,
           "boolean_target": None}
    idx, lab = boolean_training_set(row)
    task = make_task("boolean", 10, 5, 20, 4)
    assert idx.tolist() == [*task.idx_train.tolist(), *task.idx_attack.tolist()]
    x = (np.arange(128)[:, None] >> np.arange(6, -1, -1)) & 1
    maj = (x.sum(1) >= 4).astype(int)
    assert lab[:10].tolist() == maj[task.idx_train].tolist()
    assert lab[10:].tolist() == (1 - maj[task.idx_attack]).tolist()


def test_prior_agreement_pairs():
    bt = pd.DataFrame({
        "log_p_sampled": [-1.0, -2.0, -3.0, np.nan],
        "log_p_sampled_ci_low": [-1.1, -2.1, -3.1, -np.inf],
        "log_p_sampled_ci_high": [-0.9, -1.9, -2.9, -10.0],
        "log_p_tilting": [-1.05, -2.5, -3.0, -12.0],
        "log_p_tilting_ci_low": [-1.08, -2.6, -3.05, -12.1],
        "log_p_tilting_ci_high": [-1.02, -2.4, -2.95, -11.9],
        "log_prior": [-1.5, -2.0, -4.0, -12.5]})
    a = prior_agreement(bt, n_boot=0).set_index(["a", "b"])
    st = a.loc[("sampling", "tilting")]
    assert st["n"] == 3 and st["median_abs_d"] == pytest.approx(0.05)
    assert st["max_abs_d"] == pytest.approx(0.5) and st["ci_overlap"] == pytest.approx(2 / 3)
    se = a.loc[("sampling", "EP")]
    assert se["median_d"] == pytest.approx(0.5) and np.isnan(se["ci_overlap"])
    assert a.loc[("tilting", "EP"), "n"] == 4 and a.loc[("tilting", "EP"), "kendall"] == (
        pytest.approx(1.0))


def test_boolean_prior_for_chunks_files_and_mismatch(tmp_path, monkeypatch):
    from flatprior.analysis import report
    from flatprior.config import RunConfig

    cfg = RunConfig(dataset="boolean", model="fcn", hidden=[5], n_train=8, sigma_w2=2.0,
                    sigma_b2=0.25)
    monkeypatch.setattr(report, "PRIOR_CHUNK", 1500)  # 4000 networks = 3 chunks
    p = report.boolean_prior_for(cfg, samples=4000, seed=7, progress=False)
    assert p.n_samples == 4000 and len(p.seeds) == 3 and len(set(p.seeds)) == 3
    assert (tuple(p.widths), p.sigma_w2, p.sigma_b2) == ((7, 5, 1), 2.0, 0.25)
    # the chunks are sample_boolean_prior draws with the derived seeds
    ref = BooleanPrior.combine([
        sample_boolean_prior(n, (7, 5, 1), 2.0, 0.25, seed=s)
        for n, s in zip([1500, 1500, 1000], report._chunk_seeds(7, 3), strict=True)])
    assert p.table().equals(ref.table())
    p.save(tmp_path / "a.npz")
    both = report.boolean_prior_for(cfg, samples=1000, files=[tmp_path / "a.npz"], seed=8)
    assert both.n_samples == 5000
    with pytest.raises(FlatpriorError, match="same seed"):
        report.boolean_prior_for(cfg, samples=1000, files=[tmp_path / "a.npz"], seed=7)
    with pytest.raises(FlatpriorError, match="sampled for FCN"):
        report.boolean_prior_for(cfg.model_copy(update={"hidden": (6,)}),
                                 files=[tmp_path / "a.npz"])
    with pytest.raises(FlatpriorError, match="no sampled prior"):
        report.boolean_prior_for(cfg)
    # a report's sections share one sample of the same network (other run fields differ)
    cache = {}
    one = report.boolean_prior_for(cfg, samples=500, seed=9, cache=cache)
    two = report.boolean_prior_for(cfg.model_copy(update={"n_train": 4, "seed": 3}),
                                   samples=500, seed=9, cache=cache)
    assert one is two and len(cache) == 1


def test_boolean_prior_for_and_tilting_over_dask_equal_the_local_results(monkeypatch):
    distributed = pytest.importorskip("dask.distributed")
    from flatprior.analysis import report
    from flatprior.config import RunConfig

    cfg = RunConfig(dataset="boolean", model="fcn", hidden=[5], n_train=8, sigma_w2=1.0,
                    sigma_b2=1.0)
    monkeypatch.setattr(report, "PRIOR_CHUNK", 1000)
    local = report.boolean_prior_for(cfg, samples=2500, seed=3)
    bt = pd.DataFrame({"function": ["0" * 128, "1" * 128]})
    # worker processes: the chunk and tilting jobs are pickled as a cluster would ship them
    with distributed.LocalCluster(n_workers=1, processes=True, threads_per_worker=2,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            remote = report.boolean_prior_for(cfg, samples=2500, seed=3, scheduler=client)
            tilt = report.boolean_tilting(bt, cfg, top=2, seed=1, scheduler=client)
    assert remote.table().equals(local.table()) and remote.seeds == local.seeds
    here = report.boolean_tilting(bt, cfg, top=2, seed=1)
    # the estimate is a function of the seed, not of the thread count
    assert tilt["log_p_tilting"].tolist() == pytest.approx(here["log_p_tilting"].tolist(),
                                                           rel=1e-12)
    assert (tilt["log_p_tilting_ci_low"] < tilt["log_p_tilting"]).all()


def test_local_tilting_pool_equals_one_process():
    # >= 16 functions go to a process pool (one estimate per core); values are the seed's
    from flatprior.analysis import report

    x = np.random.default_rng(0).normal(size=(12, 3))
    K = x @ x.T / 3 + 0.5 * np.eye(12)
    labels = [np.random.default_rng(i).integers(0, 2, 12) for i in range(16)]
    pooled = report._tilting_local(K, labels, seed=4)
    alone = [report._tilting_one(K, y, 4, 1) for y in labels]
    assert pooled == alone
