"""EP over many label vectors on one kernel (log_prior_ep_batch) vs the single-function EP.

The batched EP must return, for every row, exactly what ``log_prior_ep`` returns for that row
alone: every field of the EPResult (log P, sites, posterior moments, iteration count, stop
rule, damping, history). The functions below need different numbers of sweeps (8 to 50, some
damped), so a row that stops early must stay frozen while the others go on.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from flatprior.errors import FlatpriorError
from flatprior.prior import (
    arccos_kernel,
    boolean_inputs,
    log_prior,
    log_prior_ep,
    log_prior_ep_batch,
    orthant_prob_closed_form,
)
from flatprior.prior.api import log_prior_distinct


def _boolean_kernel() -> np.ndarray:
    """The fig2-boolean NNGP kernel: FCN 7-40-40-1, sigma_w^2 = sigma_b^2 = 1, on {0,1}^7."""
    x = torch.as_tensor(np.asarray(boolean_inputs(7)), dtype=torch.float64)
    return arccos_kernel(x, depth=2, sigma_w2=1.0, sigma_b2=1.0).numpy()


def _functions(K: np.ndarray, n_gp: int, seed: int = 0) -> np.ndarray:
    """GP-drawn (typical, smooth) functions, random ones, the constants, a few near-constants."""
    rng = np.random.default_rng(seed)
    n = K.shape[0]
    chol = np.linalg.cholesky(K + 1e-9 * np.eye(n))
    gp = np.sign(chol @ rng.standard_normal((n, n_gp))).T
    near = np.ones((3, n))
    near[np.arange(3), rng.choice(n, 3, replace=False)] = -1.0
    return np.vstack([gp, rng.choice([-1.0, 1.0], (3, n)), np.ones(n), -np.ones(n), near])


def _identical(a, b) -> list[str]:
    """Names of the EPResult fields where ``a`` and ``b`` differ (arrays: element for element)."""
    bad = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        same = np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
        if not same:
            bad.append(f.name)
    return bad


def test_batch_equals_single_ep_bit_for_bit_on_the_boolean_kernel():
    K = _boolean_kernel()
    Y = _functions(K, 40)
    batch = log_prior_ep_batch(K, Y)
    single = [log_prior_ep(K, y) for y in Y]
    assert len(batch) == len(Y)
    for i, (b, s) in enumerate(zip(batch, single, strict=True)):
        assert _identical(b, s) == [], (i, _identical(b, s))
    # the rows really stop at different sweeps, some damped, all converged
    iters = {s.n_iter for s in single}
    assert len(iters) >= 4 and max(iters) >= 2 * min(iters)
    assert any(s.damping > 0 for s in single) and any(s.damping == 0 for s in single)
    assert all(s.converged for s in single)
    # the API's results carry no sampling error (the LogPriorResult protocol)
    assert batch[0].std_err is None and batch[0].ci_low is None and batch[0].ci_high is None


@pytest.mark.parametrize("options", [
    {"anderson": 0},
    {"tol_log_prob": 1e-7},
    {"max_iter": 10},  # rows stop at max_iter unconverged, others converge before
    {"likelihood": "probit"},
    {"damping": 0.3, "adaptive_damping": False},
    {"warm_start": "nystrom", "warm_rank": 24},
    {"jitter": 1e-6, "tol": 1e-10},
])
def test_batch_equals_single_with_every_option(options):
    K = _boolean_kernel()
    Y = _functions(K, 6, seed=1)
    batch = log_prior_ep_batch(K, Y, **options)
    for y, b in zip(Y, batch, strict=True):
        s = log_prior_ep(K, y, **options)
        assert _identical(b, s) == []
    if "max_iter" in options:
        assert {b.stop_rule for b in batch} == {"sites", "max_iter"}
    if "tol_log_prob" in options:
        assert "log_prob" in {b.stop_rule for b in batch}


def test_one_row_duplicates_and_label_conventions():
    K = _boolean_kernel()
    y = _functions(K, 1)[0]
    (one,) = log_prior_ep_batch(K, y[None, :])
    assert _identical(one, log_prior_ep(K, y)) == []
    # duplicate rows, the {0, 1} form of the same function, a torch tensor: all the same result
    y01 = (y > 0).astype(float)
    rows = log_prior_ep_batch(torch.as_tensor(K), torch.as_tensor(np.vstack([y, y, y01, -y])))
    assert _identical(rows[0], rows[1]) == [] and _identical(rows[0], rows[2]) == []
    # z -> -z symmetry: flipping every label gives the same orthant probability
    assert rows[3].log_prob == pytest.approx(rows[0].log_prob, rel=1e-9)
    # rows of all ones / all zeros are read per row as the single path reads them
    ones, zeros = log_prior_ep_batch(K, np.vstack([np.ones(128), np.zeros(128)]))
    assert ones.log_prob == log_prior_ep(K, np.ones(128)).log_prob
    assert zeros.log_prob == log_prior_ep(K, -np.ones(128)).log_prob


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_orthant_references_small_n(seed):
    # n = 3 Wishart kernels (tests/test_prior_exact.py): every labelling against the closed
    # form; EP's own error there is <= 2.5 % of ln P (measured worst 2.1 %, test_prior_ep.py)
    a = np.random.default_rng(seed).standard_normal((3, 4))
    K = a @ a.T
    Y = np.array([[s0, s1, s2] for s0 in (-1, 1) for s1 in (-1, 1) for s2 in (-1, 1)], float)
    for y, r in zip(Y, log_prior_ep_batch(K, Y), strict=True):
        exact = math.log(orthant_prob_closed_form(K, y))
        assert abs(r.log_prob - exact) <= 0.025 * abs(exact)
        assert _identical(r, log_prior_ep(K, y)) == []


def test_exact_cases_independent_and_two_points():
    # EP is exact for independent coordinates: P = 2^-n for every one of the 2^4 labellings
    Y = np.array([[(k >> b) & 1 for b in range(4)] for k in range(16)], float)
    for r in log_prior_ep_batch(np.diag([1.0, 2.0, 5.0, 0.1]), Y):
        assert r.log_prob == pytest.approx(4 * math.log(0.5), abs=1e-10)
    # n = 2 weakly correlated: within 2e-5 of Sheppard's formula (as test_prior_ep.py)
    K = np.array([[1.0, 0.1], [0.1, 1.0]])
    for y, r in zip([[1, 1], [1, -1]], log_prior_ep_batch(K, [[1, 1], [1, -1]]), strict=True):
        assert r.log_prob == pytest.approx(math.log(orthant_prob_closed_form(K, y)), abs=2e-5)


def test_ill_conditioned_rows_equal_single_path():
    # near-duplicate inputs with opposite labels: sites ~1e12, rounding-sensitive iteration;
    # the batch still reproduces the single path exactly (same iterations, same value)
    for r in (1 - 1e-13, 1 - 1e-11):
        K = np.array([[1.0, r, 0.3], [r, 1.0, 0.3], [0.3, 0.3, 1.0]])
        Y = np.array([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])
        for y, b in zip(Y, log_prior_ep_batch(K, Y), strict=True):
            assert _identical(b, log_prior_ep(K, y)) == []


def test_row_whose_factorisation_fails_is_rerun_alone(monkeypatch):
    # a row whose B is not PD goes to the single path (which escalates the jitter as it
    # always does); the other rows are not disturbed
    import flatprior.prior.ep as ep_mod
    import flatprior.prior.ep_batched as batched

    K = _boolean_kernel()[:12, :12]
    Y = _functions(K, 3)
    real = ep_mod._posterior_marginals
    calls = {"n": 0}

    def flaky(K_, diagK, tau, nu, buf):
        calls["n"] += 1
        if calls["n"] == 2:  # the second row's first factorisation
            raise ep_mod._NotPD("simulated")
        return real(K_, diagK, tau, nu, buf)

    monkeypatch.setattr(batched, "_posterior_marginals", flaky)
    res = log_prior_ep_batch(K, Y)
    assert calls["n"] > 2
    for y, r in zip(Y, res, strict=True):
        assert _identical(r, log_prior_ep(K, y)) == []


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.ones(128), r"\[F, n\]"),
        (np.ones((0, 128)), r"F >= 1"),
        (np.ones((2, 127)), "length 127"),
        (np.full((2, 128), 2.0), "row 0 has values"),
        (np.vstack([np.ones(128), np.r_[0.0, -1.0, np.ones(126)]]), "row 1 has values"),
        (np.full((1, 128), 0.5), r"\{0, 1\}"),
        (np.array([["a"] * 128]), "numeric"),
    ],
)
def test_bad_labels_one_line_errors(labels, match):
    with pytest.raises(FlatpriorError, match=match) as info:
        log_prior_ep_batch(_boolean_kernel(), labels)
    assert "\n" not in str(info.value)


def test_bad_kernel_and_impossible_function_one_line_errors():
    with pytest.raises(FlatpriorError, match="square"):
        log_prior_ep_batch(np.ones((2, 3)), np.ones((1, 2)))
    with pytest.raises(FlatpriorError, match="symmetric"):
        log_prior_ep_batch(np.array([[1.0, 0.5], [0.2, 1.0]]), np.ones((1, 2)))
    with pytest.raises(FlatpriorError, match="damping"):
        log_prior_ep_batch(np.eye(2), np.ones((1, 2)), damping=1.0)
    # duplicate inputs 0 and 1: the second function gives them opposite labels, P(f) = 0;
    # the message is the single path's, naming the pair
    K = np.array([[1.0, 1.0, 0.2], [1.0, 1.0, 0.2], [0.2, 0.2, 1.0]])
    with pytest.raises(FlatpriorError, match="identical inputs 0 and 1") as info:
        log_prior_ep_batch(K, [[1, 1, -1], [1, -1, 1]])
    with pytest.raises(FlatpriorError) as single:
        log_prior_ep(K, [1, -1, 1])
    assert str(info.value) == str(single.value)


def test_log_prior_distinct_batches_distinct_rows():
    K = _boolean_kernel()
    Y = _functions(K, 5)
    labels = torch.as_tensor((np.vstack([Y, Y[:3]]) > 0).astype(np.float32))
    res, n = log_prior_distinct(K, labels)
    assert n == len(np.unique(Y, axis=0)) >= 8  # GP draws may repeat the constant functions
    assert res[0] is res[len(Y)] and res[2] is res[len(Y) + 2]
    for r, y in zip(res, labels, strict=True):
        assert _identical(r, log_prior(K, y)) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning on the normal path
        log_prior_distinct(K, labels[:2], method="ep", tol=1e-8)
    with pytest.raises(FlatpriorError, match=r"\[M, n\]"):
        log_prior_distinct(K, labels[0])


@pytest.mark.parametrize("y", [[1, -1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0], [-1, -1, -1],
                               [-1, 0, 1], [0, 2, 1], [0.5, 1, 1]])
def test_one_vector_and_rows_follow_one_labelling_rule(y):
    # log_prior_ep (one y) and the batch (rows) read labels through one function
    from flatprior.errors import FlatpriorError
    from flatprior.prior._validate import as_kernel_and_signs, label_signs

    K = np.eye(3)
    try:
        _, one = as_kernel_and_signs(K, y)
    except FlatpriorError as exc:
        assert "labels y must be in {-1, +1} or {0, 1}" in str(exc)
        with pytest.raises(FlatpriorError, match=r"row 1 has values"):
            label_signs(np.array([[1, 1, 1], y]), 3)
        return
    np.testing.assert_array_equal(label_signs(np.array([y, y]), 3), [one, one])
    assert set(one.tolist()) <= {-1.0, 1.0}
