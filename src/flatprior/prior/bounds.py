"""PAC-Bayes generalization bound from the prior probability of the training labels."""

from __future__ import annotations

import math

from flatprior.errors import FlatpriorError

__all__ = ["pac_bayes_bound"]


def pac_bayes_bound(log_p_train: float, m: int, delta: float = 0.05) -> float:
    r"""McAllester's realisable PAC-Bayes bound on the expected error of the Bayes posterior.

    With ``P(S)`` the prior probability that a random function fits the ``m`` training labels
    (e.g. the EP marginal likelihood of the training set), with probability ``1 - delta`` over
    the draw of ``S`` the posterior restricted to functions consistent with ``S`` has

    $$
    \epsilon \le \frac{\ln(1/P(S)) + \ln(2m/\delta)}{m - 1}
    $$

    (McAllester 1999; Valle-Pérez et al. 2019, eq. (1); Zhang et al. arXiv 2103.06219).
    The raw value is returned; a value ``>= 1`` means the bound is vacuous.

    Args:
        log_p_train: ``ln P(S)`` (natural log, ``<= 0``).
        m: training-set size, ``>= 2``.
        delta: confidence parameter, ``0 < delta < 1``.

    Returns:
        The bound on the expected generalization error.

    Example:
        >>> import math
        >>> pac_bayes_bound(-10.0, 101, 0.05)   # (10 + ln(2 * 101 / 0.05)) / 100
        0.18303999970955195
        >>> math.isclose(pac_bayes_bound(-10.0, 101), (10 + math.log(4040)) / 100)
        True
    """
    try:
        lp = float(log_p_train)
    except (TypeError, ValueError):
        raise FlatpriorError(f"log_p_train must be a number, got {log_p_train!r}") from None
    if math.isnan(lp) or lp > 0:
        raise FlatpriorError(f"log_p_train is a log-probability and must be <= 0, got {lp!r}")
    if isinstance(m, bool) or not float(m).is_integer() or m < 2:
        raise FlatpriorError(f"m (training-set size) must be an integer >= 2, got {m!r}")
    if not 0.0 < float(delta) < 1.0:
        raise FlatpriorError(f"delta must be in (0, 1), got {delta!r}")
    m = int(m)
    return (-lp + math.log(2.0 * m / float(delta))) / (m - 1)
