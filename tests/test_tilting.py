"""Tests of the minimax-tilting / EP-guided SMC estimator of log P(f) (flatprior.prior.tilting).

References: closed forms (n <= 3), one-factor kernels (exact by 1-D quadrature), Genz
integration (small random kernels), plain Monte-Carlo on the GP (Boolean constant function).
Coverage of the 95 % interval is tested over many seeds, not on one draw.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import log_ndtr

from flatprior.errors import FlatpriorError
from flatprior.prior.exact import (
    exact_log_orthant_prob,
    mc_log_orthant_prob,
    orthant_prob_closed_form,
)
from flatprior.prior.tilting import (
    TiltingConvergenceWarning,
    TiltingResult,
    _ep_proposal,
    _hazard,
    _sample_log_weights,
    _setup,
    log_prior_tilting,
)


def factor_kernel(b: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``K = b bᵀ + diag(d²)``: z_i = b_i g + d_i e_i with one common factor g."""
    return np.outer(b, b) + np.diag(d * d)


def factor_log_prob(b: np.ndarray, d: np.ndarray, y: np.ndarray) -> float:
    """Exact ``log P(sign z = y)`` for a one-factor kernel: ``∫ φ(g) Π Φ(y_i b_i g / d_i) dg``."""
    c = y * b / d

    def logf(g: float) -> float:
        return -0.5 * g * g - 0.5 * math.log(2 * math.pi) + float(np.sum(log_ndtr(c * g)))

    grid = np.linspace(-10, 10, 2001)
    vals = np.array([logf(g) for g in grid])
    shift = float(vals.max())
    g0 = float(grid[vals.argmax()])
    val, _ = quad(lambda g: math.exp(logf(g) - shift), -12, 12, points=[g0], limit=200,
                  epsabs=0, epsrel=1e-11)
    return shift + math.log(val)


def boolean_kernel() -> np.ndarray:
    from flatprior.prior.kernels import arccos_kernel

    x = np.array(list(itertools.product([0.0, 1.0], repeat=7)))
    return arccos_kernel(x, depth=2, sigma_w2=1.0, sigma_b2=1.0).numpy()


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def test_hazard_matches_definition_and_tail_series():
    c = np.array([-30.0, -3.0, 0.0, 2.0, 10.0, 39.0, 41.0, 300.0])
    h, dh = _hazard(c)
    # direct definition where it is accurate
    direct = np.exp(-0.5 * c[:6] ** 2 - 0.5 * math.log(2 * math.pi) - log_ndtr(-c[:6]))
    np.testing.assert_allclose(h[:6], direct, rtol=1e-12)
    assert abs(h[2] - math.sqrt(2 / math.pi)) < 1e-15
    # h' = h (h - c) in (0, 1), increasing towards 1; continuous across the series switch
    assert np.all((dh > 0) & (dh < 1)) and np.all(np.diff(dh) > 0)
    h40a, dh40a = _hazard(np.array([40.0 - 1e-9]))
    h40b, dh40b = _hazard(np.array([40.0 + 1e-9]))
    assert abs(dh40a[0] - dh40b[0]) < 1e-9 and abs(h40a[0] - h40b[0]) < 1e-8
    # finite differences of h match h'
    eps = 1e-6
    for c0 in (-1.0, 0.5, 5.0, 60.0):
        num = (_hazard(np.array([c0 + eps]))[0] - _hazard(np.array([c0 - eps]))[0]) / (2 * eps)
        assert abs(num[0] - _hazard(np.array([c0]))[1][0]) < 1e-6


def test_tilting_saddle_point_and_bounded_weights():
    """At (x*, μ*) the gradient vanishes; every log-weight is ≤ ψ* (Botev 2017, Thm 1)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((9, 11))
    k = a @ a.T
    sd = np.sqrt(np.diag(k))
    y = rng.choice([-1.0, 1.0], 9)
    sigma = np.outer(y, y) * k / np.outer(sd, sd)
    tl = _setup(sigma, np.zeros(9), tol=1e-14, max_iter=100)
    assert tl.converged and tl.grad_norm < 1e-6
    logw = _sample_log_weights(tl, 5000, np.random.SeedSequence(1))
    assert float(logw.max()) <= tl.psi + 1e-9
    ref = exact_log_orthant_prob(k, y, rel_tol=1e-3)
    assert ref.log_prob <= tl.psi + 5 * ref.rel_err  # deterministic upper bound


def test_ep_proposal_identity_pointwise():
    """N(x; 0, Σ) Π t_i(x_i) = Z_q N(x; m, V) holds for every x (so the SMC weights are exact)."""
    rng = np.random.default_rng(3)
    n = 12
    b = rng.uniform(0.5, 1.5, n)
    d = rng.uniform(0.3, 1.0, n)
    k = factor_kernel(b, d)
    y = rng.choice([-1.0, 1.0], n)
    sd = np.sqrt(np.diag(k))
    sigma = np.outer(y, y) * k / np.outer(sd, sd)
    prop = _ep_proposal(k, y, sigma, 1e-8)
    p = prop.perm
    sp = sigma[np.ix_(p, p)]
    v = prop.C @ prop.C.T

    def log_gauss(x, mean, cov):
        l_ = np.linalg.cholesky(cov)
        e = np.linalg.solve(l_, x - mean)
        return -0.5 * e @ e - np.log(np.diag(l_)).sum() - 0.5 * n * math.log(2 * math.pi)

    for _ in range(5):
        x = rng.standard_normal(n) * 2
        lhs = log_gauss(x, 0, sp) + np.sum(-0.5 * prop.tau * x * x + prop.nu * x)
        rhs = prop.log_zq + log_gauss(x, prop.m, v)
        assert abs(lhs - rhs) < 1e-8


# --------------------------------------------------------------------------------------------
# accuracy against exact references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proposal", ["minimax", "ep"])
def test_closed_form_small_n(proposal):
    rng = np.random.default_rng(5)
    for n in (1, 2, 3):
        a = rng.standard_normal((n, n + 1))
        k = a @ a.T
        y = rng.choice([-1, 1], n)
        exact = math.log(orthant_prob_closed_form(k, y))
        if proposal == "ep" and n == 1:
            continue
        r = log_prior_tilting(k, y, n_samples=2000, proposal=proposal)
        assert isinstance(r, TiltingResult) and r.converged
        assert abs(r.log_prob - exact) <= 4 * r.std_err + 1e-12, (n, r.log_prob, exact)


def _coverage_cases():
    rng = np.random.default_rng(123)
    cases = []
    a = rng.standard_normal((6, 6))
    k = a @ a.T + 0.1 * np.eye(6)
    y = rng.choice([-1.0, 1.0], 6)
    cases.append((k, y, exact_log_orthant_prob(k, y, rel_tol=1e-5).log_prob))
    for n, rho in ((12, 0.9), (15, None)):
        b = np.full(n, math.sqrt(rho)) if rho else rng.uniform(0.5, 2.0, n)
        d = np.full(n, math.sqrt(1 - rho)) if rho else rng.uniform(0.2, 1.0, n)
        y = rng.choice([-1.0, 1.0], n)
        cases.append((factor_kernel(b, d), y, factor_log_prob(b, d, y)))
    return cases


def test_factor_reference_matches_genz():
    """The quadrature reference used for coverage agrees with Genz integration."""
    rng = np.random.default_rng(9)
    b = rng.uniform(0.5, 2.0, 7)
    d = rng.uniform(0.2, 1.0, 7)
    y = rng.choice([-1.0, 1.0], 7)
    genz = exact_log_orthant_prob(factor_kernel(b, d), y, rel_tol=1e-5)
    assert abs(genz.log_prob - factor_log_prob(b, d, y)) < 5 * genz.rel_err + 1e-6


@pytest.mark.parametrize(("proposal", "n_seeds", "n_samples"), [("minimax", 100, 100),
                                                                 ("ep", 40, 800)])
def test_interval_coverage_over_seeds(proposal, n_seeds, n_samples):
    """The 95 % interval covers the exact log P at the nominal rate (binomial ±3.5 sd)."""
    hits = total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TiltingConvergenceWarning)
        for k, y, ref in _coverage_cases():
            for seed in range(n_seeds):
                r = log_prior_tilting(k, y, n_samples=n_samples, seed=seed, proposal=proposal,
                                      n_threads=1)
                hits += r.ci_low <= ref <= r.ci_high
                total += 1
    cov = hits / total
    tol = 3.5 * math.sqrt(0.95 * 0.05 / total)
    assert abs(cov - 0.95) <= tol, f"{proposal}: coverage {cov:.3f} over {total} intervals"


def test_boolean_constant_function_vs_gp_monte_carlo_and_ep():
    """FCN 7-40-40-1 (σ_w = σ_b = 1), all 128 Boolean inputs: the constant function.

    Plain MC on the GP gives log P ≈ −1.03 (issue #9). Tilting must agree within its interval
    plus the MC error; EP (damped; undamped EP oscillates here) is ≈ −1.48, far outside it.
    """
    k = boolean_kernel()
    mc = mc_log_orthant_prob(k, np.ones(128), n_samples=200_000, seed=1)
    for sign in (1.0, -1.0):
        r = log_prior_tilting(k, sign * np.ones(128), n_samples=4000, seed=2)
        assert r.converged and r.reliable
        assert abs(r.log_prob - mc.log_prob) <= 1.96 * math.hypot(r.std_err, mc.std_err) + 0.01
        assert abs(r.log_prob - (-1.03)) < 0.05
        assert r.log_upper_bound >= r.ci_low
    from flatprior.prior.ep import log_prior_ep

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = log_prior_ep(k, np.ones(128), damping=0.5)
    assert ep.log_prob < r.ci_low - 0.3, f"EP {ep.log_prob:.3f} vs tilting {r.log_prob:.3f}"


def test_api_entry_point_and_determinism():
    from flatprior.prior.api import log_prior

    rng = np.random.default_rng(2)
    a = rng.standard_normal((10, 12))
    k = a @ a.T
    y = rng.choice([0, 1], 10)
    r1 = log_prior(k, y, method="tilting", n_samples=500, seed=4)
    r2 = log_prior_tilting(k, y, n_samples=500, seed=4, n_threads=1, batch_size=100)
    r3 = log_prior_tilting(k, y, n_samples=500, seed=4, n_threads=2, batch_size=100)
    assert isinstance(r1, TiltingResult)
    assert r2.log_prob == r3.log_prob and r2.std_err == r3.std_err
    r4 = log_prior_tilting(k, y, n_samples=500, seed=5, batch_size=100)
    assert r4.log_prob != r2.log_prob
    e1 = log_prior_tilting(k, y, n_samples=320, seed=4, proposal="ep", n_threads=1)
    e2 = log_prior_tilting(k, y, n_samples=320, seed=4, proposal="ep", n_threads=2)
    assert e1.log_prob == e2.log_prob and e1.proposal == "ep" and math.isfinite(e1.ep_log_prob)
    # torch input, {0,1} labels and {±1} labels give the same answer
    import torch

    r5 = log_prior_tilting(torch.tensor(k), torch.tensor(2 * y - 1), n_samples=500, seed=4)
    assert r5.log_prob == r1.log_prob


def test_target_se_is_reached():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((8, 9))
    k = a @ a.T
    y = rng.choice([-1, 1], 8)
    r = log_prior_tilting(k, y, n_samples=100, target_se=0.002, proposal="minimax")
    assert r.std_err <= 0.002 and r.n_samples > 100
    r = log_prior_tilting(k, y, n_samples=800, target_se=0.02, proposal="ep")
    assert r.std_err <= 0.02 and r.n_samples > 800


def test_auto_switches_to_ep_when_weights_degenerate():
    """Boolean kernel, random labels: minimax IS weights collapse (ESS < 10 %), auto uses ep;
    for the constant function they do not, and auto keeps minimax. Both estimates agree."""
    k = boolean_kernel()
    y = np.random.default_rng(0).choice([-1.0, 1.0], 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = log_prior_tilting(k, y, n_samples=4000, seed=0)
        mm = log_prior_tilting(k, y, n_samples=4000, seed=0, proposal="minimax")
    assert auto.proposal == "ep" and auto.reliable
    assert mm.proposal == "minimax" and not mm.reliable and mm.ess < 400
    assert abs(auto.log_prob - mm.log_prob) < 4 * math.hypot(auto.std_err, mm.std_err) + 0.05
    assert auto.log_upper_bound >= auto.ci_low
    const = log_prior_tilting(k, np.ones(128), n_samples=2000, seed=0)
    assert const.proposal == "minimax"


def test_non_converged_optimisation_is_reported():
    rng = np.random.default_rng(4)
    b = rng.uniform(0.5, 2.0, 10)
    d = rng.uniform(0.2, 1.0, 10)
    k = factor_kernel(b, d)
    y = rng.choice([-1.0, 1.0], 10)
    with pytest.warns(TiltingConvergenceWarning, match="did not converge"):
        r = log_prior_tilting(k, y, n_samples=4000, max_iter=1, tol=1e-14, proposal="minimax")
    assert not r.converged and math.isnan(r.log_upper_bound)
    ref = factor_log_prob(b, d, y)
    assert abs(r.log_prob - ref) <= 5 * r.std_err + 0.01  # still unbiased, only noisier


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "y", "kwargs", "match"),
    [
        (np.ones((2, 3)), [1, 1], {}, "square"),
        (np.array([[1.0, 0.5], [0.2, 1.0]]), [1, 1], {}, "symmetric"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), [1, 1], {}, "NaN"),
        (np.eye(2), [1, 2], {}, "labels"),
        (np.eye(3), [1, 1], {}, "length"),
        (np.array([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]]), [1, 1, 1], {},
         "positive semidefinite"),
        (np.diag([1.0, 0.0]), [1, 1], {}, "diagonal"),
        (np.eye(2), [1, 1], {"proposal": "ecp"}, "did you mean"),
        (np.eye(2), [1, 1], {"n_samples": 1}, "n_samples"),
        (np.eye(2), [1, 1], {"confidence": 1.5}, "confidence"),
        (np.eye(2), [1, 1], {"target_se": -1.0}, "target_se"),
        (np.eye(2), [1, 1], {"n_replicates": 2}, "n_replicates"),
    ],
)
def test_bad_input_one_line_errors(k, y, kwargs, match):
    with pytest.raises(FlatpriorError, match=match) as info:
        log_prior_tilting(k, y, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1000, 2000])
def test_large_n_equicorrelated_against_quadrature(n):
    """Equicorrelated kernel (one factor, exact by quadrature), mixed labels, n up to 2000."""
    rho = 0.95
    y = np.random.default_rng(1).choice([-1.0, 1.0], n)
    k = rho * np.ones((n, n)) + (1 - rho) * np.eye(n)
    ref = factor_log_prob(np.full(n, math.sqrt(rho)), np.full(n, math.sqrt(1 - rho)), y)
    r = log_prior_tilting(k, y, n_samples=4000, target_se=0.02)
    assert r.proposal == "minimax" and r.reliable and r.std_err <= 0.02
    assert abs(r.log_prob - ref) <= 4 * r.std_err + 0.01
    assert r.log_upper_bound >= ref
