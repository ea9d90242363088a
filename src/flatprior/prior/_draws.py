"""Seeded chunks of random draws computed in worker threads, grown until a target error.

Both samplers of :func:`flatprior.prior.tilting.log_prior_tilting` (minimax importance sampling
and EP-guided SMC) draw independent chunks in parallel and, with a target standard error, keep
adding chunks by the factor the current error predicts. This module is that loop, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from flatprior.prior._threads import blas_threads


class ParallelDraws:
    """Independent chunks of draws, kept in chunk order.

    Chunk ``i`` (counted from 0 over the object's life) is drawn by ``work(size, seed_seq)``
    with ``seed_seq = SeedSequence(root, spawn_key=(key_offset + i,))``, so the results depend
    on ``root`` and the chunk sizes, never on ``n_threads``. Numpy, scipy and BLAS release the
    GIL, so threads draw in parallel; BLAS is limited to one thread per worker meanwhile.

    Attributes:
        results: the chunks' return values, in chunk order.
        done: units drawn so far (the sum of the chunk sizes).
    """

    def __init__(self, work: Callable[[int, np.random.SeedSequence], Any], *, root: int,
                 key_offset: int, chunk: int, n_threads: int):
        self.work = work
        self.root = root
        self.key_offset = key_offset
        self.chunk = chunk
        self.n_threads = n_threads
        self.results: list[Any] = []
        self.done = 0

    def extend_to(self, total: int) -> None:
        """Draw chunks of at most ``chunk`` units until ``done >= total``."""
        sizes: list[int] = []
        while self.done + sum(sizes) < total:
            sizes.append(min(self.chunk, total - self.done - sum(sizes)))
        first = len(self.results)
        seeds = [np.random.SeedSequence(self.root, spawn_key=(self.key_offset + first + i,))
                 for i in range(len(sizes))]
        with blas_threads(1):
            if self.n_threads > 1 and len(sizes) > 1:
                with ThreadPoolExecutor(max_workers=self.n_threads) as ex:
                    self.results.extend(ex.map(self.work, sizes, seeds))
            else:
                self.results.extend(self.work(s, q) for s, q in zip(sizes, seeds, strict=True))
        self.done += sum(sizes)


def growth(se: float, target: float) -> float:
    """Factor by which to multiply the sample count to reach ``target`` (SE ∝ 1/√M).

    With 20 % margin, at least 1.25 and at most 8 per round.
    """
    return float(np.clip(1.2 * (se / target) ** 2, 1.25, 8.0))


def grow_to_target(draws: ParallelDraws, summarize: Callable[[], tuple], *,
                   target_se: float | None, cap: int, deadline: Callable[[], bool]) -> tuple:
    """Summarise ``draws``, growing them until the standard error reaches ``target_se``.

    While the standard error is above ``target_se``, the units drawn are below ``cap`` and
    ``deadline()`` is false, grow them by :func:`growth` and re-summarise.

    ``summarize()`` returns a tuple whose second entry is the standard error; the last summary
    is returned. ``target_se=None``: no growth.
    """
    est = summarize()
    while target_se is not None and est[1] > target_se and draws.done < cap and not deadline():
        draws.extend_to(min(int(math.ceil(growth(est[1], target_se) * draws.done)), int(cap)))
        est = summarize()
    return est
