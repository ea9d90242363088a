"""Exact / Monte-Carlo orthant references vs closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flatprior.errors import FlatpriorError
from flatprior.prior import exact_log_orthant_prob, mc_log_orthant_prob, orthant_prob_closed_form


def _corr3(seed):
    a = np.random.default_rng(seed).standard_normal((3, 4))
    return a @ a.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_matches_closed_form_n3(seed):
    K = _corr3(seed)
    for y in ([1, 1, 1], [1, -1, 1], [0, 0, 1]):
        p = orthant_prob_closed_form(K, y)
        r = exact_log_orthant_prob(K, y, rel_tol=1e-4)
        assert r.rel_err <= 1e-4
        assert r.prob == pytest.approx(p, rel=3e-4)
        assert r.log_prob == pytest.approx(math.log(p), abs=3e-4)


def test_closed_forms_small_n():
    assert orthant_prob_closed_form([[2.0]], [0]) == 0.5
    K = np.array([[1.0, 0.6], [0.6, 1.0]])
    sheppard = math.asin(0.6) / (2 * math.pi)
    assert orthant_prob_closed_form(K, [1, 1]) == pytest.approx(0.25 + sheppard)
    assert orthant_prob_closed_form(K, [1, -1]) == pytest.approx(0.25 - sheppard)
    r = exact_log_orthant_prob(K, [1, 1])
    assert r.log_prob == pytest.approx(math.log(0.25 + sheppard), abs=1e-14)
    # the four sign patterns of n = 2 sum to one
    total = sum(orthant_prob_closed_form(K, [a, b]) for a in (-1, 1) for b in (-1, 1))
    assert total == pytest.approx(1.0, abs=1e-14)


def test_exact_independent_coordinates_n10():
    r = exact_log_orthant_prob(np.diag(np.arange(1.0, 11.0)), np.ones(10), rel_tol=1e-4)
    assert r.log_prob == pytest.approx(10 * math.log(0.5), abs=2e-4)


def test_mc_interval_covers_exact_and_is_batch_invariant():
    K = _corr3(4)
    y = [1, -1, -1]
    exact = math.log(orthant_prob_closed_form(K, y))
    a = mc_log_orthant_prob(K, y, 100_000, seed=5, batch=1000)
    b = mc_log_orthant_prob(K, y, 100_000, seed=5, batch=7)
    assert a.hits == b.hits  # the Gaussian stream does not depend on the batch size
    assert a.ci_low <= exact <= a.ci_high
    assert a.log_prob == pytest.approx(exact, abs=4 * a.std_err)


def test_exact_bad_input():
    with pytest.raises(FlatpriorError, match="n <= 20"):
        exact_log_orthant_prob(np.eye(21), np.ones(21))
    with pytest.raises(FlatpriorError, match="symmetric"):
        exact_log_orthant_prob(np.array([[1.0, 0.1], [0.3, 1.0]]), [1, 1])
    with pytest.raises(FlatpriorError, match="length"):
        mc_log_orthant_prob(np.eye(3), [1, 1], 10)
    with pytest.raises(FlatpriorError, match="labels"):
        exact_log_orthant_prob(np.eye(3), [1, 0, -1])
    with pytest.raises(FlatpriorError, match="n_samples"):
        mc_log_orthant_prob(np.eye(3), [1, 1, 1], 0)
