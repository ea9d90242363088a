import json
import sqlite3

import pytest

import _fake_runs
from flatprior.errors import FlatpriorError
from flatprior.experiments.runner import import_run_fn, preflight, run_sweep
from flatprior.experiments.specs import resolve
from flatprior.experiments.store import Store


def configs(n_seeds=3, attacks=(0, 50)):
    return resolve("fig3", "quick", "mnist-fcn",
                   {"seed": list(range(n_seeds)), "n_attack": list(attacks)}).configs


def test_in_process_runs_skips_and_records_failures(tmp_path, monkeypatch):
    cfgs = configs(4)
    seen = []
    with Store(tmp_path / "r.db") as st:
        s = run_sweep(cfgs, st, "t", run_fn=_fake_runs.flaky_run, workers=1, progress=False,
                      on_record=seen.append)
        assert (s.total, s.skipped, s.done, s.failed) == (8, 0, 8, 4)
        rows = {r["key"]: r for r in st.records()}
        assert set(rows) == {c.key() for c in cfgs}
        failed = [r for r in rows.values() if r["status"] == "failed"]
        assert len(failed) == 4
        assert all("synthetic failure for seed" in r["error"] for r in failed)
        assert all(r["config"]["seed"] % 2 == 1 for r in failed)
        ok = [r for r in rows.values() if r["status"] == "zero_error"]
        assert all(r == {**_fake_runs.fake_record(r["config"]), "created": r["created"]}
                   for r in ok)
        # re-run: everything is stored (failed included) -> nothing runs
        s2 = run_sweep(cfgs, st, "t", run_fn=_fake_runs.flaky_run, workers=1, progress=False)
        assert (s2.skipped, s2.done) == (8, 0)
        # --retry-failed re-runs exactly the failed keys
        monkeypatch.setenv("FAKE_RUN_HEAL", "1")
        s3 = run_sweep(cfgs, st, "t", run_fn=_fake_runs.flaky_run, workers=1, progress=False,
                       retry_failed=True)
        assert (s3.skipped, s3.done, s3.failed) == (4, 4, 0)
        assert set(st.statuses().values()) == {"zero_error"} and st.count() == 8
        # a second spec label sharing the runs lists them without re-running
        s4 = run_sweep(cfgs[:2], st, "other", run_fn=_fake_runs.flaky_run, workers=1,
                       progress=False)
        assert s4.done == 0 and len(list(st.records(spec="other"))) == 2
    assert len(seen) == 8


def test_process_pool_matches_in_process(tmp_path):
    cfgs = configs(3)
    with Store(tmp_path / "a.db") as a, Store(tmp_path / "b.db") as b:
        run_sweep(cfgs, a, "t", run_fn=_fake_runs.fake_record, workers=1, progress=False)
        s = run_sweep(cfgs, b, "t", run_fn=_fake_runs.fake_record, workers=2, progress=False)
        assert s.done == 6 and s.failed == 0

        def strip(st):
            return {r["key"]: {k: v for k, v in r.items() if k != "created"}
                    for r in st.records()}

        assert strip(a) == strip(b)


def test_nan_in_a_record_is_stored_as_null(tmp_path):
    with Store(tmp_path / "r.db") as st:
        run_sweep(configs(1, (0,)), st, "t", run_fn=_fake_runs.nan_run, workers=1,
                  progress=False)
        r = next(st.records())
        assert r["sharpness"] is None and r["extra"] == [1.0, None]


def test_run_fn_import_and_preflight():
    assert import_run_fn("_fake_runs:fake_record") is _fake_runs.fake_record
    with pytest.raises(FlatpriorError, match="module:function"):
        import_run_fn("nocolon")
    with pytest.raises(FlatpriorError, match="cannot import"):
        import_run_fn("_fake_runs:nope")
    with pytest.raises(FlatpriorError, match="largest possible n_attack is 597"):
        preflight(resolve("fig3", "quick", "mnist-fcn", {"n_attack": [0, 1500]}).configs)
    with pytest.raises(FlatpriorError, match="model='fcn'"):
        preflight(resolve("fig3", "quick", "mnist-fcn", {"model": "cnn"}).configs)
    with pytest.raises(FlatpriorError, match="MNIST files not found"):
        preflight(resolve("fig3", "quick", "mnist-fcn",
                          {"dataset": "mnist", "data_root": "/nonexistent"}).configs)


def test_real_pipeline_runs_into_the_store(tmp_path):
    """Two tiny real runs (training + sharpness + log P(f)) through the runner."""
    cfgs = resolve("fig3", "quick", "mnist-fcn", {
        "n_train": 30, "n_test": 30, "n_attack": [0, 10], "seed": 0, "batch_size": 10,
        "sharpness_epochs": 1}).configs
    with Store(tmp_path / "r.db") as st:
        s = run_sweep(cfgs, st, "t", workers=1, progress=False)
        assert s.failed == 0, [r.get("error") for r in st.records()]
        df = st.to_frame()
    assert set(df["status"]) == {"zero_error"}
    assert df["log_prior"].lt(0).all() and df["sharpness"].notna().all()
    assert sorted(df["n_attack"]) == [0, 10]
    assert set(df["key"]) == {c.key() for c in cfgs}


def test_dask_local_cluster(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    cfgs = configs(2)
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster:
        with Store(tmp_path / "r.db") as st:
            s = run_sweep(cfgs, st, "t", run_fn=_fake_runs.flaky_run,
                          scheduler=cluster.scheduler_address, progress=False)
            assert (s.done, s.failed) == (4, 2)
            errs = [r["error"] for r in st.records() if r["status"] == "failed"]
            assert all("synthetic failure" in e for e in errs)
            s2 = run_sweep(cfgs, st, "t", run_fn=_fake_runs.flaky_run,
                           scheduler=cluster.scheduler_address, progress=False)
            assert s2.done == 0 and s2.skipped == 4
    con = sqlite3.connect(tmp_path / "r.db")
    rows = con.execute("SELECT key, record FROM runs").fetchall()
    assert len(rows) == 4 and all(json.loads(r)["key"] == k for k, r in rows)


def test_unreachable_scheduler_is_one_line_error(tmp_path):
    with Store(tmp_path / "r.db") as st, pytest.raises(FlatpriorError, match="Dask scheduler"):
        run_sweep(configs(1, (0,)), st, "t", run_fn=_fake_runs.fake_record,
                  scheduler="tcp://127.0.0.1:1", progress=False, connect_timeout=2)
