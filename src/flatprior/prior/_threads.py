"""BLAS thread limits for the log P(f) estimators (through threadpoolctl)."""

from __future__ import annotations

import contextlib
import functools


@functools.cache
def _controller():
    """The threadpoolctl controller (a scan of the loaded libraries, ~ms), built once.

    ``None`` without threadpoolctl (optional: scikit-learn brings it).
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def blas_threads(n_threads: int | None):
    """Context manager limiting BLAS to ``n_threads`` threads (``None``: leave BLAS alone).

    On 2 busy cores threaded OpenBLAS on small matrices is far slower than one thread, and
    callers that run their own worker threads want one BLAS thread each.
    """
    ctl = _controller() if n_threads is not None else None
    if ctl is None:
        return contextlib.nullcontext()
    return ctl.limit(limits=int(n_threads), user_api="blas")
