"""The shared inverse Mills ratio (prior/_mills.py) against a 60-digit reference.

The reference is computed with :mod:`decimal` (no float64 anywhere): ``Φ(z)`` by its Taylor
series ``1/2 + φ(z) Σ z^{2k+1} / (2k+1)!!`` for ``|z| < 6`` and Laplace's continued fraction of
the Mills ratio ``Φ(-x)/φ(x) = 1/(x + 1/(x + 2/(x + 3/(x + ...))))`` for ``|z| >= 6``; then
``r = φ/Φ``, ``1 - r (z + r)`` and ``1 + z (z + r)`` are formed at 60 digits, so nothing cancels.
"""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
from scipy.special import log_ndtr

from flatprior.prior._mills import TAIL, inverse_mills, mills_terms

getcontext().prec = 60


def _pi() -> Decimal:
    """π to the context precision (Machin), so φ is exact to 60 digits."""
    getcontext().prec += 5

    def arctan_inv(x: int) -> Decimal:
        total, term, k, x2 = Decimal(0), Decimal(1) / x, 0, x * x
        while term != 0:
            total += term / (2 * k + 1) * (-1 if k % 2 else 1)
            term /= x2
            k += 1
        return total

    pi = 4 * (4 * arctan_inv(5) - arctan_inv(239))
    getcontext().prec -= 5
    return +pi


_PHI0 = 1 / (2 * _pi()).sqrt()  # φ(0)


def _phi(z: Decimal) -> Decimal:
    return _PHI0 * (-(z * z) / 2).exp()


def _mills_cf(x: Decimal, terms: int = 4000) -> Decimal:
    """Φ(-x)/φ(x) for x > 0 by Laplace's continued fraction (evaluated bottom-up)."""
    t = x
    for k in range(terms, 0, -1):
        t = x + k / t
    return 1 / t


def _cdf(z: Decimal) -> Decimal:
    if abs(z) < 6:
        term, total, k = z, z, 0
        while abs(term) > Decimal(10) ** -70:
            k += 1
            term = term * z * z / (2 * k + 1)
            total += term
        return Decimal("0.5") + _phi(z) * total
    if z < 0:
        return _phi(z) * _mills_cf(-z)
    return 1 - _phi(z) * _mills_cf(z)


def reference(z: float) -> tuple[float, float, float, float]:
    """``(r, 1 - r (z + r), 1 + z (z + r), z + r)`` at 60 digits, rounded to float."""
    zd = Decimal(z)
    r = _phi(zd) / _cdf(zd) if z > -6 else 1 / _mills_cf(-zd)
    g = zd + r
    return float(r), float(1 - r * g), float(1 + zd * g), float(g)


# far lower tail (series region), the switch at -40, the body, the upper tail
Z = np.array([-1e8, -1e5, -1e3, -200.0, -60.0, -40.5, -40.0 - 1e-9, -40.0 + 1e-9, -39.5, -30.0,
              -12.0, -6.5, -5.5, -3.0, -1.0, -1e-3, 0.0, 1e-3, 0.7, 2.0, 5.5, 6.5, 12.0, 25.0])


def test_inverse_mills_matches_60_digit_reference_over_the_whole_line():
    r = inverse_mills(Z)
    want = np.array([reference(float(z))[0] for z in Z])
    # erfcx is accurate to a few ulp; the upper tail inherits exp(z^2/2)'s rounding (~z^2 ulp;
    # measured 1.1e-13 at z = 25)
    rtol = np.maximum(4e-15, 5e-16 * Z**2)
    np.testing.assert_array_less(np.abs(r / want - 1.0), rtol)
    assert r[Z == 0.0][0] == math.sqrt(2 / math.pi)
    # beyond erfcx's range r underflows to 0 (the limit), never NaN
    assert inverse_mills(np.array([1e3]))[0] == 0.0


def test_inverse_mills_matches_log_ndtr_where_that_is_accurate():
    z = np.linspace(-20, 8, 561)
    direct = np.exp(-0.5 * z * z - 0.5 * math.log(2 * math.pi) - log_ndtr(z))
    np.testing.assert_allclose(inverse_mills(z), direct, rtol=1e-13)


def test_mills_terms_match_reference_without_cancellation():
    t = mills_terms(Z)
    ref = np.array([reference(float(z)) for z in Z])
    err_oma = np.abs(t.one_minus_a / ref[:, 1] - 1.0)
    err_h = np.abs(t.h / ref[:, 2] - 1.0)
    # series region (z < -40) and the body: near machine precision (measured <= 6.3e-14); in
    # -40 < z < -5 the direct formulas lose digits as r (z + r) -> 1 (measured 5.1e-10 at the
    # switch; that is why the series take over there)
    near = (Z > -TAIL) & (Z < -5)
    assert err_oma[~near].max() < 1e-13 and err_h[~near].max() < 1e-13
    assert err_oma[near].max() < 1e-9 and err_h[near].max() < 1e-9
    zr = t.z_plus_r
    np.testing.assert_allclose(zr, ref[:, 3], rtol=1e-12, atol=0)
    assert (zr > 0).all() and (t.one_minus_a > 0).all() and (t.one_minus_a <= 1).all()
    # (h - 1) / z = z + r also in the series region
    tail = Z < -TAIL
    np.testing.assert_allclose(zr[tail], (t.h[tail] - 1.0) / Z[tail], rtol=1e-15)


def test_hazard_of_minimax_tilting_is_the_mills_ratio_at_minus_c():
    from flatprior.prior.tilting import _hazard

    c = -Z
    h, dh = _hazard(c)
    t = mills_terms(Z)
    assert np.array_equal(h, t.r) and np.array_equal(dh, t.r * t.z_plus_r)
    ref = np.array([reference(float(z)) for z in Z])
    np.testing.assert_allclose(dh, ref[:, 0] * ref[:, 3], rtol=1e-11)  # h' = r (z + r)


@pytest.mark.parametrize("z", [-1e8, -50.0, 0.0, 3.0])
def test_scalar_input(z):
    t = mills_terms(np.array([z]))
    assert t.r.shape == (1,) and np.isfinite(t.r).all()
