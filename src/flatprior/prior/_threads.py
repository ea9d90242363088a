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


#: Above this order dense factorisations (Cholesky, triangular inverse) run on one BLAS thread:
#: OpenBLAS's threaded ``dpotrf`` crashes on large matrices with 2 threads (segmentation fault,
#: measured at n = 20 000 with scipy 1.17.1's OpenBLAS on this 2-core machine, while one thread
#: factorises it in 56 s; a known OpenBLAS failure mode, OpenMathLib/OpenBLAS#2562 and #2821).
#: n = 10 000 with 2 threads is measured to work (the EP benchmarks).
SINGLE_THREAD_ABOVE_N = 10_000


def factorisation_threads(n: int, n_threads: int | None) -> int | None:
    """BLAS threads for dense factorisations of order ``n``.

    One above :data:`SINGLE_THREAD_ABOVE_N` whatever was asked (a crash is not a speed
    trade-off); otherwise ``n_threads`` (``None``: leave BLAS alone).
    """
    return 1 if n > SINGLE_THREAD_ABOVE_N else n_threads
