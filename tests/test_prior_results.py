"""Every log P(f) method returns a LogPriorResult; the pipeline reads only that protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flatprior.prior import LOG_PRIOR_METHODS, LogPriorResult, log_prior, orthant_prob_closed_form

# three points: the closed form (Sheppard / Plackett) is the exact reference
K3 = np.array([[1.0, 0.5, 0.2], [0.5, 1.0, 0.3], [0.2, 0.3, 1.0]])
Y3 = np.array([1, 1, -1])
OPTS = {"ep": {}, "exact": {"rel_tol": 1e-4}, "mc": {"n_samples": 200_000, "seed": 1},
        "tilting": {"n_samples": 20_000, "seed": 1}}


@pytest.mark.parametrize("method", sorted(LOG_PRIOR_METHODS))
def test_every_method_returns_the_protocol(method):
    res = log_prior(K3, Y3, method=method, **OPTS[method])
    assert isinstance(res, LogPriorResult)
    exact = math.log(orthant_prob_closed_form(K3, Y3))
    assert res.converged is True or res.converged == np.True_
    if method == "ep":  # deterministic: no sampling error, no interval
        assert res.std_err is None and res.ci_low is None and res.ci_high is None
        assert abs(res.log_prob - exact) < 0.05 * abs(exact)  # EP's approximation error
        return
    assert 0 < res.std_err < 0.02
    assert abs(res.log_prob - exact) < 5 * res.std_err + 1e-12
    if res.ci_low is not None:
        assert res.ci_low <= exact <= res.ci_high


def test_exact_reports_not_converged_when_its_point_cap_is_too_small():
    from flatprior.prior import exact_log_orthant_prob

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 8))
    K = a @ a.T + 0.1 * np.eye(8)
    y = np.array([1, -1, 1, -1, 1, 1, -1, 1])
    res = exact_log_orthant_prob(K, y, rel_tol=1e-9, max_points=20_000)
    assert res.converged is False and res.rel_err > 1e-9


def test_large_factorisations_run_on_one_blas_thread(monkeypatch):
    """Threaded OpenBLAS dpotrf segfaults at n = 20 000 on 2 threads (measured): above
    SINGLE_THREAD_ABOVE_N the PSD check and EP factorise on one BLAS thread."""
    import scipy.linalg.lapack as lapack_mod
    from threadpoolctl import threadpool_info

    from flatprior.prior import _threads, log_prior_ep

    assert _threads.factorisation_threads(10_000, None) is None
    assert _threads.factorisation_threads(10_001, None) == 1
    assert _threads.factorisation_threads(10_001, 2) == 1
    seen = []
    real = lapack_mod.dpotrf

    def spy(*a, **k):
        seen.append(max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"))
        return real(*a, **k)

    monkeypatch.setattr(lapack_mod, "dpotrf", spy)
    monkeypatch.setattr(_threads, "SINGLE_THREAD_ABOVE_N", 40)  # a small "large" n
    K = 0.5 * np.eye(50) + 0.5
    r = log_prior_ep(K, np.ones(50), n_threads=2)
    assert r.converged and len(seen) >= 2 and set(seen) == {1}  # check_psd and EP's updates
