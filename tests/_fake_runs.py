"""Cheap stand-ins for flatprior.pipeline.run, used by the experiments/report tests.

They are module-level (picklable by reference) so worker processes, Dask workers and
`flatprior run --run-fn _fake_runs:NAME` (with tests/ on PYTHONPATH) can import them.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from types import SimpleNamespace


def _u(key: str, salt: str) -> float:
    """Deterministic pseudo-random number in [0, 1) from the config."""
    h = hashlib.sha256(f"{key}|{salt}".encode()).hexdigest()
    return int(h[:12], 16) / 16**12


def fake_record(cfg: dict) -> dict:
    """A record whose test error grows with the attack size and whose measures follow it."""
    # flatprior.config imports no torch (keeps worker start-up cheap): RunConfig.key()'s recipe
    from flatprior.config import config_key

    key = config_key(cfg)
    c = SimpleNamespace(**cfg)
    frac = c.n_attack / max(1, c.n_train + c.n_attack)
    err = 0.05 + 0.5 * frac + 0.02 * _u(key, "e")
    rec = {
        "key": key,
        "config": dict(cfg),
        "versions": {"flatprior": "test"},
        "dataset": c.dataset,
        "n_train": c.n_train,
        "n_attack": c.n_attack,
        "n_test": c.n_test,
        "seed": c.seed,
        "optimizer": c.optimizer,
        "model": c.model,
        "status": "zero_error",
        "epochs_to_zero_error": 10 + c.n_attack // 10,
        "train_error": 0.0,
        "test_error": err,
        "log_prior": -100.0 - 1000.0 * err + 5 * _u(key, "p"),
        "sharpness": math.exp(2 * err + 0.3 * _u(key, "s")),
        "wall_time_s": 0.0,
        "history": [],
    }
    return rec


def slow_run(cfg: dict) -> dict:
    """fake_record after a short sleep (FAKE_RUN_SLEEP seconds, default 0.3)."""
    time.sleep(float(os.environ.get("FAKE_RUN_SLEEP", "0.3")))
    return fake_record(cfg)


def flaky_run(cfg: dict) -> dict:
    """Fails for odd seeds (unless FAKE_RUN_HEAL is set), else fake_record."""
    if cfg["seed"] % 2 and not os.environ.get("FAKE_RUN_HEAL"):
        raise RuntimeError(f"synthetic failure for seed {cfg['seed']}")
    return fake_record(cfg)


def nan_run(cfg: dict) -> dict:
    """A record with NaN/inf numbers (must still be stored, as nulls)."""
    rec = fake_record(cfg)
    rec["sharpness"] = float("nan")
    rec["extra"] = [1.0, float("inf")]
    return rec
