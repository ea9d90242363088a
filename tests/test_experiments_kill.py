"""A sweep killed with SIGKILL (parent and workers) resumes with nothing lost or duplicated."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import _fake_runs
from flatprior.experiments.runner import run_sweep
from flatprior.experiments.specs import resolve
from flatprior.experiments.store import Store

TESTS = Path(__file__).resolve().parent
SEEDS = list(range(20))
SETS = ["--set", f"seed={SEEDS}", "--set", "n_attack=[0, 50]"]


def cli(db, *extra):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FAKE_RUN_SLEEP": "0.3"}
    return [sys.executable, "-m", "flatprior.cli", "run", "fig3", *SETS, "--run-fn",
            "_fake_runs:slow_run", "--workers", "2", "--out", str(db), "--no-progress",
            *extra], env


def rows(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT key, record FROM runs").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def kill_after(db, n_rows, timeout=60):
    cmd, env = cli(db)
    p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < timeout and p.poll() is None:
        if db.exists() and len(rows(db)) >= n_rows:
            break
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read()
    os.killpg(p.pid, signal.SIGKILL)  # the parent and its worker processes, no clean-up
    p.wait()
    return len(rows(db))


def check_db(db):
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    got = con.execute("SELECT key, status, record FROM runs").fetchall()
    con.close()
    for key, status, blob in got:
        rec = json.loads(blob)  # no partial row: every record is whole JSON
        assert rec["key"] == key and rec["status"] == status == "zero_error"
    return got


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    db = tmp_path / "killed.db"
    n1 = kill_after(db, 3)
    first = check_db(db)
    assert 3 <= len(first) == n1 < 20
    n2 = kill_after(db, n1 + 3)  # kill the resumed sweep too
    second = check_db(db)
    assert len(second) == n2 and {k for k, _, _ in first} <= {k for k, _, _ in second}
    cmd, env = cli(db)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"{n2} already stored" in p.stderr
    final = check_db(db)
    assert len(final) == 40 == len({k for k, _, _ in final})
    # the same sweep, never interrupted
    cfgs = resolve("fig3", "quick", "mnist-fcn", {"seed": SEEDS, "n_attack": [0, 50]}).configs
    with Store(tmp_path / "clean.db") as st:
        run_sweep(cfgs, st, "fig3/mnist-fcn@quick", run_fn=_fake_runs.fake_record, workers=1,
                  progress=False)
        clean = {r["key"]: r for r in st.records()}
    resumed = {k: json.loads(b) for k, _, b in final}
    assert set(resumed) == set(clean) == {c.key() for c in cfgs}
    for k, rec in resumed.items():
        assert rec == {kk: v for kk, v in clean[k].items() if kk != "created"}
