"""`flatprior claims`: verdict rules as pure functions of stored rows, on synthetic stores whose
truth is known by construction, bad databases, and the quick presets end to end."""

import hashlib
import json
import sqlite3

import numpy as np
import pandas as pd
import pytest

from flatprior.analysis import claims as C
from flatprior.experiments.store import Store

RNG = np.random.default_rng(0)


def _attack_rows(optimizer, n_attacks=(0, 100, 200, 300, 400), seeds=(0, 1, 2), *,
                 prior="tight", sharp="tight", dataset="mnist"):
    rows = []
    for a in n_attacks:
        for s in seeds:
            err = 0.05 + a / 1000 + 0.01 * RNG.random()
            rows.append({
                "key": f"{dataset}-{optimizer}-{a}-{s}", "status": "zero_error",
                "optimizer": optimizer,
                "dataset": dataset, "model": "fcn", "n_train": 500, "n_test": 1000,
                "n_attack": a, "seed": s, "overtrain_epochs": 0, "analysis": "attack",
                "test_error": err,
                "log_prior": (-1000 * err if prior == "tight" else -300 + 50 * RNG.random()),
                "sharpness": (np.exp(5 * err) if sharp == "tight" else RNG.random()),
            })
    return rows


def test_log_prior_claim_holds_fails_and_needs_runs():
    good = pd.DataFrame(_attack_rows("sgd"))
    [c] = C.claim_log_prior(C.attack_runs(good), n_boot=200, seed=0)
    assert c.verdict == C.HOLDS and c.value < -0.9 and c.ci_high < 0 and c.n == 15
    bad = pd.DataFrame(_attack_rows("adam", prior="noise"))
    [c] = C.claim_log_prior(C.attack_runs(bad), n_boot=200, seed=0)
    assert c.verdict == C.FAILS and c.ci_high >= 0
    few = pd.DataFrame(_attack_rows("sgd", n_attacks=(0, 100), seeds=(0, 1)))
    [c] = C.claim_log_prior(C.attack_runs(few), n_boot=200, seed=0)
    assert c.verdict == C.TOO_FEW and "need >= 10" in c.detail and "fig" in c.detail


def test_sharpness_contrast_paired_bootstrap():
    df = pd.DataFrame(_attack_rows("sgd") + _attack_rows("adam", sharp="noise"))
    claims = {c.id: c for c in C.claim_sharpness(C.attack_runs(df), n_boot=300, seed=0)}
    assert claims["b/sgd"].verdict == C.HOLDS
    contrast = claims["b/sgd-vs-adam"]
    assert contrast.verdict == C.HOLDS and contrast.n == 15 and contrast.ci_low > 0
    # the same tight relation for both optimizers: no contrast
    df2 = pd.DataFrame(_attack_rows("sgd") + _attack_rows("adam"))
    c2 = {c.id: c for c in C.claim_sharpness(C.attack_runs(df2), n_boot=300, seed=0)}
    assert c2["b/sgd-vs-adam"].verdict == C.FAILS
    assert c2["b/sgd-vs-adam"].value == pytest.approx(0.0, abs=1e-12)


def test_attack_claims_do_not_pool_systems_and_ignore_row_order():
    df = pd.DataFrame(_attack_rows("sgd") + _attack_rows("sgd", dataset="digits"))
    ids = [c.id for c in C.attack_claims(df, n_boot=200, seed=0)]
    assert any("digits" in i for i in ids) and any("mnist" in i for i in ids)
    shuffled = df.sample(frac=1.0, random_state=3)
    a = [c.to_json() for c in C.attack_claims(df, n_boot=200, seed=0)]
    b = [c.to_json() for c in C.attack_claims(shuffled, n_boot=200, seed=0)]
    assert a == b


def _alpha_record(key, alpha, ratio, *, same=True, d_lp=0.0, leaves=False):
    hist = [{"epoch": e, "train_acc": 1.0, "test_acc": 0.9, "phase": "overtrain"}
            for e in range(1, 30)]
    hist[0].update(sharpness_lbfgsb=1.0, log_prior=-100.0)
    hist[9].update(alpha_scaled=True, alpha_same_function=same,
                   before_alpha={"sharpness_lbfgsb": 0.5, "log_prior": -90.0},
                   sharpness_lbfgsb=0.5 * ratio, log_prior=-90.0 + d_lp)
    hist[-1].update(sharpness_lbfgsb=0.6, log_prior=-90.0)
    if leaves:
        hist[15]["train_acc"] = 0.99
    return {"key": key, "status": "zero_error", "epochs_to_zero_error": 1,
            "config": {"alpha": alpha, "alpha_layer": 0}, "history": hist}


def test_alpha_claim_rules():
    holds = C.claim_alpha([_alpha_record("k1", 0.2, 18.0), _alpha_record("k2", 0.2, 25.0)])
    assert [c.verdict for c in holds] == [C.HOLDS] and holds[0].value == pytest.approx(21.5)
    small = C.claim_alpha([_alpha_record("k1", 5.0, 0.7)])
    assert small[0].verdict == C.FAILS
    changed = C.claim_alpha([_alpha_record("k1", 0.2, 18.0, d_lp=1e-3)])
    assert changed[0].verdict == C.FAILS
    other_f = C.claim_alpha([_alpha_record("k1", 0.2, 18.0, same=False)])
    assert other_f[0].verdict == C.FAILS
    left = C.claim_alpha([_alpha_record("k1", 0.2, 18.0, leaves=True)])
    assert left[0].verdict == C.PRECONDITION and "1/1" in left[0].detail
    assert C.claim_alpha([])[0].verdict == C.TOO_FEW


def test_overtraining_claim_from_pairs():
    rows = []
    for s in range(8):
        for ot, sharp, lp in ((0, 1.0 + 0.1 * s, -100.0 - s), (1000, 0.3 + 0.01 * s, -100.2 - s)):
            rows.append({"key": f"{s}-{ot}", "status": "zero_error", "optimizer": "sgd",
                         "dataset": "mnist", "n_train": 500, "n_attack": 0, "seed": s,
                         "overtrain_epochs": ot, "sharpness": sharp, "log_prior": lp,
                         "test_error": 0.1})
    [c] = C.claim_overtraining(pd.DataFrame(rows), [], n_boot=300, seed=0)
    assert c.verdict == C.HOLDS and c.n == 8 and c.ci_high < 1
    assert "median |d log P| 0.2" in c.detail
    # single runs beside the pairs (a Boolean sweep: 1e5 of them) change nothing
    singles = [{**rows[0], "key": f"single{s}", "seed": 100 + s} for s in range(50)]
    [c2] = C.claim_overtraining(pd.DataFrame(rows + singles), [], n_boot=300, seed=0)
    assert (c2.verdict, c2.n, c2.value, c2.ci_low) == (c.verdict, c.n, c.value, c.ci_low)
    rows_few = [r for r in rows if r["seed"] < 2]
    [c] = C.claim_overtraining(pd.DataFrame(rows_few), [], n_boot=100, seed=0)
    assert c.verdict == C.TOO_FEW


def test_ep_accuracy_claim():
    rows = []
    for s in range(6):
        for method, shift in (("ep", 0.0), ("tilting", 0.2)):
            rows.append({"key": f"{s}-{method}", "status": "zero_error", "prior_method": method,
                         "dataset": "mnist", "n_train": 500, "n_attack": 50 * s, "seed": 0,
                         "optimizer": "sgd", "log_prior": -100.0 * (s + 1) + shift})
    [c] = C.claim_ep_accuracy(pd.DataFrame(rows))
    assert c.verdict == C.HOLDS and c.value == pytest.approx(0.2) and c.n == 6
    assert C.claim_ep_accuracy(pd.DataFrame(rows[:4]))[0].verdict == C.TOO_FEW


def test_boolean_claim():
    rows = []
    for i in range(40):
        f = format(i % 12, "0128b")
        lp = -10.0 - (i % 12)
        rows.append({"key": f"b{i}", "status": "zero_error", "dataset": "boolean",
                     "function": f, "log_prior": lp, "sharpness": 1.0 - lp / 10,
                     "test_error": 0.1})
    [c] = C.claim_boolean(pd.DataFrame(rows), top=1000, n_boot=200, seed=0)
    assert c.verdict == C.HOLDS and c.n == 12 and c.value == pytest.approx(-1.0)


# -- stores and the CLI ---------------------------------------------------------------------------
def _store_with(path, records, label="fig4@paper", analysis="attack"):
    with Store(path) as st:
        st.set_spec(label, {"label": label, "analysis": analysis})
        for r in records:
            st.put({**r, "config": {k: r[k] for k in ("optimizer", "n_attack", "seed")
                                     if k in r}}, label)
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_claims_cli_on_synthetic_store(tmp_path, cli):
    db = _store_with(tmp_path / "r.db", _attack_rows("sgd") + _attack_rows("adam", sharp="noise"))
    before = _sha(db)
    r = cli("claims", db, "--json", "--n-boot", "200")
    assert r.returncode in (0, None), r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    by = {d["id"].split(" ")[0]: d for d in lines}
    assert by["a/sgd"]["verdict"] == "holds" and by["b/sgd-vs-adam"]["verdict"] == "holds"
    assert by["c"]["verdict"] == "not enough runs" and "fig5" in by["c"]["detail"]
    assert by["d"]["verdict"] == "not enough runs" and "fig2-boolean" in by["d"]["detail"]
    assert all(set(d) >= {"claim", "statistic", "value", "ci_low", "ci_high", "rule", "verdict"}
               for d in lines)
    r = cli("claims", db, "--n-boot", "200")
    assert r.returncode in (0, None) and "holds" in r.stdout
    assert _sha(db) == before  # claims writes nothing into the database


@pytest.mark.parametrize("case", ["empty", "foreign", "corrupt", "failed", "never", "missing"])
def test_claims_bad_databases_one_line_exit_2(tmp_path, cli, case):
    db = tmp_path / "r.db"
    if case == "empty":
        Store(db).close()
    elif case == "foreign":
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE t(x)")
        con.commit()
        con.close()
    elif case == "corrupt":
        db.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)
    elif case == "failed":
        _store_with(db, [{"key": "k", "status": "failed", "optimizer": "sgd", "n_attack": 0,
                          "seed": 0, "error": "boom"}])
    elif case == "never":
        _store_with(db, [{"key": "k", "status": "did_not_reach_zero_error", "optimizer": "sgd",
                          "n_attack": 0, "seed": 0}])
    before = _sha(db) if db.exists() else None
    r = cli("claims", db)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    expected = {"empty": "no runs", "foreign": "not a flatprior", "corrupt": "not a",
                "failed": "failed", "never": "zero training error", "missing": "no results"}
    assert expected[case] in r.stderr
    if before is not None:
        assert _sha(db) == before


def test_claims_end_to_end_on_quick_presets(tmp_path, cli):
    db = tmp_path / "q.db"
    r = cli("run", "fig3", "--preset", "quick", "--set", "seed=[0]", "--set", "n_train=100",
            "--set", "n_test=100", "--set", "n_attack=[0,50,100]", "--out", db, "--workers", "1")
    assert r.returncode in (0, None), r.stderr
    r = cli("run", "fig5", "--preset", "quick", "--set", "alpha=0.2", "--set", "n_train=100",
            "--set", "n_test=100", "--set", "overtrain_epochs=10", "--set", "alpha_epoch=5",
            "--set", "measure_every=5", "--set", "epoch_measures=sharpness_lbfgsb,log_prior",
            "--out", db, "--workers", "1")
    assert r.returncode in (0, None), r.stderr
    r = cli("claims", db, "--json", "--n-boot", "100")
    assert r.returncode in (0, None), r.stderr
    by = {d["id"].split(" ")[0]: d for d in map(json.loads, r.stdout.strip().splitlines())}
    assert by["a/sgd"]["verdict"] == "not enough runs" and by["a/sgd"]["n"] == 3
    c = next(d for k, d in by.items() if k.startswith("c/"))
    assert c["verdict"] in ("holds", "does not hold", "precondition failed")
    assert c["value"] > 0 and "identical f in 1/1" in c["detail"]


def test_claims_from_a_reports_frames_equal_those_read_from_the_store(tmp_path):
    db = _store_with(tmp_path / "r.db", _attack_rows("sgd") + _attack_rows("adam", sharp="noise"))
    with Store(db, readonly=True) as st:
        read = C.evaluate_claims(st, n_boot=100, seed=1)
        given = C.evaluate_claims(st, n_boot=100, seed=1,
                                  frames={"fig4@paper": st.to_frame(spec="fig4@paper")})
    assert C.claims_json(read) == C.claims_json(given)


def test_store_versions_are_the_distinct_versions_of_the_records(tmp_path):
    db = tmp_path / "v.db"
    with Store(db) as st:
        st.set_spec("s", {"label": "s"})
        for i, v in enumerate([{"torch": "2.13.0"}, {"torch": "2.13.0"}, {"torch": "2.14.1"}]):
            st.put({"key": f"k{i}", "status": "done", "versions": v}, "s")
        st.put({"key": "k9", "status": "done"}, "s")  # no versions field
        got = sorted(json.dumps(v, sort_keys=True) for v in st.versions())
        assert got == ['{"torch": "2.13.0"}', '{"torch": "2.14.1"}']


def test_report_opens_with_the_claims(tmp_path):
    from flatprior.analysis import write_report

    db = _store_with(tmp_path / "r.db", _attack_rows("sgd") + _attack_rows("adam", sharp="noise"))
    path, _ = write_report(db, tmp_path / "rep.html", n_boot=100)
    page = path.read_text()
    assert page.index("The study's claims") < page.index("fig4@paper")
    assert "b/sgd-vs-adam" in page and "not enough runs" in page
