"""Arc-cosine NNGP kernel vs closed forms / quadrature, and the Monte-Carlo kernel vs it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flatprior.errors import FlatpriorError
from flatprior.prior import arccos_kernel, empirical_kernel


def _x(n=30, d=12, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


def test_arccos_symmetric_psd_float64_and_chunk_invariant():
    x = _x()
    K = arccos_kernel(x)
    assert K.dtype == torch.float64 and K.shape == (30, 30)
    Kn = K.numpy()
    assert np.array_equal(Kn, Kn.T)
    assert np.linalg.eigvalsh(Kn).min() > -1e-10 * np.abs(Kn).max()
    np.testing.assert_allclose(arccos_kernel(x, chunk_size=7).numpy(), Kn, rtol=1e-13, atol=1e-13)
    # cross-kernel agrees with the blocks of the full kernel; [n, ...] inputs are flattened
    Kc = arccos_kernel(x[:5], x2=x[5:12]).numpy()
    np.testing.assert_allclose(Kc, Kn[:5, 5:12], rtol=1e-12)
    x3 = x.reshape(30, 3, 4)
    np.testing.assert_allclose(arccos_kernel(x3).numpy(), Kn, rtol=1e-13)


@pytest.mark.parametrize("sw2,sb2", [(2.0, 1.0), (1.0, 0.5)])
def test_arccos_diagonal_closed_form(sw2, sb2):
    x = _x()
    d = x.shape[1]
    k0 = sb2 + sw2 * (x * x).sum(1) / d
    np.testing.assert_allclose(np.diag(arccos_kernel(x, 0, sw2, sb2).numpy()), k0, rtol=1e-13)
    k = k0
    for depth in (1, 2, 3):
        k = sb2 + sw2 / 2 * k  # E[relu(u)^2] = Var(u) / 2
        np.testing.assert_allclose(np.diag(arccos_kernel(x, depth, sw2, sb2).numpy()), k,
                                   rtol=1e-13)
    # depth 0 off-diagonal: the linear kernel
    np.testing.assert_allclose(arccos_kernel(x, 0, sw2, sb2).numpy(), sb2 + sw2 * x @ x.T / d,
                               rtol=1e-12)


def test_arccos_depth1_matches_quadrature():
    # K1(x, x') = sb2 + sw2 E[relu(u) relu(v)], (u, v) ~ N(0, K0 restricted to {x, x'});
    # E[relu(v) | u] = m Phi(m/s) + s phi(m/s) (smooth), then integrate over u > 0 with quad
    from scipy.integrate import quad
    from scipy.stats import norm

    x = _x(n=4, d=6, seed=3)
    sw2, sb2 = 2.0, 1.0
    K0 = arccos_kernel(x, 0, sw2, sb2).numpy()
    K1 = arccos_kernel(x, 1, sw2, sb2).numpy()
    for i, j in [(0, 1), (1, 2), (0, 3)]:
        a, b, c = K0[i, i], K0[j, j], K0[i, j]
        s = math.sqrt(b - c * c / a)

        def integrand(u, a=a, c=c, s=s):
            m = c / a * u
            return u * (m * norm.cdf(m / s) + s * norm.pdf(m / s)) * norm.pdf(u / math.sqrt(a))

        e = quad(integrand, 0, np.inf, epsabs=1e-13, epsrel=1e-12)[0] / math.sqrt(a)
        assert K1[i, j] == pytest.approx(sb2 + sw2 * e, rel=1e-9)


def _fcn_factory(d, width, sw2=2.0, sb2=1.0):
    def make(seed: int) -> nn.Module:
        g = torch.Generator().manual_seed(seed)
        net = nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                            nn.Linear(width, 1))
        with torch.no_grad():
            for m in net:
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, math.sqrt(sw2 / m.in_features), generator=g)
                    m.bias.normal_(0.0, math.sqrt(sb2), generator=g)
        return net

    return make


def test_empirical_kernel_converges_to_arccos():
    x = torch.as_tensor(_x(n=16, d=10, seed=1), dtype=torch.float32)
    exact = arccos_kernel(x, depth=2).numpy()

    def err(width, draws):
        K = empirical_kernel(_fcn_factory(10, width), x, draws, seed=7).numpy()
        return np.abs(K - exact).max() / np.abs(exact).max()

    errors = [err(16, 2), err(128, 8), err(512, 32)]
    # width x draws grows 32 -> 1024 -> 16384: error must shrink each time (MC ~ 1/sqrt)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.03


def test_empirical_kernel_feature_fn_and_eval_mode():
    x = torch.randn(8, 5)

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))

    K1 = empirical_kernel(make, x, 3, chunk_size=3)
    K2 = empirical_kernel(make, x, 3, chunk_size=8)  # eval-mode BN: chunking is irrelevant
    torch.testing.assert_close(K1, K2, rtol=1e-6, atol=1e-8)
    K3 = empirical_kernel(make, x, 3, feature_fn=lambda m, xb: m[:3](xb))
    torch.testing.assert_close(K1, K3, rtol=1e-6, atol=1e-8)
    assert K1.dtype == torch.float64
    with pytest.raises(FlatpriorError, match="last module"):
        empirical_kernel(lambda s: nn.Sequential(nn.Linear(5, 3), nn.ReLU()), x, 1)


def test_kernel_bad_input():
    with pytest.raises(FlatpriorError, match="depth"):
        arccos_kernel(_x(), depth=-1)
    with pytest.raises(FlatpriorError, match="NaN"):
        arccos_kernel(np.full((3, 2), np.nan))
    with pytest.raises(FlatpriorError, match="features"):
        arccos_kernel(_x(), x2=_x(d=3))
    with pytest.raises(FlatpriorError, match="sigma_w2"):
        arccos_kernel(_x(), sigma_w2=0.0)
