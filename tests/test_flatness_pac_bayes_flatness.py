"""PAC-Bayes flatness against closed forms on linear models with Gaussian weight noise."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import optimize, stats
from torch import nn

from flatprior.errors import FlatpriorError
from flatprior.flatness.pac_bayes_flatness import pac_bayes_flatness

MSE = nn.MSELoss()
BCE = nn.BCEWithLogitsLoss()


def _linear(d: int = 5, n: int = 40, seed: int = 0, classify: bool = False):
    torch.manual_seed(seed)
    net = nn.Linear(d, 1).double()
    x = torch.randn(n, d, dtype=torch.float64)
    if classify:  # labels of a teacher; the net is the teacher plus a little noise
        teacher = torch.randn(d, dtype=torch.float64)
        y = (x @ teacher > 0.3).double().reshape(-1, 1)
        with torch.no_grad():
            net.weight.copy_(teacher + 0.3 * torch.randn(d, dtype=torch.float64))
            net.bias.fill_(-0.3)
    else:
        y = torch.randn(n, 1, dtype=torch.float64)
    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    w0 = torch.cat([net.weight.detach().reshape(-1), net.bias.detach()])
    return net, x, y, xt, w0


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_linear_gaussian_mse_closed_form(magnitude_aware):
    # MSE of a linear model: E_u[L(w + u)] - L(w) = sum_i q_i s_i^2, q_i = mean_n xt_ni^2
    # plain: s_i = sigma -> sigma'^2 = target / sum q;
    # magnitude-aware: s_i^2 = sigma^2 w_i^2 + eps^2
    #   -> sigma'^2 = (target - eps^2 sum q) / sum q w^2
    net, x, y, xt, w0 = _linear()
    q = (xt**2).mean(0)
    target, eps = 0.1, 1e-3
    if magnitude_aware:
        exact = float((q * w0**2).sum()) / (target - eps**2 * float(q.sum()))
    else:
        exact = float(q.sum()) / target
    res = pac_bayes_flatness(net, MSE, x, y, target, magnitude_aware, n_samples=200, rtol=1e-2,
                             seed=1, return_details=True)
    lo, hi = res.value_ci
    assert lo <= exact <= hi
    assert res.value == pytest.approx(exact, rel=0.1)
    assert res.value == pytest.approx(1 / res.sigma**2)
    assert res.sigma_ci[0] <= res.sigma <= res.sigma_ci[1]
    assert res.increase_ci[0] <= target <= res.increase_ci[1]
    # the float path returns the same sigma' (same draws, same bisection)
    plain = pac_bayes_flatness(net, MSE, x, y, target, magnitude_aware, n_samples=200,
                               rtol=1e-2, seed=1)
    assert plain == res.value


def test_zero_one_error_closed_form():
    # error of a linear classifier under u ~ N(0, sigma^2 I): example n flips with probability
    # Phi(-|m_n| / (sigma ||xt_n||)), m_n its margin -> solve E[err] - err(w) = target.
    net, x, y, xt, w0 = _linear(n=60, classify=True)
    m = xt @ w0
    correct = ((m > 0).double() == y.reshape(-1))
    base = 1 - float(correct.double().mean())
    norms = xt.norm(dim=1)

    def rise(sigma):
        p_flip = stats.norm.cdf(-(m.abs() / (sigma * norms)).numpy())
        err = torch.where(correct, torch.tensor(p_flip), 1 - torch.tensor(p_flip))
        return float(err.mean()) - base

    sigma = optimize.brentq(lambda s: rise(s) - 0.1, 1e-6, 1e3, xtol=1e-12)
    res = pac_bayes_flatness(net, BCE, x, y, 0.1, metric="error", n_samples=300, rtol=1e-2,
                             seed=2, return_details=True)
    assert res.sigma_ci[0] <= sigma <= res.sigma_ci[1]
    assert res.sigma == pytest.approx(sigma, rel=0.1)
    assert res.base == pytest.approx(base)


def test_unreachable_target_and_bad_inputs_one_line():
    net, x, y, _, _ = _linear(classify=True)
    cases = [
        lambda: pac_bayes_flatness(net, BCE, x, y, target=0.0),
        lambda: pac_bayes_flatness(net, BCE, x, y, metric="accuracy"),
        lambda: pac_bayes_flatness(net, BCE, x, y, n_samples=1),
        lambda: pac_bayes_flatness(net, BCE, x, y[:3]),
        # the 0-1 error cannot rise by more than 1 - error: the bracket search must say so
        lambda: pac_bayes_flatness(net, BCE, x, y, target=1.5, metric="error"),
    ]
    for case in cases:
        with pytest.raises(FlatpriorError) as err:
            case()
        assert "\n" not in str(err.value)
    assert math.isfinite(pac_bayes_flatness(net, BCE, x, y, target=0.05, n_samples=4))
