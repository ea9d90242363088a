"""The run / list commands, called in-process through the real entry point (``main``)."""

import json
import sqlite3

import pytest

from flatprior.errors import FlatpriorError
from flatprior.experiments import ensemble as ens

# the ``cli`` fixture (in-process ``flatprior ...``) lives in conftest.py


def test_list_shows_every_spec_and_what_it_needs(cli):
    p = cli("list")
    assert p.returncode == 0, p.stderr
    for name in ("fig2-boolean", "fig3", "fig4", "fig5", "figS9", "figS11-16", "figS18",
                 "figS19", "mnist-fcn", "cifar-fcn", "cifar-resnet", "CIFAR-10"):
        assert name in p.stdout
    p = cli("list", "fig3")
    text = " ".join(p.stdout.split())
    assert p.returncode == 0
    assert ("fig3/cifar-resnet@paper (55 runs; sharpness: eps 0.0001, ascent 100 ep + L-BFGS-B)"
            in text)


def test_run_real_tiny_sweep_then_resume(cli, tmp_path):
    db = tmp_path / "r.db"
    args = ["run", "fig3", "mnist-fcn", "--set", "n_attack=[0, 10]", "--set", "seed=0",
            "--set", "n_train=30", "--set", "n_test=30", "--set", "batch_size=10",
            "--set", "measures=none", "--workers", "1", "--out", str(db), "--no-progress"]
    p = cli(*args)
    assert p.returncode == 0, p.stderr
    assert "2 runs, 0 already stored, 2 run now (0 failed)" in p.stderr
    con = sqlite3.connect(db)
    recs = [json.loads(r) for (r,) in con.execute("SELECT record FROM runs")]
    assert sorted(r["n_attack"] for r in recs) == [0, 10]
    assert all(r["status"] == "zero_error" and r["train_error"] == 0 for r in recs)
    assert con.execute("SELECT spec FROM members").fetchall() == [("fig3/mnist-fcn@quick",)] * 2
    p = cli(*args)
    assert p.returncode == 0 and "2 already stored, 0 run now" in p.stderr


def test_dry_run_shows_the_sweep(cli):
    p = cli("run", "fig3", "--preset", "paper", "--dry-run", "--set", "optimizer=adam")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["n_runs"] == 55 and d["base"]["optimizer"] == "adam"
    assert d["sweep"]["n_attack"] == list(range(0, 501, 50))


@pytest.mark.parametrize(
    "args, match",
    [
        (["run", "fig9"], "unknown spec 'fig9'"),
        (["run", "fig3", "mnist"], "no variant 'mnist'"),
        (["run", "fig3", "--preset", "full"], "unknown preset 'full'"),
        (["run", "fig3", "--set", "n_trian=5"], "unknown run field"),
        (["run", "fig3", "--set", "n_train=many"], "n_train: Input should be a valid integer"),
        (["run", "fig3", "--set", "sharpness_eps=-1"], "sharpness_eps: Input should be greater"),
        (["run", "fig3", "--config", "/nonexistent.toml"], "not found"),
        (["run", "fig3", "cifar-fcn", "--data-root", "/nonexistent"], "CIFAR-10"),
        (["run", "fig3", "--out", "/nonexistent/r.db"], "does not exist"),
        (["run", "fig3", "--workers", "0"], "--workers must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, args, match):
    p = cli(*args)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "runs; sweep over" not in ln]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr and match in lines[0], p.stderr


def test_database_from_another_version(cli, tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    for t in ("meta (name, value)", "runs (key)", "specs (label)", "members (spec)"):
        con.execute(f"CREATE TABLE {t}")
    con.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    con.commit()
    p = cli("run", "fig3", "--set", "seed=0", "--set", "n_attack=0", "--out", str(db))
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "runs; sweep over" not in ln]
    assert p.returncode == 2 and len(lines) == 1 and "schema version 99" in lines[0]


_BOOL_RUN = ["run", "fig2-boolean", "majority", "--set", "seed=[0,1,2]", "--set", "batch_size=8",
             "--set", "lr=0.01", "--set", "max_epochs=300", "--set", "measures=none",
             "--workers", "1", "--no-progress", "--ensemble", "auto"]


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ("lots", "--memory-budget 'lots': give a size like 512MB, 2GB or 1.5GiB"),
        ("-5MB", "give a size like"),
        ("2 GBs", "give a size like"),
        ("0GB", "must be at least 1 byte"),
        # one Boolean member needs ~150 kB (parameters, gradient, momentum, activations)
        ("10kB", "but memory_budget is 9.8 KiB; raise memory_budget (flatprior run "
                 "--memory-budget) or train it with --ensemble off"),
    ],
)
def test_memory_budget_bad_values_one_line_exit_2(cli, tmp_path, budget, match):
    db = tmp_path / "r.db"
    p = cli(*_BOOL_RUN, "--out", db, "--memory-budget", budget)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "runs; sweep over" not in ln]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr and match in lines[0], p.stderr
    if db.exists():  # checked before any run: nothing stored
        assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)


@pytest.mark.parametrize(
    ("text", "size"), [("4096", 4096), ("512MB", 512 * 10**6), ("1.5GiB", 3 * 2**29),
                       ("2 kib", 2048), ("1e3kB", 10**6), (7, 7)])
def test_parse_memory_budget_units(text, size):
    assert ens.parse_memory_budget(text) == size


@pytest.mark.parametrize(("text", "match"), [("1e400GB", "too large"), ("1e400", "too large"),
                                             ("0.1", "at least 1 byte"), ("nanGB", "a size like"),
                                             (True, "a size like")])
def test_parse_memory_budget_rejects_with_one_line(text, match):
    with pytest.raises(FlatpriorError, match=match) as exc:
        ens.parse_memory_budget(text)
    assert "\n" not in str(exc.value)


def test_memory_budget_chunks_the_ensemble_same_functions(cli, tmp_path):
    from flatprior.train import ensemble as train_ens

    chunks = []
    real = train_ens._train_chunk

    def spy(models, *a, **k):
        chunks.append(len(models))
        return real(models, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_ens, "_train_chunk", spy)
    try:
        small = cli(*_BOOL_RUN, "--out", tmp_path / "small.db", "--memory-budget", "200kB")
        assert small.returncode == 0, small.stderr
        assert chunks == [1, 1, 1]  # 200 kB holds one member: three chunks of one
        chunks.clear()
        big = cli(*_BOOL_RUN, "--out", tmp_path / "big.db", "--memory-budget", "2GB")
        assert big.returncode == 0, big.stderr
        assert chunks == [3]
    finally:
        mp.undo()
    assert ens.parse_memory_budget("1.5GiB") == 3 * 2**29
    recs = {}
    for name in ("small", "big"):
        con = sqlite3.connect(tmp_path / f"{name}.db")
        recs[name] = {json.loads(r)["key"]: json.loads(r)
                      for (r,) in con.execute("SELECT record FROM runs")}
    assert set(recs["small"]) == set(recs["big"]) and len(recs["small"]) == 3
    for k, r in recs["small"].items():
        b = recs["big"][k]
        assert r["status"] == b["status"] == "zero_error"
        assert (r["function"], r["epochs_to_zero_error"]) == (b["function"],
                                                              b["epochs_to_zero_error"])
    # the option is for ensembles: with --ensemble off it is accepted with a note
    off = cli(*_BOOL_RUN[:-2], "--ensemble", "off", "--out", tmp_path / "big.db",
              "--memory-budget", "1GB")
    assert off.returncode == 0 and "applies to ensembles only" in off.stderr


def test_ensemble_default_comes_from_the_spec(cli, tmp_path):
    # fig2-boolean's spec says auto (1e5 batch-1 runs need ensembles), fig3's says off
    p = cli("run", "fig3", "--dry-run")
    assert p.returncode == 0 and "ensembles: off (the spec's default)" in p.stderr
    p = cli("run", "fig2-boolean", "--dry-run", "--ensemble", "off")
    assert p.returncode == 0 and "ensembles: off (--ensemble)" in p.stderr
    db = tmp_path / "b.db"
    base = ["fig2-boolean", "--set", "seed=[0, 1, 2]", "--set", "measures=none",
            "--workers", "1", "--no-progress"]
    p = cli("run", *base, "--out", str(db))
    assert p.returncode == 0, p.stderr
    assert "ensembles: auto (the spec's default)" in p.stderr
    # resuming on the other path says so
    p = cli("run", *base, "--set", "seed=[0, 1, 2, 3]", "--ensemble", "off", "--out", str(db))
    assert p.returncode == 0, p.stderr
    assert ("3 stored runs of fig2-boolean/sampleable@quick ran as ensembles; the remaining runs "
            "run one per run (--ensemble auto keeps one path)") in " ".join(p.stderr.split())
    con = sqlite3.connect(db)
    recs = [json.loads(r) for (r,) in con.execute("SELECT record FROM runs")]
    got = sorted((r["seed"], r["executed_as"], r["ensemble_size"]) for r in recs)
    assert got == [(0, "ensemble", 3), (1, "ensemble", 3), (2, "ensemble", 3), (3, "single", 1)]
    p = cli("run", "fig2-boolean", "--dry-run", "--ensemble", "on")
    assert p.returncode == 2 and "--ensemble must be auto or off, got 'on'" in p.stderr


def test_auto_ensembles_say_which_runs_take_the_per_run_path(cli, tmp_path):
    # SAM's ascent step normalises the whole network's gradient: not stackable, so those runs
    # run one per run, and the user who asked for ensembles is told which and why
    db = tmp_path / "s.db"
    args = ["run", "fig2-boolean", "--set", "seed=[0, 1]", "--set", "measures=none",
            "--workers", "1", "--no-progress", "--out", str(db)]
    p = cli(*args, "--set", "optimizer=sam")
    assert p.returncode == 0, p.stderr
    assert ("note: 2 runs take the per-run path: optimizer 'sam' is not element-wise"
            in " ".join(p.stderr.split()))
    p = cli(*args, "--set", "optimizer=sgd")
    assert p.returncode == 0 and "per-run path" not in p.stderr, p.stderr
    con = sqlite3.connect(db)
    got = sorted((r["optimizer"], r["executed_as"]) for r in
                 (json.loads(r) for (r,) in con.execute("SELECT record FROM runs")))
    assert got == [("sam", "single"), ("sam", "single"), ("sgd", "ensemble"), ("sgd", "ensemble")]
