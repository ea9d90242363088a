"""Ensembles in the runner: same records as the per-run path, grouping, fallback, resume."""

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from flatprior.experiments.ensemble import group_key, plan, why_not_ensemble
from flatprior.experiments.runner import run_sweep
from flatprior.experiments.specs import resolve
from flatprior.experiments.store import Store
from flatprior.flatness import hessian_spectral_norm, keskar_sharpness
from flatprior.flatness.batched import batched_hessian_spectral_norm, batched_keskar_sharpness
from flatprior.models import make_model
from flatprior.pipeline import make_config
from flatprior.prior import log_prior
from flatprior.prior.api import log_prior_distinct

BOOL = {"batch_size": 8, "max_epochs": 300, "sharpness_epochs": 4, "lr": 0.01,
        "measures": ["sharpness", "spectral_norm", "log_prior", "pac_bayes"]}
TIMES = ("train_time_s", "wall_time_s", "versions", "created")


def boolean_configs(seeds, **extra):
    return resolve("fig2-boolean", "quick", None, {**BOOL, "seed": list(seeds), **extra}).configs


def _close(a, b, rel):
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
    return a == b


def test_sweep_records_equal_per_run_path(tmp_path):
    cfgs = boolean_configs(range(3))
    with Store(tmp_path / "off.db") as a, Store(tmp_path / "auto.db") as b:
        run_sweep(cfgs, a, "t", workers=1, progress=False, ensemble="off")
        s = run_sweep(cfgs, b, "t", workers=1, progress=False, ensemble="auto")
        assert (s.done, s.failed) == (3, 0)
        off = {r["key"]: r for r in a.records()}
        auto = {r["key"]: r for r in b.records()}
    assert set(off) == set(auto) == {c.key() for c in cfgs}
    for k, r in off.items():
        e = auto[k]
        assert set(e) == set(r)  # identical fields
        # provenance: which path ran it (one work item of 3 members here)
        assert (r["executed_as"], r["ensemble_size"]) == ("single", 1)
        assert (e["executed_as"], e["ensemble_size"]) == ("ensemble", 3)
        for f in r:
            if f in TIMES or f.endswith("_time_s") or f in ("executed_as", "ensemble_size"):
                continue
            if f == "history":
                assert len(e[f]) == len(r[f])
                for ha, hb in zip(r[f], e[f], strict=True):
                    assert set(ha) == set(hb)
                    assert _close(ha["train_loss"], hb["train_loss"], 1e-5)
                    assert ha["train_acc"] == hb["train_acc"]
            else:
                # the nets themselves agree to float32 training rounding (~1e-7); sharpness is a
                # small difference of losses and amplifies that (measures on the SAME nets agree
                # to 1e-6: test_batched_measures_equal_single_network_measures)
                rel = 1e-4 if f in ("sharpness", "spectral_norm") else 1e-6
                assert _close(r[f], e[f], rel), f


def test_plan_groups_compatible_runs_and_falls_back():
    cfgs = boolean_configs(range(6))
    todo = [(c.key(), c) for c in cfgs]
    items = plan(todo, parallel=2)
    assert sorted(len(i) for i in items) == [3, 3]  # one group, split for 2 workers
    assert [k for i in items for k, _ in i] == [k for k, _ in todo]
    assert len({group_key(c) for c in cfgs}) == 1
    # a different optimizer setting is another group; unsupported options run alone
    other = boolean_configs(range(2), lr=0.02)
    cnn = make_config(dataset="digits", model="cnn", seed=0)
    assert why_not_ensemble(cnn) is not None
    epochs = make_config(dataset="digits", seed=0, measure_every=5)
    alpha = make_config(dataset="digits", seed=0, alpha_epoch=3)
    esgd = make_config(dataset="digits", seed=0, optimizer="entropy-sgd")
    trace = make_config(dataset="digits", seed=0, measures=("trace",))
    for c in (epochs, alpha, esgd, trace):
        assert why_not_ensemble(c) is not None and group_key(c) is None
    todo2 = [(c.key(), c) for c in [*cfgs, *other, cnn, epochs, alpha, esgd, trace]]
    sizes = sorted(len(i) for i in plan(todo2, parallel=1))
    assert sizes == [1, 1, 1, 1, 1, 2, 6]
    assert sorted(len(i) for i in plan(todo, parallel=1, max_size=4)) == [3, 3]


def test_bad_ensemble_option_is_one_line(tmp_path):
    from flatprior.errors import FlatpriorError

    with Store(tmp_path / "r.db") as st, pytest.raises(FlatpriorError, match="auto or off"):
        run_sweep(boolean_configs([0]), st, "t", ensemble="yes", progress=False)


def test_batched_measures_equal_single_network_measures():
    from flatprior.data import make_task

    tasks = [make_task("digits", 40 + 10 * i, 0, 10, i) for i in range(3)]
    models = [make_model("fcn", tasks[0].input_shape, hidden=(12, 8), seed=i) for i in range(3)]
    xs, ys = [t.x_train for t in tasks], [t.y_train for t in tasks]
    bs = batched_keskar_sharpness(models, xs, ys, 1e-3, batch_size=16, epochs=6, patience=2,
                                  seeds=[4, 5, 6])
    bh = batched_hessian_spectral_norm(models, xs, ys, seeds=[1, 2, 3])
    for i, (m, x, y) in enumerate(zip(models, xs, ys, strict=True)):
        ref = keskar_sharpness(m, nn.BCEWithLogitsLoss(), x, y.reshape(-1, 1), 1e-3, "sgd",
                               batch_size=16, epochs=6, patience=2, seed=4 + i,
                               return_details=True)
        assert bs.value[i] == pytest.approx(ref.value, rel=1e-6)
        assert bs.n_steps[i] == ref.n_steps and bs.base_loss[i] == pytest.approx(ref.base_loss)
        sn = hessian_spectral_norm(m, nn.BCEWithLogitsLoss(), x, y.reshape(-1, 1), seed=i)
        assert float(bh[i]) == pytest.approx(sn, rel=1e-6)
    # one shared set (the vectorised path), two eval batches, patience stops members apart
    shared = batched_keskar_sharpness(models, xs[0], ys[0], 1e-3, batch_size=16, epochs=8,
                                      patience=1, tol=0.5, eval_batch_size=32, seeds=[4, 5, 6])
    for i, m in enumerate(models):
        ref = keskar_sharpness(m, nn.BCEWithLogitsLoss(), xs[0], ys[0].reshape(-1, 1), 1e-3,
                               "sgd", batch_size=16, epochs=8, patience=1, tol=0.5,
                               eval_batch_size=32, seed=4 + i, return_details=True)
        assert shared.value[i] == pytest.approx(ref.value, rel=1e-6)
        assert shared.n_steps[i] == ref.n_steps


def test_log_prior_once_per_distinct_function():
    x = torch.randn(6, 3, dtype=torch.float64)
    K = x @ x.T + torch.eye(6, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 0.]])
    res, n = log_prior_distinct(K, labels)
    assert n == 2 and res[0] is res[2]
    for r, y in zip(res, labels, strict=True):
        assert r.log_prob == pytest.approx(log_prior(K, y).log_prob, rel=1e-12)


def test_worker_log_prior_cache_reuses_values_bit_for_bit(monkeypatch):
    # a second ensemble on the same kernel estimates only functions the worker has not seen;
    # its records equal a cold computation bit for bit
    import flatprior.prior.api as api
    from flatprior.experiments import ensemble as ens

    configs = boolean_configs(range(6), measures=["log_prior"], max_epochs=60)
    calls = []
    real = api.log_prior_distinct

    def counting(K, labels, **kw):
        calls.append(len(labels))
        return real(K, labels, **kw)

    monkeypatch.setattr(api, "log_prior_distinct", counting)
    monkeypatch.setattr(ens, "_PRIOR_CACHE", ens._PriorCache(ens.LOG_PRIOR_CACHE_SIZE))
    first = ens.run_ensemble(configs[:4])
    second = ens.run_ensemble(configs)
    assert calls[0] == 4
    assert len(calls) == 1 or calls[1] < 6  # only functions of seeds 4, 5 not seen before
    monkeypatch.setattr(ens, "_PRIOR_CACHE", ens._PriorCache(0))  # cold: no reuse
    cold = ens.run_ensemble(configs)
    for a, b in zip(second, cold, strict=True):
        assert a["function"] == b["function"] and a["log_prior"] == b["log_prior"]
        assert a["log_prior_converged"] == b["log_prior_converged"]
    assert [r["log_prior"] for r in first] == [r["log_prior"] for r in second[:4]]


def _rows(db):
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute("SELECT key, created, record FROM runs").fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return []


@pytest.mark.slow
def test_sigkill_mid_ensemble_stores_members_once(tmp_path):
    """Kill the sweep after the first ensemble is stored: its members are stored whole (one
    transaction), the resumed sweep runs only the others, nothing is stored twice."""
    db = tmp_path / "r.db"
    sets = ["--set", "seed=[0,1,2,3,4,5,6,7]", "--set", "batch_size=8", "--set", "lr=0.001",
            "--set", "max_epochs=400", "--set", "sharpness_epochs=4"]
    cmd = [sys.executable, "-m", "flatprior.cli", "run", "fig2-boolean", *sets, "--workers",
           "2", "--out", str(db), "--no-progress", "--ensemble", "auto"]
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 300 and p.poll() is None and not _rows(db):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = _rows(db)
    assert len(first) in (0, 4, 8)  # whole ensembles only
    print("stored before the kill:", len(first))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    final = _rows(db)
    assert len(final) == 8 == len({k for k, _, _ in final})
    assert {(k, c) for k, c, _ in first} <= {(k, c) for k, c, _ in final}  # not re-run
    assert all(json.loads(r)["status"] == "zero_error" for _, _, r in final)


@pytest.mark.slow
def test_dask_one_task_per_ensemble(tmp_path, monkeypatch):
    distributed = pytest.importorskip("dask.distributed")
    cfgs = boolean_configs(range(4))
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster.scheduler_address) as client:
            submitted = []
            submit = client.submit

            def counting(fn, run_fn, cfgs, *a, **kw):
                submitted.append(len(cfgs))
                return submit(fn, run_fn, cfgs, *a, **kw)

            monkeypatch.setattr(client, "submit", counting)
            with Store(tmp_path / "r.db") as st:
                s = run_sweep(cfgs, st, "t", scheduler=client, workers=2, progress=False,
                              ensemble="auto")
                assert (s.done, s.failed) == (4, 0)
                recs = list(st.records())
    assert {r["key"] for r in recs} == {c.key() for c in cfgs}
    assert all(r["status"] == "zero_error" and r["sharpness"] >= 0 for r in recs)
    assert submitted == [2, 2]  # one Dask task per ensemble, not 4 single runs


@pytest.mark.slow
def test_cli_ensemble_option(tmp_path):
    base = [sys.executable, "-m", "flatprior.cli", "run", "fig2-boolean", "--set", "seed=[0,1]",
            "--set", "max_epochs=2", "--set", "measures=[]", "--workers", "1", "--no-progress",
            "--out", str(tmp_path / "r.db")]
    bad = subprocess.run([*base, "--ensemble", "sometimes"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--ensemble must be auto or off" in bad.stderr
    ok = subprocess.run([*base, "--ensemble", "off"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    again = subprocess.run(base, capture_output=True, text=True, timeout=120)  # auto: resumes
    assert again.returncode == 0 and "2 already stored" in again.stderr


def test_paper_preset_lbfgsb_sharpness_in_ensembles():
    # the paper presets store sharpness_lbfgsb beside the ascent: ensembles compute it (batched
    # L-BFGS-B), so paper-preset Boolean runs are ensemble members
    from flatprior.experiments.ensemble import run_ensemble
    from flatprior.pipeline import run

    over = {**BOOL, "measures": ["sharpness", "sharpness_lbfgsb", "log_prior"], "seed": [0, 1]}
    cfgs = resolve("fig2-boolean", "paper", None, {**over, "batch_size": 8}).configs
    assert "sharpness_lbfgsb" in resolve("fig2-boolean", "paper", None).base["measures"]
    assert why_not_ensemble(cfgs[0]) is None
    assert why_not_ensemble(cfgs[0].model_copy(update={"measures": ("trace",)})) is not None
    for c, e in zip(cfgs, run_ensemble(cfgs), strict=True):
        r = run(c)
        assert (e["function"], e["epochs_to_zero_error"]) == (r["function"],
                                                              r["epochs_to_zero_error"])
        # the same measure on nets equal to float32 training rounding (as sharpness above;
        # on the same nets: test_batched_lbfgsb_sharpness_equals_scipy_per_member)
        assert _close(e["sharpness_lbfgsb"], r["sharpness_lbfgsb"], 1e-4)
        assert e["sharpness_lbfgsb_time_s"] > 0


@pytest.mark.parametrize(("patience", "tol", "epochs"), [(10, 1e-4, 30), (1, 1e-3, 30)])
def test_batched_sharpness_whole_set_path_equals_single_network(patience, tol, epochs):
    # Boolean system: |S| = 64 <= batch 128, one step per epoch (the fused-forward path);
    # members with their own sets of one size, and one shared set; patience stops them apart
    from flatprior.data import make_task

    tasks = [make_task("boolean", 64, 0, 64, seed) for seed in range(3)]
    models = [make_model("fcn", (7,), hidden=(40, 40), seed=i) for i in range(4)]
    for sets in ([t.x_train for t in tasks] + [tasks[0].x_train],
                 [tasks[0].x_train] * 4):
        ys = [next(t.y_train for t in tasks if t.x_train is x) for x in sets]
        bs = batched_keskar_sharpness(models, sets, ys, 1e-3, lr=0.05, epochs=epochs,
                                      patience=patience, tol=tol, seeds=[4, 5, 6, 7])
        for i, m in enumerate(models):
            ref = keskar_sharpness(m, nn.BCEWithLogitsLoss(), sets[i], ys[i].reshape(-1, 1),
                                   1e-3, "sgd", lr=0.05, epochs=epochs, patience=patience,
                                   tol=tol, seed=4 + i, return_details=True)
            assert bs.value[i] == pytest.approx(ref.value, rel=1e-6)
            assert bs.n_steps[i] == ref.n_steps
            assert bs.base_loss[i] == pytest.approx(ref.base_loss, rel=1e-12)
        if patience == 1:
            assert len(set(bs.n_steps)) > 1  # members stopped at different epochs
        # the written-out FCN gradient (fcn_bce_and_grads) is autograd's: the same bits
        import flatprior.flatness.batched as batched_mod

        mp = pytest.MonkeyPatch()
        mp.setattr(batched_mod, "fcn_forward", object())  # -> the autograd branch
        try:
            auto = batched_keskar_sharpness(models, sets, ys, 1e-3, lr=0.05, epochs=epochs,
                                            patience=patience, tol=tol, seeds=[4, 5, 6, 7])
        finally:
            mp.undo()
        assert (auto.value, auto.max_loss, auto.n_steps) == (bs.value, bs.max_loss, bs.n_steps)


@pytest.mark.parametrize("lockstep", [True, False], ids=["lockstep", "fallback"])
def test_batched_lbfgsb_sharpness_equals_scipy_per_member(lockstep, monkeypatch):
    # fallback: a scipy outside the versions whose private setulb was checked (member by member)
    import flatprior.flatness.batched as batched_mod

    if not lockstep:
        monkeypatch.setattr(batched_mod, "_lbfgsb_lockstep_available", lambda: False)
    # lockstep L-BFGS-B (scipy's setulb per member, batched loss/gradient) vs
    # keskar_sharpness(method="lbfgsb") = scipy.optimize.minimize on each member alone;
    # measured 1.6e-13 relative and the same iteration counts on 100 Boolean nets
    from flatprior.data import make_task
    from flatprior.flatness.batched import batched_lbfgsb_sharpness

    boolean = make_task("boolean", 64, 0, 64, 0)
    nets = [make_model("fcn", (7,), hidden=(40, 40), seed=i) for i in range(6)]
    digits = [make_task("digits", 30 + 7 * i, 0, 10, i) for i in range(3)]
    small = [make_model("fcn", digits[0].input_shape, hidden=(12, 8), seed=i) for i in range(3)]
    cases = [(nets, [boolean.x_train] * 6, [boolean.y_train] * 6, None, 10),
             (small, [t.x_train for t in digits], [t.y_train for t in digits], 16, 6)]
    for models, xs, ys, eval_bs, maxiter in cases:  # shared set; own sets, two eval batches
        b = batched_lbfgsb_sharpness(models, xs, ys, 1e-3, maxiter=maxiter,
                                     eval_batch_size=eval_bs)
        for i, m in enumerate(models):
            ref = keskar_sharpness(m, nn.BCEWithLogitsLoss(), xs[i], ys[i].reshape(-1, 1), 1e-3,
                                   "lbfgsb", lbfgs_maxiter=maxiter, eval_batch_size=eval_bs,
                                   return_details=True)
            assert b.value[i] == pytest.approx(ref.value, rel=1e-6)
            assert b.max_loss[i] == pytest.approx(ref.max_loss, rel=1e-12)
            assert b.base_loss[i] == pytest.approx(ref.base_loss, rel=1e-12)
            assert b.n_steps[i] == ref.n_steps
        assert len(set(b.n_steps)) > 1 or maxiter in b.n_steps
