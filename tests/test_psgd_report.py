"""The psgd-boolean and sampleable fig2-boolean report sections, end to end on synthetic runs.

Synthetic runs (no training) on the specs' real S (target 0, |S| = 4) find known functions; the
sampled prior comes from `flatprior sample-prior` files or --boolean-samples. P_SGD and P_B are
checked against counts computed independently from the same prior file.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import _fake_runs
from flatprior.experiments.runner import run_sweep
from flatprior.experiments.specs import resolve
from flatprior.experiments.store import Store

ZERO = "0" * 128
FLIP = "0" * 127 + "1"  # input 127 (all bits set) -> 1


def psgd_run(cfg):
    """sgd: 0 for 2 of 3 seeds, FLIP otherwise; adam: always 0 (a failed run per optimizer)."""
    rec = _fake_runs.fake_record(cfg)
    if cfg["seed"] == 7:
        rec.update(status="max_epochs", function=FLIP)
        return rec
    rec["function"] = FLIP if cfg["optimizer"] == "sgd" and cfg["seed"] % 3 == 0 else ZERO
    return rec


def fig2_run(cfg):
    """Three near-constant functions with sharpness decreasing in their prior."""
    rec = _fake_runs.fake_record(cfg)
    k = cfg["seed"] % 3
    rec["function"] = [ZERO, FLIP, "0" * 126 + "11"][k]
    rec["sharpness"] = 0.1 * (1 + k)
    rec["spectral_norm"] = 1.0 + k
    rec["log_prior"] = [-1.4, -9.0, -11.0][k]
    return rec


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("psgd") / "r.db"
    with Store(path) as st:
        r = resolve("psgd-boolean", "quick", None, {"seed": list(range(12))})
        run_sweep(r.configs, st, r.label, info=r.info(), run_fn=psgd_run, workers=1,
                  progress=False)
        r = resolve("fig2-boolean", "quick", None, {"seed": list(range(9))})
        run_sweep(r.configs, st, r.label, info=r.info(), run_fn=fig2_run, workers=1,
                  progress=False)
    return path


def test_sample_prior_then_report(db, tmp_path, cli):
    from flatprior.prior import BooleanPrior

    f1, f2 = tmp_path / "a.npz", tmp_path / "b.npz"
    for f, seed in ((f1, 1), (f2, 2)):
        r = cli("sample-prior", "psgd-boolean", "--samples", 20_000, "--seed", seed, "--out", f)
        assert r.returncode in (0, None), r.stderr
    prior = BooleanPrior.combine([BooleanPrior.load(f1), BooleanPrior.load(f2)])
    assert prior.n_samples == 40_000 and prior.widths == (7, 40, 40, 1) and prior.antithetic
    f3 = tmp_path / "independent.npz"
    r = cli("sample-prior", "psgd-boolean", "--samples", 1001, "--independent", "--out", f3)
    assert r.returncode in (0, None), r.stderr
    assert not BooleanPrior.load(f3).antithetic and BooleanPrior.load(f3).n_samples == 1001
    out = tmp_path / "rep.html"
    r = cli("report", db, "--out", out, "--n-boot", 50, "--boolean-prior", f1,
            "--boolean-prior", f2)
    assert r.returncode in (0, None), r.stderr
    page = out.read_text()
    assert "P_SGD(f) vs P_B(f | S)" in r.stdout and "P_SGD(f) vs P_B(f | S)" in page
    from flatprior.analysis.report import write_report

    _, sections = write_report(db, tmp_path / "again.html", n_boot=0,
                               prior=_options(files=(f1, f2), tilting=2))
    psgd = next(s for s in sections if s.label == "psgd-boolean@quick")
    summary = psgd.extra_tables[0][1].set_index("optimizer")
    # runs 0..11 except the failed seed 7: 11 per optimizer; sgd found FLIP for seeds 0,3,6,9
    assert summary.loc["sgd", "n_sgd"] == 11 and summary.loc["adam", "n_sgd"] == 11
    idx = np.array(_s_indices())
    fit = prior.consistent(idx, np.zeros(len(idx), dtype=int))
    assert summary.loc["sgd", "n_fit"] == int(prior.counts[fit].sum())
    top = psgd.extra_tables[1][1]
    sgd = top[top.optimizer == "sgd"].set_index("function")
    n_fit = summary.loc["sgd", "n_fit"]
    zero_hex, flip_hex = "0" * 32, "0" * 31 + "1"
    assert sgd.loc[zero_hex, "p_sgd"] == pytest.approx(7 / 11)
    assert sgd.loc[flip_hex, "p_sgd"] == pytest.approx(4 / 11)
    assert sgd.loc[zero_hex, "p_b"] == pytest.approx(prior.count_of(np.zeros(128)) / n_fit)
    assert len(psgd.figures) == 1
    # fig2: sampled (Wilson CI), tilting (CI) and EP agree in a table; panels with tau
    fig2 = next(s for s in sections if s.label.startswith("fig2-boolean"))
    agree = dict(fig2.extra_tables)
    (atab,) = [t for cap, t in agree.items() if cap.startswith("Agreement")]
    assert {(a, b) for a, b in zip(atab["a"], atab["b"], strict=True)} == {
        ("sampling", "tilting"), ("sampling", "EP"), ("tilting", "EP")}
    ft = [t for cap, t in agree.items() if "most often" in cap][0]
    assert ft["log_p_tilting"].notna().sum() == 2 and ft["log_p_tilting"].iloc[2:].isna().all()
    assert (ft["log_p_tilting_ci_low"].iloc[:2] <= ft["log_p_tilting"].iloc[:2]).all()
    z = ft.set_index("function").loc[zero_hex]
    assert z["log_p_sampled"] == pytest.approx(np.log(prior.count_of(np.zeros(128)) / 40_000))
    assert z["log_p_sampled_ci_low"] < z["log_p_sampled"] < z["log_p_sampled_ci_high"]
    c = fig2.correlations
    tau = c[(c.versus == "log_prior") & (c.measure == "sharpness") & (c.method == "kendall")]
    assert tau["estimate"].item() == pytest.approx(-1.0)
    assert len(re.findall(r"data:image/png;base64", page)) >= 2


def _options(**kw):
    from flatprior.analysis.report import PriorOptions

    return PriorOptions(**kw)


def _s_indices():
    from flatprior.data import make_task

    return make_task("boolean", 4, 0, 124, 0, target=ZERO).idx_train.tolist()


def test_psgd_without_prior_says_what_to_add(db, tmp_path, cli):
    out = tmp_path / "r.html"
    r = cli("report", db, "--out", out, "--n-boot", 0, "--boolean-samples", 0)
    assert r.returncode in (0, None), r.stderr
    assert "--boolean-samples N" in r.stderr and "--boolean-prior FILE" in out.read_text()


def test_sample_prior_bad_input_one_line(tmp_path, cli):
    for args, match in [(["fig3", "mnist-fcn"], "does not train FCNs on the Boolean cube"),
                        (["psgd-boolean", "--out", tmp_path / "x.txt"], ".npz"),
                        (["psgd-boolean", "--out", tmp_path / "no" / "x.npz"], "folder"),
                        (["psgd-boolean", "--samples", 0, "--out", tmp_path / "x.npz"],
                         "no sampled prior"),
                        (["psgd-boolean", "--samples", 1001, "--out", tmp_path / "x.npz"],
                         "antithetic pairs: give an even number")]:
        r = cli("sample-prior", *args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr


@pytest.mark.slow  # 6 s idle, ~20 s on the loaded 2-core machine
def test_psgd_quick_preset_end_to_end(tmp_path, cli):
    """Real training: 2 x 15 runs of the quick preset (ensembles), a sampled prior, the report.

    P_SGD in the report equals the function counts of the stored records; every zero-error
    function fits S (the labels of S are 0).
    """
    db, out = tmp_path / "r.db", tmp_path / "r.html"
    r = cli("run", "psgd-boolean", "--set", "seed=[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14]",
            "--out", db, "--workers", 1, "--ensemble", "auto", "--no-progress")
    assert r.returncode in (0, None), r.stderr
    r = cli("report", db, "--out", out, "--boolean-samples", 100_000, "--n-boot", 0)
    assert r.returncode in (0, None), r.stderr
    from flatprior.analysis.report import PriorOptions, write_report

    _, secs = write_report(db, tmp_path / "b.html", n_boot=0,
                           prior=PriorOptions(samples=100_000))
    (sec,) = secs
    summary = sec.extra_tables[0][1].set_index("optimizer")
    df = sec.frame[sec.frame.status == "zero_error"]
    idx = _s_indices()
    assert all(set(f[i] for i in idx) == {"0"} for f in df["function"])
    for opt in ("sgd", "adam"):
        runs = df[df.optimizer == opt]
        assert summary.loc[opt, "n_sgd"] == len(runs) >= 10
        assert summary.loc[opt, "functions_sgd"] == runs["function"].nunique()
    # the constant-0 function dominates both the runs and the posterior (P ~ 0.36)
    top = sec.extra_tables[1][1]
    assert (top.groupby("optimizer").head(1)["function"] == "0" * 32).all()


@pytest.mark.slow  # 4 s idle, ~30 s on the loaded 2-core machine
def test_fig2_sampleable_quick_preset_end_to_end(tmp_path, cli):
    """Real training (10 runs), 100 000 sampled networks, tilting for the 2 most frequent.

    The constant-0 function is found (S's labels are 0); its sampled log P and its tilting
    estimate (the NNGP of the width-40 network) agree to 0.1 nat (measured: -1.010 vs -1.022).
    """
    db = tmp_path / "r.db"
    r = cli("run", "fig2-boolean", "--set", "seed=[0,1,2,3,4,5,6,7,8,9]", "--out", db,
            "--workers", 1, "--ensemble", "auto", "--no-progress")
    assert r.returncode in (0, None), r.stderr
    from flatprior.analysis.report import PriorOptions, write_report

    _, (sec,) = write_report(db, tmp_path / "r.html", n_boot=100,
                             prior=PriorOptions(samples=100_000, tilting=2))
    tables = dict(sec.extra_tables)
    ft = [t for cap, t in tables.items() if "most often" in cap][0].set_index("function")
    z = ft.loc["0" * 32]
    assert abs(z["log_p_sampled"] - z["log_p_tilting"]) < 0.1
    assert z["log_p_sampled_ci_low"] < z["log_p_sampled"] < z["log_p_sampled_ci_high"]
    (agree,) = [t for cap, t in tables.items() if cap.startswith("Agreement")]
    assert set(zip(agree["a"], agree["b"], strict=True)) == {
        ("sampling", "tilting"), ("sampling", "EP"), ("tilting", "EP")}
    assert len(sec.figures) == 1


def test_report_that_draws_many_networks_tells_how_to_save_the_same_draws(
        db, tmp_path, cli, monkeypatch):
    import shlex

    from flatprior.analysis import report as rep
    from flatprior.prior import BooleanPrior

    monkeypatch.setattr(rep, "SAVE_PRIOR_TIP_FROM", 4000)  # 1e7 in real use
    r = cli("report", db, "--out", tmp_path / "r.html", "--n-boot", 0,
            "--boolean-samples", 4000)
    assert r.returncode in (0, None), r.stderr
    text = " ".join(r.stderr.split())
    tips = re.findall(r"tip: this report drew 4,000 random networks.*?`(flatprior sample-prior"
                      r"[^`]*)`", text)
    assert len(tips) == 1, text  # both Boolean specs train one network: one sample, one tip
    args = shlex.split(tips[0])[1:]
    args[args.index("--out") + 1] = str(tmp_path / "prior.npz")
    s = cli(*args)
    assert s.returncode in (0, None), s.stderr
    saved = BooleanPrior.load(tmp_path / "prior.npz")
    drawn = rep.boolean_prior_for(resolve("psgd-boolean", "quick", None).configs[0],
                                  samples=4000, seed=0)  # what the report drew
    assert saved.n_samples == drawn.n_samples == 4000
    assert np.array_equal(saved.keys, drawn.keys) and np.array_equal(saved.counts, drawn.counts)
    # below the threshold, or from files: no tip
    r = cli("report", db, "--out", tmp_path / "r2.html", "--n-boot", 0,
            "--boolean-prior", tmp_path / "prior.npz")
    assert r.returncode in (0, None) and "tip:" not in r.stderr
