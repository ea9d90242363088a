"""Ctrl-C and a killed parent, as real processes (issue #17, items 1 and 6).

* SIGINT during ``flatprior train`` / ``flatprior run`` prints "aborted (finished runs are
  stored; re-run to resume)" and exits with status 130, so ``flatprior run … && next`` stops;
* the worker processes of ``flatprior run`` exit within seconds when only their parent is
  killed with SIGKILL (no orphans holding ~0.5 GB each).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

TESTS = Path(__file__).resolve().parent
ABORT_LINE = "aborted (finished runs are stored; re-run to resume)"


def _sigint_as_in_a_terminal() -> None:
    """Child pre-exec: SIGINT back to its default disposition.

    A test runner started in the background of a non-interactive shell (``cmd &``, as CI
    scripts may do) has SIGINT ignored, and an ignored signal stays ignored across exec: the
    command under test would never see the Ctrl-C these tests send.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env(**extra):
    path = f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces, split after the last ')'
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for an init that does not reap counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _rows(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def _run_cmd(db: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "flatprior.cli", "run", "fig3",
            "--set", "seed=[0,1,2,3,4,5,6,7]", "--set", "n_attack=0",
            "--run-fn", "_fake_runs:slow_run", "--workers", str(workers), "--out", str(db),
            "--no-progress"]


def _wait(cond, timeout: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_sigint_during_train_exits_130_with_message():
    # a training run long enough to be interrupted (digits, 1500 examples, no measures)
    p = subprocess.Popen(
        [sys.executable, "-m", "flatprior.cli", "train", "--n-train", "1500", "--n-test", "100",
         "--max-epochs", "100000", "--measures", "none", "--lr", "1e-6"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    # the command imports torch (flatprior.cli does not): once libtorch is mapped, the signal
    # lands inside the command, not in the interpreter's start-up
    maps = Path(f"/proc/{p.pid}/maps")
    _wait(lambda: p.poll() is not None or "libtorch" in maps.read_text(), 60, "torch import")
    time.sleep(1.0)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == ABORT_LINE, err
    assert "Traceback" not in err and out == ""


@pytest.mark.timeout(120)
def test_ctrl_c_during_run_exits_130_keeps_finished_runs_and_stops_workers(tmp_path):
    db = tmp_path / "r.db"
    p = subprocess.Popen(_run_cmd(db, 2), env=_env(FAKE_RUN_SLEEP="1.0"), start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_sigint_as_in_a_terminal)
    _wait(lambda: _rows(db) >= 2 or p.poll() is not None, 60, "two stored runs")
    workers = _children(p.pid)
    assert p.poll() is None and workers, p.communicate()
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == ABORT_LINE, err
    assert "Traceback" not in err
    stored = _rows(db)
    assert 2 <= stored < 8
    _wait(lambda: not any(_alive(w) for w in workers), 10, "workers to exit")
    # re-run resumes: only the missing runs are run
    again = subprocess.run(_run_cmd(db, 1), env=_env(FAKE_RUN_SLEEP="0"), capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert f"{stored} already stored, {8 - stored} run now" in again.stderr
    assert _rows(db) == 8


@pytest.mark.timeout(120)
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    db = tmp_path / "r.db"
    p = subprocess.Popen(_run_cmd(db, 2), env=_env(FAKE_RUN_SLEEP="30"), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # spawn start-up: a resource tracker and 2 workers, each busy in a 30 s "run"
        _wait(lambda: len(_children(p.pid)) >= 3, 60, "the worker processes")
        time.sleep(3)  # let the workers import and enter their runs
        family = _children(p.pid)
        os.kill(p.pid, signal.SIGKILL)  # only the parent
        p.wait()
        t0 = time.time()
        _wait(lambda: not any(_alive(c) for c in family), 10, f"orphans {family} to exit")
        assert time.time() - t0 < 10
    finally:
        try:  # never leak processes on a failure: the whole session group
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
