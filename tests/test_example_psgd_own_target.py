"""``examples/psgd_own_target.py`` end to end at small sizes, its numbers recomputed here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


def test_psgd_example_numbers_match_an_independent_count(capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "psgd_own_target.py"
    spec = importlib.util.spec_from_file_location("psgd_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(n_nets=400, n_prior=40_000)
    out = capsys.readouterr().out
    assert "distinct functions" in out
    assert ("Kendall tau(log P_SGD, log P_B)" in out) != ("too few to correlate" in out)
    bits, s_idx = r["bits"], r["s_idx"]
    assert r["n_fit"] == len(bits) == 400  # this target's S is fitted by every network
    # every function SGD stopped at fits S (zero training error): all labels of S are 0 here
    assert not bits[:, s_idx].any()
    assert len(r["functions"]) >= 3  # a few functions, not only the constant one
    # P_SGD: frequencies of the rows
    counts = pd.Series([row.tobytes() for row in bits]).value_counts()
    assert sorted(r["n_found"].tolist()) == sorted(counts.tolist())
    assert r["p_sgd"].sum() == pytest.approx(1.0)
    # P_B(f | S): the prior's count of f over the prior's networks that fit S
    prior = r["prior"]
    fits = prior.consistent(s_idx, np.zeros(len(s_idx), dtype=int))
    n_fit = int(prior.counts[fits].sum())
    assert r["posterior"].n_samples == n_fit
    expect = np.array([prior.count_of(f) for f in r["functions"]]) / n_fit
    np.testing.assert_allclose(r["p_b"], expect, rtol=1e-12)
    # mean sharpness per function: the plain mean over its networks
    df = pd.DataFrame({"f": r["which"], "s": r["sharpness"]})
    np.testing.assert_allclose(r["mean_sharpness"], df.groupby("f")["s"].mean().to_numpy(),
                               rtol=1e-12)
    assert np.all(r["sharpness"] > 0)
