"""Golden records: a fixed config at one torch thread gives the same record, bit for bit.

A few grid points of each shipped spec's ``quick`` preset (shrunk by overrides so each runs in
about a second; the cases are in ``tests/golden/make_golden.py``) are run through
:func:`flatprior.pipeline.run` and compared with the stored JSON records exactly: every float by
its ``repr`` (JSON stores the shortest repr, so ``==`` after loading is a bit-level comparison).
Wall times and library versions are dropped (``make_golden.strip``).

A refactor must leave these records unchanged. After a *deliberate* change of the numbers (say,
how data splits are drawn), regenerate all stored records with one command, from the repository
root:

    PYTHONPATH=src python tests/golden/make_golden.py

and say in the commit why the numbers changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import make_golden  # noqa: E402


def _diff(got, want, where="record"):
    """First path at which two JSON trees differ (for a readable failure)."""
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(got) | set(want)):
            if k not in got or k not in want:
                return f"{where}.{k}: only in {'stored' if k in want else 'new'} record"
            d = _diff(got[k], want[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return f"{where}: length {len(got)} != stored {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            d = _diff(g, w, f"{where}[{i}]")
            if d:
                return d
        return None
    if type(got) is not type(want) or got != want:
        return f"{where}: {got!r} != stored {want!r}"
    return None


@pytest.mark.parametrize("case", make_golden.CASES, ids=[c[0] for c in make_golden.CASES])
def test_record_is_bit_identical(case):
    name = case[0]
    if name in make_golden.NEEDS_MNIST and not make_golden.mnist_present():
        pytest.skip("../shared/data/mnist not present")
    path = make_golden.path_of(name)
    if not path.exists():
        pytest.fail(f"{path.name} missing: run PYTHONPATH=src python tests/golden/make_golden.py")
    want = json.loads(path.read_text())
    # through JSON like the stored record: tuples -> lists, floats by shortest repr
    got = json.loads(json.dumps(make_golden.run_case(case), sort_keys=True))
    assert got == want, _diff(got, want)
