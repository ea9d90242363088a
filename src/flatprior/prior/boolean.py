r"""Prior P(f) over Boolean functions by direct sampling of random ReLU networks.

A network with ``widths = (n_in, h_1, ..., 1)`` (ReLU between layers, weights
``N(0, sigma_w2 / fan_in)``, biases ``N(0, sigma_b2)``: variances) is evaluated on all
``N = 2^n_in`` points of ``{0,1}^n_in``; its function is the bit string
``f_i = 1[output(x_i) > 0]``. Frequencies over many random networks estimate ``P(f)``
(Valle-Pérez et al. 2019; Zhang et al. arXiv 2103.06219, Boolean system with FCN 7-40-40-1).

Conventions:

* input ``i`` (``0 <= i < N``) has bits ``x_j = (i >> (n_in - 1 - j)) & 1``, i.e. ``x_0`` is the
  most significant bit of ``i`` (see :func:`boolean_inputs`);
* a function is packed MSB-first: bit ``f_0`` is the high bit of the first byte
  (``np.packbits(f, bitorder="big")``), padded with zeros to 16 bytes; its hex string is the
  first ``ceil(N / 4)`` hex digits of those bytes (32 digits for ``n_in = 7``); internally the
  16 bytes are two big-endian ``uint64`` keys ``(hi, lo)``.

Antithetic pairs (the default). The output layer's weights and bias are symmetric around 0, so
the network with the last layer negated is a draw from the same prior and computes the
complement ``1 - f`` (up to outputs exactly 0). The sampler therefore evaluates each drawn network
together with its negated twin: ``n_samples`` networks cost ``n_samples / 2`` draws and forward
passes. For every ``f`` the pairs' contributions are independent and a pair never computes ``f``
twice (``f != 1 - f``), so ``count(f) ~ Binomial(n_samples / 2, 2 P(f))``: the estimate
``count / n_samples`` is unbiased with variance ``P(1 - 2P) / n_samples``, at most that of
``n_samples`` independent networks, ``P(1 - P) / n_samples``; its interval is the Wilson interval of
``2 P`` on ``n_samples / 2`` trials, halved (:meth:`BooleanPrior.probability_interval`).
Conditioned on fitting a training set ``S`` (``|S| >= 1``) at most one network of a pair fits, so
the posterior counts are plainly binomial (:meth:`BooleanPrior.posterior`).
"""

from __future__ import annotations

import json
import math
import os
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from flatprior.data.boolean import boolean_inputs  # the one definition (re-exported)
from flatprior.errors import FlatpriorError, check_int, check_positive, refuse_renamed
from flatprior.prior.exact import wilson_interval

__all__ = [
    "BooleanPrior",
    "boolean_inputs",
    "function_bits",
    "function_hex",
    "sample_boolean_prior",
]

# 3: adds "antithetic"; 2: variances sigma_w2, sigma_b2; 1: standard deviations
_FORMAT_VERSION = 3


def _pack(bits: np.ndarray) -> np.ndarray:
    """Bool ``[B, N]`` -> uint64 ``[B, 2]`` (hi, lo) of the MSB-first packed, zero-padded bits."""
    packed = np.packbits(bits, axis=1, bitorder="big")
    if packed.shape[1] < 16:
        packed = np.pad(packed, ((0, 0), (0, 16 - packed.shape[1])))
    return np.ascontiguousarray(packed).view(">u8").astype(np.uint64)


def function_hex(bits, n_inputs: int | None = None) -> str:
    """Hex string of a function given as its ``N`` output bits (``N = 2^n_inputs``)."""
    b = np.asarray(bits).astype(bool).reshape(1, -1)
    n_points = b.shape[1]
    if n_inputs is not None and n_points != 2**n_inputs:
        raise FlatpriorError(f"expected 2^{n_inputs} = {2**n_inputs} output bits, got {n_points}")
    if n_points > 128 or n_points & (n_points - 1):
        raise FlatpriorError(f"a function needs 2^k <= 128 output bits, got {n_points}")
    key = _pack(b)[0]
    return _key_hex(key, n_points)


def _key_hex(key: np.ndarray, n_points: int) -> str:
    raw = np.asarray(key, dtype=np.uint64).astype(">u8").tobytes().hex()
    return raw[: max(1, math.ceil(n_points / 4))]


def function_bits(hex_str: str, n_inputs: int) -> np.ndarray:
    """Inverse of :func:`function_hex`: ``uint8 [2^n_inputs]`` labels in ``{0, 1}``."""
    n_points = 2**n_inputs
    if len(hex_str) > 32:
        raise FlatpriorError(f"function hex string has {len(hex_str)} digits; at most 32")
    try:
        raw = bytes.fromhex(hex_str.ljust(32, "0"))
    except ValueError:
        raise FlatpriorError(f"not a hex string: {hex_str!r}") from None
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="big")[:n_points]


def _reduce(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``counts`` over equal rows of ``keys [m, 2]``; returns sorted unique keys."""
    if keys.shape[0] == 0:
        return keys.reshape(0, 2), counts
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    k = keys[order]
    c = counts[order]
    new = np.ones(k.shape[0], dtype=bool)
    new[1:] = (k[1:, 0] != k[:-1, 0]) | (k[1:, 1] != k[:-1, 1])
    starts = np.flatnonzero(new)
    return k[starts], np.add.reduceat(c, starts)


@dataclass
class BooleanPrior:
    """Counts of Boolean functions computed by random networks (mergeable).

    Attributes:
        n_inputs: number of input bits (``N = 2^n_inputs`` points).
        widths, sigma_w2, sigma_b2: the network prior sampled (weight variance times fan-in,
            bias variance).
        keys: ``uint64 [m, 2]`` packed functions (sorted, unique).
        counts: ``int64 [m]`` number of networks computing each function.
        n_samples: total networks drawn (``counts.sum()``).
        seeds: the seeds of the chunks merged into this table.
        antithetic: the networks came in negated pairs (see the module docstring), which
            changes the confidence interval (:meth:`probability_interval`), not the estimate.
    """

    n_inputs: int
    widths: tuple[int, ...]
    sigma_w2: float
    sigma_b2: float
    keys: np.ndarray = field(repr=False)
    counts: np.ndarray = field(repr=False)
    n_samples: int
    seeds: tuple[int, ...] = ()
    antithetic: bool = False

    @property
    def n_functions(self) -> int:
        """Number of distinct functions seen."""
        return int(self.counts.shape[0])

    def merge(self, other: BooleanPrior) -> BooleanPrior:
        """Add the counts of another chunk drawn from the same prior."""
        return BooleanPrior.combine([self, other])

    @staticmethod
    def combine(parts: Iterable[BooleanPrior]) -> BooleanPrior:
        """Add the counts of several chunks (e.g. from different processes or cluster workers)."""
        parts = list(parts)
        if not parts:
            raise FlatpriorError("combine needs at least one BooleanPrior")
        first = parts[0]
        for p in parts[1:]:
            if (p.n_inputs, tuple(p.widths), p.sigma_w2, p.sigma_b2) != (
                first.n_inputs, tuple(first.widths), first.sigma_w2, first.sigma_b2
            ):
                raise FlatpriorError(
                    "cannot merge Boolean priors of different networks "
                    f"({first.widths}, {first.sigma_w2}, {first.sigma_b2}) vs "
                    f"({p.widths}, {p.sigma_w2}, {p.sigma_b2})"
                )
        if len({p.antithetic for p in parts}) > 1:
            raise FlatpriorError(
                "cannot merge antithetic (paired) and independent samples: their counts have "
                "different distributions; draw every chunk the same way (files written before "
                "Dec 2026 hold independent networks: add to them with `flatprior sample-prior "
                "--independent` or antithetic=False)"
            )
        seeds = [s for p in parts for s in p.seeds]
        if len(set(seeds)) < len(seeds):
            raise FlatpriorError(
                "merging chunks drawn with the same seed would double-count samples; "
                "use different seeds"
            )
        if len(parts) == 1:  # already sorted and unique (a 1e8 sample: 2e7 rows, 10 s)
            keys, counts = first.keys, first.counts
        else:
            keys, counts = _reduce(np.concatenate([p.keys for p in parts]),
                                   np.concatenate([p.counts for p in parts]))
        return BooleanPrior(first.n_inputs, tuple(first.widths), first.sigma_w2, first.sigma_b2,
                            keys, counts, sum(p.n_samples for p in parts), tuple(seeds),
                            first.antithetic)

    def table(self, top: int | None = None):
        """Function -> frequency table, most frequent first (pandas DataFrame).

        Columns: ``function`` (hex string), ``count``, ``frequency``, ``log_p`` (natural log of
        the frequency), ``log_p_ci_low`` / ``log_p_ci_high`` (95 % Wilson interval, log scale).
        """
        import pandas as pd

        order = np.argsort(-self.counts, kind="stable")
        if top is not None:
            order = order[: int(top)]
        c = self.counts[order]
        lo, hi = self.probability_interval(c)
        n_points = 2**self.n_inputs
        return pd.DataFrame(
            {
                "function": [_key_hex(k, n_points) for k in self.keys[order]],
                "count": c,
                "frequency": c / self.n_samples,
                "log_p": np.log(c / self.n_samples),
                "log_p_ci_low": np.log(lo),
                "log_p_ci_high": np.log(hi),
            }
        )

    def probability_interval(self, counts) -> tuple[np.ndarray, np.ndarray]:
        """95 % interval ``(low, high)`` of ``P(f)`` for functions seen ``counts`` times.

        Independent networks: the Wilson interval of ``counts / n_samples``. Antithetic pairs:
        ``count ~ Binomial(n_samples / 2, 2 P)``, so the Wilson interval of
        ``counts / (n_samples / 2)``, halved (the same estimate, a slightly narrower interval).
        """
        c = np.asarray(counts, dtype=float)
        if not self.antithetic:
            return wilson_interval(c, self.n_samples)
        pairs = self.n_samples // 2
        # a pair counts f twice only if all its outputs are exactly 0 (probability ~0)
        lo, hi = wilson_interval(np.minimum(c, pairs), pairs)
        return lo / 2, hi / 2

    def count_of(self, bits) -> int:
        """Count of the function with output bits ``bits [N]`` (0 if never seen)."""
        return int(self.counts_of(np.asarray(bits).reshape(1, -1))[0])

    def counts_of(self, bits) -> np.ndarray:
        """Counts ``int64 [B]`` of the functions with output bits ``bits [B, N]`` (0: unseen).

        Binary search in the sorted keys: ``O(B log n_functions)``.
        """
        b = np.asarray(bits).astype(bool)
        if b.ndim != 2 or b.shape[1] != 2**self.n_inputs:
            raise FlatpriorError(f"bits must be [B, {2**self.n_inputs}] (one function per row), "
                                 f"got shape {b.shape}")
        # (hi, lo) rows as one structured scalar each: numpy compares them field by field,
        # the order _reduce sorted them in
        pair = np.dtype([("hi", np.uint64), ("lo", np.uint64)])
        table = np.ascontiguousarray(self.keys).view(pair).reshape(-1)
        query = np.ascontiguousarray(_pack(b)).view(pair).reshape(-1)
        if not len(table):
            return np.zeros(len(query), dtype=np.int64)
        pos = np.minimum(np.searchsorted(table, query), len(table) - 1)
        return np.where(table[pos] == query, self.counts[pos], 0).astype(np.int64)

    def consistent(self, indices, labels) -> np.ndarray:
        """Which sampled functions fit a training set: ``bool [n_functions]``.

        Function ``k`` fits ``S = {(x_i, y_i)}`` when ``f_k(x_i) = y_i`` for every ``i`` in
        ``indices`` (inputs numbered as in :func:`boolean_inputs`); tested on the packed keys
        with one mask, so a sample over all ``2^n_inputs`` inputs serves every ``S``.

        Args:
            indices: input numbers ``[m]`` in ``0 .. 2^n_inputs - 1`` (distinct).
            labels: their labels ``[m]`` in ``{0, 1}``.
        """
        n_points = 2**self.n_inputs
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        lab = np.asarray(labels).reshape(-1)
        if idx.shape != lab.shape:
            raise FlatpriorError(f"{idx.size} indices but {lab.size} labels; give one label each")
        if idx.size and (idx.min() < 0 or idx.max() >= n_points):
            raise FlatpriorError(f"input indices must lie in 0..{n_points - 1}")
        if len(np.unique(idx)) < idx.size:
            raise FlatpriorError("input indices repeat; give each training input once")
        if not np.isin(lab, (0, 1)).all():
            raise FlatpriorError("labels must be 0 or 1")
        mask = np.zeros((1, n_points), dtype=bool)
        mask[0, idx] = True
        want = np.zeros((1, n_points), dtype=bool)
        want[0, idx] = lab.astype(bool)
        m, w = _pack(mask)[0], _pack(want)[0]
        return ((self.keys & m) == w).all(axis=1)

    def posterior(self, indices, labels) -> BooleanPrior:
        r"""The sampled functions that fit a training set: the Bayesian posterior ``P_B(f | S)``.

        With a 0-1 likelihood the posterior of a function ``f`` consistent with ``S`` is
        ``P(f) / P(S)``, estimated by its frequency among the sampled networks that fit ``S``
        (Mingard et al., "Is SGD a Bayesian sampler? Well, almost", JMLR 22, 2021):

        $$ \hat P_B(f \mid S) = \frac{\mathrm{count}(f)}{\sum_{g \text{ fits } S}
        \mathrm{count}(g)} $$

        With antithetic pairs and ``|S| >= 1`` at most one network of a pair fits ``S``, so given
        the number of fitting networks their functions are independent draws from
        ``P_B(. | S)``: the result holds plain binomial counts (``antithetic=False``).

        Returns:
            A :class:`BooleanPrior` holding only the consistent functions, its ``n_samples``
            the number of sampled networks that fit ``S`` (0 if none did), so :meth:`table`
            gives ``P_B(f | S)`` with Wilson intervals.
        """
        ok = self.consistent(indices, labels)
        counts = self.counts[ok]
        paired = self.antithetic and np.asarray(indices).size == 0
        return BooleanPrior(self.n_inputs, self.widths, self.sigma_w2, self.sigma_b2,
                            self.keys[ok], counts, int(counts.sum()), self.seeds, paired)

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` (plain arrays + JSON metadata, no pickle)."""
        meta = {
            "format": _FORMAT_VERSION,
            "n_inputs": self.n_inputs,
            "widths": list(self.widths),
            "sigma_w2": self.sigma_w2,
            "sigma_b2": self.sigma_b2,
            "n_samples": int(self.n_samples),
            "seeds": [int(s) for s in self.seeds],
            "antithetic": bool(self.antithetic),
        }
        np.savez_compressed(
            path, keys=self.keys, counts=self.counts, meta=np.array(json.dumps(meta))
        )

    @staticmethod
    def load(path: str | os.PathLike) -> BooleanPrior:
        """Read a file written by :meth:`save` (``allow_pickle=False``)."""
        if not os.path.isfile(path):
            raise FlatpriorError(f"Boolean prior file {path} not found (flatprior sample-prior "
                                 "writes one)")
        # a truncated/garbled zip raises BadZipFile, EOFError or zlib.error, not OSError
        try:
            if not zipfile.is_zipfile(path):  # else numpy's refusal suggests unpickling it
                raise ValueError("not an .npz archive (flatprior sample-prior writes one)")
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                keys = z["keys"].astype(np.uint64)
                counts = z["counts"].astype(np.int64)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FlatpriorError(
                f"cannot read Boolean prior file {path} (corrupted or not a BooleanPrior file): "
                f"{msg}"
            ) from None
        if (not isinstance(meta, dict) or meta.get("format") not in (1, 2, _FORMAT_VERSION)
                or keys.ndim != 2 or keys.shape[1] != 2):
            raise FlatpriorError(f"{path} is not a flatprior Boolean prior file (format 1 to 3)")
        try:
            n_samples = int(meta["n_samples"])
            if meta["format"] == 1:  # standard deviations before the variance rename
                variances = (float(meta["sigma_w"]) ** 2, float(meta["sigma_b"]) ** 2)
            else:
                variances = (float(meta["sigma_w2"]), float(meta["sigma_b2"]))
            args = (int(meta["n_inputs"]), tuple(meta["widths"]), *variances)
            seeds = tuple(meta["seeds"])
            antithetic = bool(meta.get("antithetic", False))  # formats 1, 2: independent
        except (KeyError, TypeError, ValueError) as exc:
            raise FlatpriorError(
                f"{path} is corrupted (bad or missing metadata {exc}); it is not a valid "
                "BooleanPrior file, re-create it with BooleanPrior.save"
            ) from None
        if counts.ndim != 1 or counts.shape[0] != keys.shape[0] or int(counts.sum()) != n_samples:
            raise FlatpriorError(f"{path} is corrupt: counts do not add up to n_samples")
        return BooleanPrior(*args, keys, counts, n_samples, seeds, antithetic)


# Networks per independently seeded chunk: chunk i draws from the torch generator seeded by
# SeedSequence(seed, spawn_key=(i,)), so results do not depend on the number of threads.
_CHUNK = 1 << 16


def _chunk_seed(seed: int, index: int) -> int:
    state = np.random.SeedSequence(int(seed), spawn_key=(int(index),)).generate_state(
        1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def _layer_scales(widths: Sequence[int], sigma_w: float,
                  sigma_b: float) -> list[tuple[float, float]]:
    """(weight scale, bias scale) per layer, applied to standard normal weights and biases.

    ReLU is positively homogeneous and only the sign of the output matters, so layer ``l`` may be
    computed up to the positive factor ``phi_l = prod_{i <= l} sigma_w / sqrt(fan_in_i)``:
    weights unscaled and biases scaled by ``sigma_b / phi_l`` (saves a pass over the weights,
    the largest array). When those factors leave a safe float range (``sigma_w`` ~ 0) the
    explicit scales ``(sigma_w / sqrt(fan_in), sigma_b)`` are used instead.
    """
    explicit = [(sigma_w / math.sqrt(f), sigma_b) for f in widths[:-1]]
    phi, folded = 1.0, []
    for f in widths[:-1]:
        phi *= sigma_w / math.sqrt(f)
        if not 1e-12 < phi < 1e12:
            return explicit
        folded.append((1.0, sigma_b / phi))
    return folded


class _BatchForward:
    """Signs of ``batch_size`` random networks on all ``2^n_in`` Boolean inputs (one thread).

    Layer 1 uses the structure of the inputs: with ``x = (x_hi, x_lo)`` split into its high and
    low bits, ``W x + b = (W_hi x_hi + b) + W_lo x_lo``: two small products (``2^hi`` and
    ``2^lo`` points) and one broadcast sum instead of a ``[h, n_in + 1] x [n_in + 1, 2^n_in]``
    product per network. Deeper layers are one batched product each (``torch.baddbmm``), the
    activations of network ``b`` laid out as ``[width, 2^n_in]``; buffers are reused between
    batches so a batch stays in the CPU caches. With ``antithetic`` each network drawn also
    yields its twin with the last layer negated: output ``-out``, bits ``out < 0``.
    """

    def __init__(self, widths: Sequence[int], sigma_w: float, sigma_b: float, batch_size: int,
                 antithetic: bool = False):
        self.widths = tuple(widths)
        self.antithetic = bool(antithetic)
        self.batch_size = batch_size
        self.scales = _layer_scales(widths, sigma_w, sigma_b)
        self.zero_weights = sigma_w == 0.0
        n_in = widths[0]
        self.n_lo = (n_in + 1) // 2
        self.n_hi = n_in - self.n_lo
        w1, b1 = self.scales[0]
        # [x_hi; 1] and x_lo as columns, layer-1 scales folded in: W_hi @ xh = w1 W_hi x_hi + b1 b
        xh = torch.from_numpy(boolean_inputs(self.n_hi)).T * w1 if self.n_hi else torch.zeros(
            0, 1)
        self.xh = torch.cat([xh, torch.full((1, xh.shape[1]), b1)]).contiguous()
        self.xl = (torch.from_numpy(boolean_inputs(self.n_lo)).T * w1).contiguous()
        self.n_points = 2**n_in
        self.per_net = sum((a + 1) * c for a, c in zip(widths[:-1], widths[1:], strict=True))
        self._plans: dict[int, tuple] = {}

    def _plan(self, b: int) -> tuple:
        """Parameter buffer ``z [b * per_net]``, per-layer views and activation buffers.

        For ``b`` networks; built once per batch size (fewer Python calls per batch).
        """
        plan = self._plans.get(b)
        if plan is not None:
            return plan
        widths, h = self.widths, self.widths[1]
        z = torch.empty(b * self.per_net)
        o = 0
        z_hi = z[o : o + b * h * (self.n_hi + 1)].view(b * h, self.n_hi + 1)
        o += b * h * (self.n_hi + 1)
        z_lo = z[o : o + b * h * self.n_lo].view(b * h, self.n_lo)
        o += b * h * self.n_lo
        a = torch.empty(b * h, 2**self.n_hi)
        c = torch.empty(b * h, 2**self.n_lo)
        act = torch.empty(b, h, 2**self.n_hi, 2**self.n_lo)
        layers = []
        for li, (fan_in, fan_out) in enumerate(zip(widths[1:-1], widths[2:], strict=True)):
            w = z[o : o + b * fan_out * fan_in].view(b, fan_out, fan_in)
            o += b * fan_out * fan_in
            bias = z[o : o + b * fan_out].view(b, fan_out, 1)
            o += b * fan_out
            ws, bs = self.scales[li + 1]
            layers.append((w, bias, ws, bs, torch.empty(b, fan_out, self.n_points)))
        bits = torch.empty((2 if self.antithetic else 1) * b, self.n_points, dtype=torch.bool)
        plan = (z, z_hi, z_lo, a, c, act, layers, bits)
        self._plans[b] = plan
        return plan

    def _forward(self, plan: tuple, b: int) -> torch.Tensor:
        z, z_hi, z_lo, a, c, act, layers, bits = plan
        if self.zero_weights:  # output = sigma_b * b_out for every input
            out = (z[-b:] * self.scales[-1][1])[:, None].expand(b, self.n_points)
            return self._signs(out, bits)
        torch.mm(z_hi, self.xh, out=a)
        torch.mm(z_lo, self.xl, out=c)
        h = self.widths[1]
        out = torch.add(a.view(b, h, -1, 1), c.view(b, h, 1, -1), out=act).view(b, h, -1)
        for w, bias, ws, bs, buf in layers:
            out.relu_()
            out = torch.baddbmm(bias, w, out, beta=bs, alpha=ws, out=buf)
        return self._signs(out.view(b, self.n_points), bits)

    def _signs(self, out: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        b = out.shape[0]
        torch.gt(out, 0, out=bits[:b])
        if self.antithetic:  # the negated twins: -out > 0
            torch.lt(out, 0, out=bits[b:])
        return bits

    def draw(self, gen: torch.Generator, b: int) -> torch.Tensor:
        """Output signs ``bool [b, 2^n_in]`` of ``b`` new networks.

        With ``antithetic`` the result is ``[2b, 2^n_in]``: the twins of rows ``0..b-1`` in rows
        ``b..2b-1``.

        Their standard normal parameters ``z [b * per_net]`` are ``normal_`` draws from
        ``gen``, laid out as: layer 1 ``[b * h, n_hi + 1]`` (high-bit weights and bias) then
        ``[b * h, n_lo]``; each further layer its weights ``[b, fan_out, fan_in]`` then its
        biases ``[b, fan_out]``. The result is a buffer reused by the next call.
        """
        plan = self._plan(b)
        plan[0].normal_(generator=gen)
        return self._forward(plan, b)


def _sample_chunk(forward: _BatchForward, n: int, torch_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduced (keys, counts) of ``n`` networks from one seeded generator.

    Antithetic: ``n / 2`` draws and their twins.
    """
    gen = torch.Generator().manual_seed(int(torch_seed))
    keys = []
    draws = n // 2 if forward.antithetic else n
    with torch.no_grad():
        for lo in range(0, draws, forward.batch_size):
            b = min(forward.batch_size, draws - lo)
            keys.append(_pack(forward.draw(gen, b).numpy()))
    k = np.concatenate(keys)
    return _reduce(k, np.ones(k.shape[0], dtype=np.int64))


def _sample_chunks(chunks: Iterable[tuple[int, int]], lock, widths, sigma_w, sigma_b,
                   batch_size, antithetic, progress) -> tuple[np.ndarray, np.ndarray]:
    """One worker thread: take (size, seed) chunks from the shared iterator until it is empty."""
    forward = _BatchForward(widths, sigma_w, sigma_b, batch_size, antithetic)
    acc_k = np.zeros((0, 2), dtype=np.uint64)
    acc_c = np.zeros(0, dtype=np.int64)
    pend_k, pend_c, pending = [], [], 0
    while True:
        with lock:
            job = next(chunks, None)
        if job is None:
            break
        k, c = _sample_chunk(forward, *job)
        pend_k.append(k)
        pend_c.append(c)
        pending += k.shape[0]
        if pending > max(4 * _CHUNK, acc_k.shape[0]):  # amortised merge, memory stays bounded
            acc_k, acc_c = _reduce(np.concatenate([acc_k, *pend_k]),
                                   np.concatenate([acc_c, *pend_c]))
            pend_k, pend_c, pending = [], [], 0
        if progress is not None:
            progress(job[0])
    return _reduce(np.concatenate([acc_k, *pend_k]), np.concatenate([acc_c, *pend_c]))


@refuse_renamed
def sample_boolean_prior(
    n_samples: int,
    widths: Sequence[int] = (7, 40, 40, 1),
    sigma_w2: float = 1.0,
    sigma_b2: float = 1.0,
    seed: int = 0,
    *,
    batch_size: int = 128,
    antithetic: bool = True,
    n_workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> BooleanPrior:
    r"""Estimate ``P(f)`` on ``{0,1}^n_in`` by sampling random ReLU networks.

    Each network has weights ``N(0, sigma_w2 / fan_in)`` and biases ``N(0, sigma_b2)``
    (float32), ReLU after every layer but the last; all ``2^n_in`` inputs are evaluated at once
    (see :class:`_BatchForward`). Counts are reduced per chunk and merged, so memory is
    ``O(distinct functions)``. By default the networks come in antithetic pairs (a drawn network
    and its twin with the last layer negated; module docstring): half the draws and forward
    passes, an estimate as accurate or more than that of as many independent networks.

    Args:
        n_samples: number of networks.
        widths: ``(n_in, h_1, ..., 1)`` with ``1 <= n_in <= 7`` and a single output.
        sigma_w2: weight variance times fan-in.
        sigma_b2: bias variance.
        seed: master seed. The networks are drawn in chunks of 65 536, chunk ``i`` from a
            torch generator seeded by ``numpy.random.SeedSequence(seed, spawn_key=(i,))``, so the
            result depends on ``seed`` and ``n_samples`` only (not on ``n_workers``).
        batch_size: networks drawn per vectorised batch. 128 keeps a batch's activations
            (``128 x 40 x 128`` floats, 2.6 MB) near the CPU caches: measured on 2 cores
            171-174 k networks/s vs 162-166 k at 64 and 146-159 k at 256 (FCN 7-40-40-1,
            independent networks).
        antithetic: draw networks in negated pairs (default); ``n_samples`` must then be
            even. ``False``: ``n_samples`` independent networks, as in Valle-Pérez et al.
        n_workers: threads, each with one torch thread (default: ``torch.get_num_threads()``,
            i.e. the cores torch would use; 1 inside a sweep worker process). The
            random draws are sequential per generator, so parallel chunks are what uses
            several cores; torch's own intra-op thread count is set to 1 meanwhile and restored.
        progress: optional callback, called with the number of networks of each finished chunk.

    Returns:
        :class:`BooleanPrior`; merge chunks drawn with different seeds (e.g. on a cluster) with
        :meth:`BooleanPrior.combine`.
    """
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2 or widths[-1] != 1 or min(widths) < 1:
        raise FlatpriorError(f"widths must be (n_in, ..., 1) with positive sizes, got {widths}")
    if not 1 <= widths[0] <= 7:
        raise FlatpriorError(f"n_in = widths[0] must be in 1..7 (<= 128 points), got {widths[0]}")
    check_int("n_samples", n_samples, 1)
    check_positive("sigma_w2", sigma_w2, allow_zero=True)
    check_positive("sigma_b2", sigma_b2, allow_zero=True)
    check_int("batch_size", batch_size, 1)
    if antithetic and n_samples % 2:
        raise FlatpriorError(
            f"n_samples = {n_samples} is odd, but antithetic sampling draws networks in pairs: "
            "give an even number, or antithetic=False"
        )
    if n_workers is None:  # follow torch's thread count (1 inside our sweep workers)
        n_workers = torch.get_num_threads()
    check_int("n_workers", n_workers, 1)
    n_chunks = -(-int(n_samples) // _CHUNK)
    chunks = iter([(min(_CHUNK, n_samples - i * _CHUNK), _chunk_seed(seed, i))
                   for i in range(n_chunks)])
    n_threads = min(int(n_workers), n_chunks)
    # the forward pass scales standard normal draws by standard deviations
    args = (chunks, threading.Lock(), widths, math.sqrt(sigma_w2), math.sqrt(sigma_b2),
            int(batch_size), bool(antithetic), progress)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per worker thread; several intra-op threads each thrash
    try:
        if n_threads == 1:
            results = [_sample_chunks(*args)]
        else:
            with ThreadPoolExecutor(n_threads) as pool:
                results = list(pool.map(lambda _: _sample_chunks(*args), range(n_threads)))
    finally:
        torch.set_num_threads(torch_threads)
    keys, counts = _reduce(np.concatenate([k for k, _ in results]),
                           np.concatenate([c for _, c in results]))
    return BooleanPrior(widths[0], widths, float(sigma_w2), float(sigma_b2), keys, counts,
                        int(n_samples), (int(seed),), bool(antithetic))
