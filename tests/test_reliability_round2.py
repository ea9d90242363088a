"""Reliability, second round (issue #17): what an adversarial new user still broke.

Items 1 and 6 (Ctrl-C, orphaned workers) are in ``test_reliability_signals.py``, item 9
(thread counts) in ``test_reliability_repro.py``; the one-line errors of item 5 and the
output-path checks of item 7 are also rows of the bad-input matrix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import _fake_runs
from flatprior.errors import FlatpriorError

TESTS = Path(__file__).resolve().parent


def _env(**extra):
    path = f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


# --- item 2: one run, one key, one count -----------------------------------------------------
def test_measure_lists_are_canonical_before_hashing():
    from flatprior.measures import FLATNESS_MEASURES, PRIOR_MEASURES
    from flatprior.pipeline import make_config

    a = make_config(measures=("log_prior", "sharpness"))
    b = make_config(measures=("sharpness", "log_prior", "sharpness"))
    c = make_config(measures=("sharpness", "log_prior"))
    assert a.key() == b.key() == c.key()
    assert a.measures == ("sharpness", "log_prior")  # flatness first, then prior (registry order)
    e1 = make_config(measure_every=2, epoch_measures=("log_prior", "sharpness", "log_prior"))
    e2 = make_config(measure_every=2, epoch_measures=("sharpness", "log_prior"))
    assert e1.key() == e2.key() and e1.epoch_measures == ("sharpness", "log_prior")
    canonical = (*FLATNESS_MEASURES, *PRIOR_MEASURES)
    everything = make_config(measures=tuple(reversed(canonical)))
    assert everything.measures == canonical
    assert make_config(measures=("log_prior",)).key() != a.key()  # a different run stays one


def test_keys_of_configs_already_canonical_are_unchanged():
    # migration: the old key was sha256 of the sorted JSON as typed; for lists already in
    # canonical order (every shipped spec and default) it is the same key, so old stores resume
    from flatprior.experiments.specs import PRESETS, list_specs, resolve
    from flatprior.pipeline import LATER_FIELDS, NON_KEY_FIELDS, RunConfig

    def old_key(cfg):
        d = cfg.model_dump(mode="json", exclude=set(NON_KEY_FIELDS))
        for f in LATER_FIELDS:  # fields that did not exist then, at their default
            if d[f] == RunConfig.model_fields[f].default:
                del d[f]
        d["sigma_b"] = d.pop("sigma_b2") ** 0.5  # the bias under its name before #14's rename
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    n = 0
    for name, spec in list_specs().items():
        for v in list(spec.variants) or [None]:
            cfgs = resolve(spec, "quick", v).configs
            for cfg in cfgs[:3]:
                assert cfg.key() == old_key(cfg), (name, v)
                n += 1
    assert n >= 8 and "quick" in PRESETS


def test_reordered_measures_rerun_nothing(cli, tmp_path):
    db = tmp_path / "r.db"
    common = ["run", "fig3", "--set", "seed=[0,1]", "--set", "n_attack=0", "--run-fn",
              "_fake_runs:fake_record", "--workers", "1", "--out", db, "--no-progress"]
    first = cli(*common, "--set", "measures=log_prior,sharpness")
    assert first.returncode == 0 and "0 already stored, 2 run now" in first.stderr
    again = cli(*common, "--set", "measures=sharpness,log_prior,sharpness")
    assert again.returncode == 0 and "2 already stored, 0 run now" in again.stderr


def test_report_counts_a_run_stored_under_two_keys_once(tmp_path):
    """A store written before canonical keys: the same run under two keys counts once."""
    from flatprior.analysis.report import analyse_spec
    from flatprior.experiments.specs import resolve
    from flatprior.experiments.store import Store
    from flatprior.pipeline import config_key

    cfgs = resolve("fig3", "quick", "mnist-fcn", {"seed": list(range(4))}).configs
    with Store(tmp_path / "old.db") as st:
        for cfg in cfgs:
            d = cfg.model_dump(mode="json")
            rec = _fake_runs.fake_record(d)
            st.put({**rec, "key": cfg.key()}, "spec")
            # the same config as typed in another order, stored under the old, different key
            swapped = {**d, "measures": list(reversed(d["measures"]))}
            old_key = config_key(swapped, canonical=False)  # the key recipe before #17
            assert old_key != cfg.key()
            st.put({**rec, "config": swapped, "key": old_key}, "spec")
        assert st.count() == 2 * len(cfgs)
        frame = st.to_frame(spec="spec")
        assert len(frame) == len(cfgs)
        sec = analyse_spec(st, "spec", n_boot=0, make_figures=False)
    assert set(sec.correlations["n"]) == {len(cfgs)}


def test_correlation_table_counts_duplicate_keys_once():
    from flatprior.analysis import correlation_table

    df = _frame(12)
    t1 = correlation_table(df, n_boot=0)
    t2 = correlation_table(pd.concat([df, df.iloc[:5]]), n_boot=0)
    assert set(t2["n"]) == {12}
    pd.testing.assert_frame_equal(t1, t2, check_exact=True)


# --- item 3: bootstrap intervals do not depend on row order -----------------------------------
def _frame(n: int) -> pd.DataFrame:
    from flatprior.experiments.specs import resolve

    cfgs = resolve("fig3", "quick", "mnist-fcn", {"seed": list(range(n))}).configs
    rows = [_fake_runs.fake_record(c.model_dump(mode="json")) for c in cfgs[:n]]
    return pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, (dict, list))}
                         for r in rows])


def test_bootstrap_interval_independent_of_row_order():
    from flatprior.analysis import correlation_table

    df = _frame(14)
    ref = correlation_table(df, n_boot=100, seed=0)
    assert ref["ci_low"].notna().all()
    lows = set()
    for shuffle_seed in range(2):
        shuffled = df.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)
        got = correlation_table(shuffled, n_boot=100, seed=0)
        pd.testing.assert_frame_equal(got, ref, check_exact=True)  # every bit, CIs included
        lows.add(tuple(got["ci_low"]))
    assert len(lows) == 1


def test_bootstrap_interval_of_pairs_is_a_function_of_the_set():
    from flatprior.analysis.correlations import correlation

    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    p = rng.permutation(30)
    for method in ("kendall", "spearman", "pearson"):
        assert correlation(x, y, method, n_boot=200) == correlation(x[p], y[p], method, n_boot=200)


# --- item 4: one PSD check for every log P(f) estimator ---------------------------------------
def _kernel_with_min_eigenvalue(lam_rel: float, n: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    k = a @ a.T / n + 0.5 * np.eye(n)
    w, v = np.linalg.eigh(k)
    w[0] = lam_rel * np.abs(np.diag(k)).max()
    k = (v * w) @ v.T
    return (k + k.T) / 2


METHODS = ("ep", "exact", "tilting", "mc")


@pytest.mark.parametrize("lam_rel", [-3.8, -0.038, -4e-7])
@pytest.mark.parametrize("method", METHODS)
def test_non_psd_kernel_refused_by_every_method_with_the_same_line(method, lam_rel):
    from flatprior.prior import log_prior

    k = _kernel_with_min_eigenvalue(lam_rel)
    lam = np.linalg.eigvalsh(k)[0]
    y = np.where(np.arange(12) % 3 == 0, 1, -1)
    with pytest.raises(FlatpriorError) as info:
        log_prior(k, y, method=method)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("kernel K is not positive semidefinite")
    assert f"min eigenvalue {lam:.3g}" in msg and "add jitter" in msg


@pytest.mark.parametrize("method", METHODS)
def test_psd_up_to_rounding_accepted_by_every_method(method):
    """A singular kernel with an eigenvalue rounded to -1e-13 of the scale (as rank-deficient
    and duplicated-input kernels come out of float64 arithmetic) is not refused; the result
    equals the one for the kernel clipped to PSD."""
    from flatprior.prior import log_prior

    k = _kernel_with_min_eigenvalue(-1e-13)
    assert np.linalg.eigvalsh(k)[0] < 0
    w, v = np.linalg.eigh(k)
    clipped = (v * np.maximum(w, 0)) @ v.T
    clipped = (clipped + clipped.T) / 2
    y = np.where(np.arange(12) % 3 == 0, 1, -1)
    kw = {"n_samples": 200_000} if method == "mc" else {}
    got = log_prior(k, y, method=method, **kw).log_prob
    ref = log_prior(clipped, y, method=method, **kw).log_prob
    assert np.isfinite(got) and abs(got - ref) <= 1e-3 * abs(ref)


def test_psd_tolerance_scales_with_n_and_the_kernel_scale():
    from flatprior.prior._validate import PSD_RTOL, check_psd

    for scale in (1e-6, 1.0, 1e6):
        k = scale * _kernel_with_min_eigenvalue(-0.5 * PSD_RTOL * 12)
        check_psd(k)  # inside the allowance rtol * n * max K_ii at every scale
        k = scale * _kernel_with_min_eigenvalue(-2.0 * PSD_RTOL * 12)
        with pytest.raises(FlatpriorError, match="not positive semidefinite"):
            check_psd(k)


def test_psd_check_on_a_duplicated_input_arccos_kernel():
    """Exact duplicates make the arc-cosine kernel singular; rounding leaves its smallest
    eigenvalue slightly negative (measured: -1.2e-13 of the scale at n = 2000 on MNIST). The
    check must pass it, and EP (duplicates with equal labels) must converge to a finite value."""
    import torch

    from flatprior.prior import arccos_kernel, log_prior_ep
    from flatprior.prior._validate import check_psd

    g = torch.Generator().manual_seed(0)
    x = torch.rand(150, 64, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:50]])  # 50 exact duplicates
    k = np.asarray(arccos_kernel(x, depth=2))
    check_psd(k)
    y = np.r_[np.where(np.arange(150) % 2 == 0, 1, -1), np.where(np.arange(50) % 2 == 0, 1, -1)]
    res = log_prior_ep(k, y)
    assert res.converged and np.isfinite(res.log_prob)


# --- item 5: one-line errors -------------------------------------------------------------------
def test_report_skips_an_unreadable_record_and_says_so(cli, tmp_path):
    import sqlite3

    from flatprior.experiments.runner import run_sweep
    from flatprior.experiments.specs import resolve
    from flatprior.experiments.store import Store

    db = tmp_path / "r.db"
    r = resolve("fig3", "quick", "mnist-fcn", {"seed": list(range(5)), "n_attack": [0, 100]})
    with Store(db) as st:
        run_sweep(r.configs, st, r.label, info=r.info(), run_fn=_fake_runs.fake_record,
                  workers=1, progress=False)
    con = sqlite3.connect(db)
    bad_key = con.execute("SELECT key FROM runs ORDER BY key LIMIT 1").fetchone()[0]
    with con:
        con.execute("UPDATE runs SET record = ? WHERE key = ?", ('{"key": "x", "stat', bad_key))
    con.close()
    res = cli("report", db, "--out", tmp_path / "rep.html", "--n-boot", "0", "--quiet")
    assert res.returncode == 0, res.stderr
    assert f"1 stored record(s) unreadable (invalid JSON), left out of the report: {bad_key}" \
        in " ".join(res.stderr.split())
    page = (tmp_path / "rep.html").read_text()
    assert "1 stored record(s) unreadable" in page and bad_key in page
    with Store(db, readonly=True) as st:
        assert len(st.to_frame(spec=r.label)) == 9 and st.unreadable == {bad_key}


# --- item 7: --save-model checked before any work, the record kept if saving fails ------------
def test_save_model_failure_after_training_still_prints_the_record(cli, tmp_path, monkeypatch):
    import flatprior.checkpoint

    def refuse(*a, **k):
        raise FlatpriorError("cannot write checkpoint m.pt (No space left on device)")

    monkeypatch.setattr(flatprior.checkpoint, "save_checkpoint", refuse)
    res = cli("train", "--n-train", "30", "--n-test", "20", "--measures", "none", "--json",
              "--save-model", tmp_path / "m.pt")
    assert res.returncode == 2
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["status"] == "zero_error" and rec["n_train"] == 30
    assert res.stderr.strip().splitlines()[-1] == (
        "error: cannot write checkpoint m.pt (No space left on device)")
    assert not (tmp_path / "m.pt").exists()


def test_save_model_works_and_missing_folder_is_checked_first(cli, tmp_path, monkeypatch):
    import flatprior.pipeline

    called = []
    monkeypatch.setattr(flatprior.pipeline, "build_task", lambda *a: called.append(1))
    res = cli("train", "--save-model", tmp_path / "no" / "m.pt")
    assert res.returncode == 2 and called == []  # refused before loading any data
    assert "folder" in res.stderr and "does not exist" in res.stderr
    monkeypatch.undo()
    ok = cli("train", "--n-train", "30", "--n-test", "20", "--measures", "none", "--json",
             "--save-model", tmp_path / "m.pt")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["model_path"] == str(tmp_path / "m.pt")
    assert (tmp_path / "m.pt").is_file()
    assert not list(tmp_path.glob(".flatprior-check-*"))  # the probe file is removed


# --- item 8: messages that sent users the wrong way -------------------------------------------
def test_cnn_sharpness_only_not_refused_for_unused_epoch_measures():
    from flatprior.experiments.runner import preflight
    from flatprior.experiments.specs import resolve

    ok = resolve("fig3", "quick", "mnist-fcn",
                 {"model": "cnn", "measures": ["sharpness"], "seed": 0, "n_attack": 0}).configs
    assert ok[0].measure_every == 0 and "log_prior" in ok[0].epoch_measures
    preflight(ok)  # measure_every = 0: the default epoch_measures are never computed
    per_epoch = resolve("fig3", "quick", "mnist-fcn",
                        {"model": "cnn", "measures": ["sharpness"], "measure_every": 5,
                         "seed": 0, "n_attack": 0}).configs
    with pytest.raises(FlatpriorError, match="kernel=empirical"):
        preflight(per_epoch)


def test_diverging_learning_rate_is_told_to_lower_it():
    from flatprior.data import make_task
    from flatprior.models import make_model
    from flatprior.train import TrainConfig, train

    task = make_task("digits", 200, 0, 50, seed=0)
    model = make_model("fcn", task.input_shape, seed=0)
    res = train(model, task, TrainConfig(lr=1000.0, max_epochs=12))
    assert res.status == "did_not_reach_zero_error"
    assert res.message.startswith("diverged: the training loss rose from ")
    assert "lower the learning rate (lr=1000)" in res.message and "raise" not in res.message
    # a slow but sane run keeps the old advice
    slow = train(make_model("fcn", task.input_shape, seed=0), task,
                 TrainConfig(lr=1e-3, max_epochs=3))
    assert "raise max_epochs or the learning rate" in slow.message


def test_n_test_zero_says_why_test_error_is_missing(cli):
    res = cli("train", "--n-train", "30", "--n-test", "0", "--measures", "none")
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if "test_error" in ln)
    assert "n/a (no test set: --n-test 0)" in line


def test_report_of_runs_without_test_set_says_why_n_a(cli, tmp_path):
    from flatprior.experiments.runner import run_sweep
    from flatprior.experiments.specs import resolve
    from flatprior.experiments.store import Store

    def no_test_set(cfg):
        return {**_fake_runs.fake_record(cfg), "test_error": None}

    db = tmp_path / "r.db"
    r = resolve("fig3", "quick", "mnist-fcn", {"seed": [0, 1], "n_test": 0})
    with Store(db) as st:
        run_sweep(r.configs, st, r.label, info=r.info(), run_fn=no_test_set, workers=1,
                  progress=False)
    res = cli("report", db, "--out", tmp_path / "rep.html", "--n-boot", "0")
    assert res.returncode == 0, res.stderr
    assert "n/a" in res.stdout
    assert "n/a where n < 3: a correlation needs 3 zero-error runs with both the measure and a " \
           "test error (runs with n_test = 0 have no test error)" in " ".join(res.stdout.split())


@pytest.mark.timeout(120)
def test_download_mnist_from_a_mirror_with_md5_checks(mnist_root, http_root, tmp_path):
    from flatprior.data import make_task
    from flatprior.data._files import md5sum
    from flatprior.data.mnist import FILES

    www, url = http_root
    for f in (mnist_root / "mnist").glob("t10k-*.gz"):  # only the t10k files are shipped here
        shutil.copy(f, www / f.name)
    dest = tmp_path / "data"
    p = subprocess.run(
        [sys.executable, "-m", "flatprior.cli", "download", "mnist", "--data-root", str(dest),
         "--parts", "test", "--mirror", url],
        env=_env(), capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    for key in ("test-images", "test-labels"):
        stem, md5 = FILES[key]
        assert md5sum(dest / f"{stem}.gz") == md5
        assert f"downloaded {dest / (stem + '.gz')} (md5 ok)" in p.stderr
    assert not list(dest.glob("*.part"))
    task = make_task("mnist", 20, 0, 20, seed=0, data_root=dest)
    assert task.x_train.shape == (20, 1, 28, 28)
    # again: nothing fetched, the files are kept; through the environment variable this time
    again = subprocess.run(
        [sys.executable, "-m", "flatprior.cli", "download", "mnist", "--data-root", str(dest),
         "--parts", "test"], env=_env(FLATPRIOR_MNIST_MIRROR=url + "nothing-here/"),
        capture_output=True, text=True, timeout=100)
    assert again.returncode == 0 and "already present" in again.stderr


@pytest.mark.timeout(120)
def test_download_refuses_a_file_with_the_wrong_md5(http_root, tmp_path):
    import gzip

    www, url = http_root
    (www / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not mnist"))
    dest = tmp_path / "data"
    p = subprocess.run(
        [sys.executable, "-m", "flatprior.cli", "download", "mnist", "--data-root", str(dest),
         "--parts", "test", "--mirror", url],
        env=_env(), capture_output=True, text=True, timeout=100)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "md5 mismatch for t10k-images-idx3-ubyte.gz" in lines[0]
    assert list(dest.iterdir()) == []  # nothing half-written kept


def test_missing_mnist_message_names_a_real_command(tmp_path):
    from flatprior.data import make_task

    with pytest.raises(FlatpriorError) as info:
        make_task("mnist", 5, data_root=tmp_path)
    assert f"flatprior download mnist --data-root {tmp_path}" in str(info.value)
    assert "--download" not in str(info.value).replace("flatprior download", "")


def _sweep_db(folder: Path) -> Path:
    from flatprior.experiments.runner import run_sweep
    from flatprior.experiments.specs import resolve
    from flatprior.experiments.store import Store

    db = folder / "r.db"
    r = resolve("fig3", "quick", "mnist-fcn", {"seed": list(range(4)), "n_attack": [0, 100]})
    with Store(db) as st:
        run_sweep(r.configs, st, r.label, info=r.info(), run_fn=_fake_runs.fake_record,
                  workers=1, progress=False)
    return db


def test_report_leaves_no_wal_or_shm_files(cli, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    db = _sweep_db(folder)
    before = sorted(os.listdir(folder))
    assert before == ["r.db"]
    res = cli("report", db, "--out", tmp_path / "rep.html", "--n-boot", "0", "--quiet",
              "--export", tmp_path / "runs.csv")
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(folder)) == before


@pytest.mark.timeout(120)
def test_report_on_a_database_in_a_read_only_folder(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    db = _sweep_db(folder)
    argv = [sys.executable, "-m", "flatprior.cli", "report", str(db), "--out",
            str(tmp_path / "rep.html"), "--n-boot", "0", "--quiet"]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        cmd = argv
    else:  # root ignores permissions: a read-only bind mount in a private mount namespace
        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: no read-only folder")
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("cannot create a mount namespace here")
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               'mount --bind -o ro "$0" "$0" && touch "$0/probe" 2>/dev/null; '
               '[ ! -e "$0/probe" ] && exec "$@"', str(folder), *argv]
    try:
        p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=100)
    finally:
        folder.chmod(0o755)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "rep.html").is_file()
    assert sorted(os.listdir(folder)) == ["r.db"]


# --- item 10: `flatprior list` into a pipe -----------------------------------------------------
def test_list_into_a_pipe_keeps_whole_lines():
    from flatprior.experiments.specs import list_specs

    env = _env()
    env.pop("COLUMNS", None)
    p = subprocess.run([sys.executable, "-m", "flatprior.cli", "list"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for name, spec in list_specs().items():
        row = next(ln for ln in p.stdout.splitlines() if f" {name} " in ln)
        assert spec.reproduces in row, (name, row)  # whole text on the spec's own line
    detail = subprocess.run([sys.executable, "-m", "flatprior.cli", "list", "fig3"], env=env,
                            capture_output=True, text=True, timeout=60)
    spec = list_specs()["fig3"]
    assert spec.description.split("\n")[0] in detail.stdout
