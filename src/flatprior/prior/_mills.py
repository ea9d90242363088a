r"""The inverse Mills ratio of the standard normal and the moments it gives, in both tails.

For ``Z ~ N(0, 1)`` truncated to ``Z > -z`` (equivalently, by symmetry, the tilted
distributions of EP with a Gaussian-CDF likelihood), everything follows from the inverse Mills
ratio

.. math::

    r(z) = \frac{\varphi(z)}{\Phi(z)}, \qquad
    E[Z \mid Z > -z] = r(z), \qquad \mathrm{Var}[Z \mid Z > -z] = 1 - r(z)\,(z + r(z)).

``r`` is computed as ``sqrt(2/pi) / erfcx(-z/sqrt 2)`` (``scipy.special.erfcx``): accurate to a
few ulp for every ``z``, with ``r -> 0`` (not NaN) where ``erfcx`` overflows for large positive
``z``. The two quantities that cancel catastrophically deep in the lower tail, ``1 - r (z + r)``
and ``1 + z (z + r)``, are replaced for ``z < -40`` by their asymptotic series in ``s = 1/z^2``
(from the Mills-ratio expansion ``r(z) ~ -z (1 - s + 2 s^2 - 10 s^3 + ...)^{-1}``; Abramowitz &
Stegun 26.2.12), whose truncation error there is below 1e-13 relative.

Both EP (:mod:`flatprior.prior.ep`, site updates) and minimax tilting
(:mod:`flatprior.prior.minimax_tilting`, the normal hazard ``h(c) = r(-c)``) use this one
implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erfcx

__all__ = ["MillsTerms", "TAIL", "inverse_mills", "mills_terms"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
#: below ``z = -TAIL`` the asymptotic series replace the direct formulas
TAIL = 40.0


def inverse_mills(z) -> np.ndarray:
    r"""``r(z) = φ(z) / Φ(z)`` (float64, shape of ``z``), accurate in both tails.

    ``r(0) = sqrt(2/pi)``; ``r(z) ~ -z`` as ``z -> -inf``; ``r(z) ~ φ(z) -> 0`` as ``z -> +inf``.
    """
    z = np.asarray(z, dtype=np.float64)
    return _SQRT_2_OVER_PI / erfcx(-z / math.sqrt(2.0))  # erfcx overflows to inf -> r = 0, right


@dataclass(frozen=True)
class MillsTerms:
    """Moment ratios of ``N(0, 1)`` truncated to ``(-z, inf)`` (arrays of the shape of ``z``).

    Attributes:
        r: inverse Mills ratio ``φ(z)/Φ(z)``: the truncated mean.
        one_minus_a: ``1 - r (z + r)``: the truncated variance, in ``(0, 1]``.
        h: ``1 + z (z + r)``.
        z_plus_r: ``z + r`` (``>= 0``; equals ``(h - 1) / z`` in the series region).
    """

    r: np.ndarray
    one_minus_a: np.ndarray
    h: np.ndarray
    z_plus_r: np.ndarray


def mills_terms(z) -> MillsTerms:
    """:class:`MillsTerms` of ``z``, without cancellation anywhere (series for ``z < -40``)."""
    z = np.asarray(z, dtype=np.float64)
    r = inverse_mills(z)
    g1 = z + r
    one_minus_a = 1.0 - r * g1
    h = 1.0 + z * g1
    tail = z < -TAIL
    if tail.any():
        zt = z[tail]
        s = 1.0 / (zt * zt)
        one_minus_a[tail] = s * (
            1 + s * (-6 + s * (50 + s * (-518 + s * (6354 + s * (-89782 + s * 1_435_330)))))
        )
        h[tail] = s * (
            2 + s * (-10 + s * (74 + s * (-706 + s * (8162 + s * (-110410 + s * 1_708_394)))))
        )
        g1 = g1.copy() if g1.ndim else np.array(g1)
        g1[tail] = (h[tail] - 1.0) / zt  # z + r = (h - 1) / z, no cancellation
    return MillsTerms(r, one_minus_a, h, g1)
