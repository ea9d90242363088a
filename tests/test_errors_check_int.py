"""The one integer validator (flatprior.errors.check_int) used by prior/ and flatness/."""

from __future__ import annotations

import numpy as np
import pytest

from flatprior.errors import FlatpriorError, check_int


@pytest.mark.parametrize("value, minimum, want", [(3, 1, 3), (np.int64(0), 0, 0), (7, 7, 7)])
def test_accepts_integers(value, minimum, want):
    got = check_int("n", value, minimum)
    assert got == want and type(got) is int


@pytest.mark.parametrize("value", [True, 2.0, 2.5, "3", None, 0, -1, np.bool_(True)])
def test_refuses_with_one_line(value):
    with pytest.raises(FlatpriorError, match=r"^n must be an integer >= 1 \(0 = off\), got ") as e:
        check_int("n", value, 1, hint=" (0 = off)")
    assert "\n" not in str(e.value)


def test_integral_floats_only_when_asked():
    assert check_int("k", 4.0, integral_floats=True) == 4
    for bad in (4.5, float("nan"), float("inf"), 0.0):
        with pytest.raises(FlatpriorError, match="k must be an integer >= 1"):
            check_int("k", bad, integral_floats=True)
