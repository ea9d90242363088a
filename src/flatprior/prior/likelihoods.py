r"""Likelihoods of the latent GP value ``z_i`` given a label ``y_i ∈ {±1}``, for EP.

As in GPyTorch, a likelihood is an object separate from the inference: EP
(:mod:`flatprior.prior.ep`) only asks it for the moments of the *tilted* distribution

.. math::

    \hat p(z_i) \propto N(z_i \mid m, v)\, p(y_i \mid z_i)

given a cavity ``N(m, v)``: its log normaliser ``log Z_i`` and the Gaussian site that matches
its first two moments. Both likelihoods here are Gaussian CDFs,
``p(y | z) = Φ(y z / sqrt(s2))`` with noise variance ``s2 >= 0``, whose tilted moments are
closed-form through the inverse Mills ratio (:mod:`flatprior.prior._mills`; Rasmussen & Williams
2006, §3.9):

* :class:`HeavisideLikelihood` (``s2 = 0``): ``1[y z > 0]``, the paper's ``P(f)``;
* :class:`ProbitLikelihood` (``s2 > 0``): ``Φ(y z / sqrt(s2))``, GPy's Bernoulli link.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr

from flatprior.errors import FlatpriorError
from flatprior.prior._mills import mills_terms

__all__ = ["GaussianCDFLikelihood", "HeavisideLikelihood", "ProbitLikelihood", "make_likelihood"]


@dataclass(frozen=True)
class GaussianCDFLikelihood:
    """``p(y | z) = Φ(y z / sqrt(noise_var))`` (``noise_var = 0``: the Heaviside step).

    Attributes:
        noise_var: ``s2 >= 0``, in the units of the (scaled) kernel.
    """

    noise_var: float = 0.0

    def standardized_cavity_mean(self, y: np.ndarray, m_cav: np.ndarray,
                                 tau_cav: np.ndarray) -> np.ndarray:
        """``z = y m / sqrt(v + s2)`` for cavities ``N(m, v = 1 / tau_cav)`` (``[n]``)."""
        return y * m_cav * np.sqrt(tau_cav / (1.0 + self.noise_var * tau_cav))

    def log_tilted_normalizer(self, z: np.ndarray) -> np.ndarray:
        """``log Z_i = log ∫ N(z_i | m, v) p(y_i | z_i) dz_i = log Φ(z)`` for standardised ``z``."""
        return log_ndtr(z)

    def site_update(self, z: np.ndarray, y: np.ndarray,
                    tau_cav: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Natural parameters ``(tau, nu)`` of the Gaussian sites matching the tilted moments.

        With ``c = v / (v + s2)`` and ``a = r (z + r)`` the tilted distribution has mean
        ``m + y sqrt(v c) r`` and variance ``v (1 - c a)``; so the site precision is
        ``tau = tau_cav c a / (1 - c a)`` and its natural mean
        ``nu = y sqrt(tau_cav c) r (1 + z (z + r)) / (1 - c a)`` (both written so that nothing
        cancels when ``a -> 1``).

        Args:
            z: standardised cavity means (:meth:`standardized_cavity_mean`), ``[n]``.
            y: labels in ``{±1}``, ``[n]``.
            tau_cav: cavity precisions ``1 / v``, ``[n]``.
        """
        t = mills_terms(z)
        a = 1.0 - t.one_minus_a
        c = 1.0 / (1.0 + self.noise_var * tau_cav)
        one_minus_ca = (1.0 - c) + c * t.one_minus_a  # no cancellation when a -> 1
        tau = tau_cav * c * a / one_minus_ca
        nu = y * np.sqrt(tau_cav * c) * t.r * t.h / one_minus_ca
        return tau, nu


@dataclass(frozen=True)
class HeavisideLikelihood(GaussianCDFLikelihood):
    """``p(y | z) = 1[y z > 0]`` (zero-temperature limit): the EP marginal is ``P(sign z = y)``."""

    noise_var: float = 0.0


@dataclass(frozen=True)
class ProbitLikelihood(GaussianCDFLikelihood):
    """``p(y | z) = Φ(y z / sqrt(noise_var))``; ``noise_var = 1`` is GPy's Bernoulli link."""

    noise_var: float = 1.0


def make_likelihood(name: str, kernel_scale: float = 1.0) -> GaussianCDFLikelihood:
    """The likelihood ``name`` (``"heaviside"`` or ``"probit"``).

    For a kernel divided by ``kernel_scale`` (the probit's unit noise becomes
    ``1 / kernel_scale`` in those units).
    """
    if name == "heaviside":
        return HeavisideLikelihood()
    if name == "probit":
        return ProbitLikelihood(noise_var=1.0 / kernel_scale)
    raise FlatpriorError(f"unknown EP likelihood {name!r}; choose 'heaviside' or 'probit'")
