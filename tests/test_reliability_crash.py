"""Crash safety of a sweep: SIGKILL at random moments, resume, compare with an uninterrupted run.

A driver process runs :func:`flatprior.experiments.runner.run_sweep` over a grid of cheap,
deterministic runs (each record carries a ~60 kB payload so that kills also land inside
SQLite writes). The test kills it with SIGKILL (its whole process group) at a random moment
after it is ready, checks the database after every kill (``PRAGMA integrity_check``, row count
never decreasing: no committed row is ever lost), then lets a last run finish. The final rows
must be exactly those of an uninterrupted run (same keys, same JSON records).

``test_sweep_survives_repeated_sigkill`` (slow) does 20 kills; the default run does 3.
Disk-full and read-only stores must be reported (FlatpriorError), not ignored.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

DRIVER = textwrap.dedent(
    """
    import hashlib, json, os, sys, time

    class Cfg:
        # what run_sweep uses of a RunConfig (key, model_dump), without importing torch: a
        # driver that starts in 0.3 s instead of 4 s lets the test afford many kills

        def __init__(self, **fields):
            self.fields = fields

        def key(self):
            blob = json.dumps(self.fields, sort_keys=True).encode()
            return hashlib.sha256(blob).hexdigest()[:16]

        def model_dump(self, mode="json"):
            return dict(self.fields)

    def configs(n):
        return [
            Cfg(dataset="digits", n_train=50, n_attack=a, n_test=50, seed=s)
            for a in range(n // 4) for s in range(4)
        ]

    def run_fn(cfg):
        # deterministic in the config; the sleep spreads the sweep over time
        time.sleep(float(os.environ.get("CRASH_SLEEP", "0.02")))
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).digest()
        payload = [((h[i % 32] * 2654435761 + i) % 100003) / 7.0 for i in range(4000)]
        return {"status": "zero_error", "test_error": h[0] / 255.0, "history": payload,
                "seed": cfg["seed"], "n_attack": cfg["n_attack"]}

    def main(db, n):
        from flatprior.experiments.runner import run_sweep
        from flatprior.experiments.store import Store

        cfgs = configs(n)
        with Store(db) as store:
            print("READY", flush=True)
            run_sweep(cfgs, store, "crash@quick", run_fn=run_fn, workers=1, progress=False)
        print("DONE", flush=True)

    if __name__ == "__main__":
        main(sys.argv[1], int(sys.argv[2]))
    """
)


def _rows(db: Path) -> dict[str, str]:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {k: r for k, r in con.execute("SELECT key, record FROM runs")}
    finally:
        con.close()


def _start(script: Path, db: Path, n: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(db), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # own process group: the kill takes any child with it
        env={**os.environ, "CRASH_SLEEP": "0.02"},
    )


def _reference(tmp_path: Path, n: int) -> dict[str, str]:
    from flatprior.experiments.runner import run_sweep
    from flatprior.experiments.store import Store

    ns: dict = {"__name__": "crash_driver"}
    exec(DRIVER, ns)  # noqa: S102 - our own driver source, to share run_fn and configs
    db = tmp_path / "reference.db"
    with Store(db) as store:
        run_sweep(
            ns["configs"](n), store, "crash@quick", run_fn=ns["run_fn"], workers=1, progress=False
        )
    return _rows(db)


def kill_resume_cycles(tmp_path: Path, n: int, kills: int, seed: int) -> dict:
    """Run the sweep, SIGKILL it ``kills`` times at random moments, then let it finish."""
    rng = random.Random(seed)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    db = tmp_path / "sweep.db"
    counts, killed_mid_sweep = [], 0
    for _ in range(kills):
        p = _start(script, db, n)
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
        time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL
        killed_mid_sweep += "DONE" not in out
        rows = _rows(db)
        assert len(rows) >= (counts[-1] if counts else 0), "a committed row was lost"
        counts.append(len(rows))
    p = _start(script, db, n)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "DONE" in out, err[-2000:]
    final = _rows(db)
    return {"counts": counts, "final": final, "killed_mid_sweep": killed_mid_sweep}


def _check_against_reference(tmp_path, result, n):
    ref = _reference(tmp_path, n)
    final = result["final"]
    assert set(final) == set(ref) and len(ref) == n
    lost = [k for k in ref if k not in final]
    differ = [k for k in ref if json.loads(final[k]) != json.loads(ref[k])]
    assert not lost and not differ
    from flatprior.experiments.store import Store

    with Store(tmp_path / "sweep.db", readonly=True) as s:
        assert len(list(s.records(spec="crash@quick"))) == n  # every run listed under the spec


@pytest.mark.timeout(300)
def test_sweep_survives_sigkill_fast(tmp_path):
    n = 80
    res = kill_resume_cycles(tmp_path, n, kills=3, seed=1)
    assert res["killed_mid_sweep"] >= 1  # the kills did interrupt the sweep
    _check_against_reference(tmp_path, res, n)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sweep_survives_repeated_sigkill(tmp_path):
    n = 400
    kills = int(os.environ.get("FLATPRIOR_CRASH_KILLS", "20"))
    res = kill_resume_cycles(tmp_path, n, kills=kills, seed=2)
    print(f"\n{kills} SIGKILLs, rows after each: {res['counts']}, final {len(res['final'])}")
    assert res["killed_mid_sweep"] >= kills // 2
    _check_against_reference(tmp_path, res, n)


# ----------------------------------------------------------------------------- full / read-only
def _one_config():
    from flatprior.pipeline import make_config

    return [make_config(dataset="digits", n_train=5, n_test=5, seed=s, measures=()) for s in (0, 1)]


def _big_run(cfg):
    return {"status": "zero_error", "history": list(range(20000))}


def test_disk_full_during_sweep_is_reported(tmp_path):
    from flatprior.errors import FlatpriorError
    from flatprior.experiments.runner import run_sweep
    from flatprior.experiments.store import Store

    with Store(tmp_path / "r.db") as store:
        store._con.execute("PRAGMA max_page_count = 12")  # SQLITE_FULL after a few pages
        with pytest.raises(FlatpriorError, match="full|space"):
            run_sweep(_one_config(), store, "x", run_fn=_big_run, workers=1, progress=False)


def test_read_only_store_during_sweep_is_reported(tmp_path):
    from flatprior.errors import FlatpriorError
    from flatprior.experiments.runner import run_sweep
    from flatprior.experiments.store import Store

    with Store(tmp_path / "r.db") as store:
        store._con.execute("PRAGMA query_only = ON")  # every write fails like a read-only file
        with pytest.raises(FlatpriorError, match="read"):
            run_sweep(_one_config(), store, "x", run_fn=_big_run, workers=1, progress=False)


def test_store_in_read_only_folder_is_reported():
    from flatprior.errors import FlatpriorError
    from flatprior.experiments.store import Store

    with pytest.raises(FlatpriorError, match="writable|cannot"):
        Store("/sys/results.db")
