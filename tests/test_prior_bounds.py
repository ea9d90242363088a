"""McAllester's realisable PAC-Bayes bound."""

from __future__ import annotations

import math

import pytest

from flatprior.errors import FlatpriorError
from flatprior.prior import pac_bayes_bound


def test_pac_bayes_formula_and_monotonicity():
    # (ln 1/P + ln(2m/delta)) / (m - 1)
    b = pac_bayes_bound(-113.0, 500, 0.05)
    assert b == pytest.approx((113.0 + math.log(2 * 500 / 0.05)) / 499, rel=1e-15)
    assert pac_bayes_bound(-200.0, 500) > b  # a less likely training set gives a weaker bound
    assert pac_bayes_bound(-113.0, 500, 0.01) > b
    assert pac_bayes_bound(0.0, 10_000) < 0.002
    assert pac_bayes_bound(-1e5, 1000) > 1.0  # vacuous values are returned, not clipped


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1.0, 100), "<= 0"),
        ((float("nan"), 100), "<= 0"),
        ((-1.0, 1), ">= 2"),
        ((-1.0, 10.5), ">= 2"),
        ((-1.0, 100, 0.0), "delta"),
        ((-1.0, 100, 1.0), "delta"),
        (("x", 100), "number"),
    ],
)
def test_pac_bayes_bad_input(args, match):
    with pytest.raises(FlatpriorError, match=match):
        pac_bayes_bound(*args)
