"""Measure which Boolean target and training set put SGD's functions where sampling sees them.

Fig 2 of the study plots the functions SGD finds most often against log P(f) estimated by
direct sampling of random networks. For that, those functions need P(f) >= ~1e-7: a 1e8-network
sample then sees each >= 10 times. With the majority-of-7 target and |S| = 64 SGD's functions
have log P ~ -34 (P ~ 1e-15, EP), far out of reach.

For every candidate (target function, |S|) this script trains ``--runs`` networks with the
fig2-boolean paper settings (FCN 7-40-40-1, momentum 0.9, lr 1e-3, batch 1, to zero training
error; ``flatprior run --ensemble auto`` path, no measures) on one training set (``data_seed``
0), then looks every function found up in one sample of random networks of the same
architecture and initialisation (``--samples`` networks, or the saved ``--prior`` chunk files).
Printed per candidate:

* ``distinct``: distinct functions among the runs (Fig 2 needs ~1000 of them at 1e5 runs);
* ``runs P>=1e-7``, ``fns P>=1e-7``: fraction of runs / of distinct functions whose function
  was sampled at least ``samples * 1e-7`` times (its sampled frequency is >= 1e-7);
* ``fns P>=1e-6``: the same at frequency >= 1e-6 (with 1e8 samples: >= 100 hits, ~10 % error);
* ``med log10 P``: median over runs of log10 of the sampled frequency (sampled functions only);
* ``fns >=2x``: distinct functions SGD found at least twice (the frequent ones Fig 2 keeps) and
  ``of those P>=1e-7``: the fraction of them with sampled frequency >= 1e-7;
* ``top-K P>=1e-7``: the fraction of the ``--top`` (1000) functions SGD found most often (ties
  broken by the function string) with sampled frequency >= 1e-7: Fig 2's criterion once
  ``--runs`` is large enough that more than K distinct functions appear.

Usage: python benchmarks/choose_boolean_target.py [--runs 1000] [--samples 10000000]
       [--prior FILE.npz ...] [--save-prior FILE.npz] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from flatprior.data.boolean import boolean_inputs


def _bits_to_str(bits) -> str:
    return "".join(str(int(b)) for b in bits)


def candidates() -> dict[str, str]:
    """Target name -> 128-character 0/1 string (bit i = f(input i), input order of boolean_inputs).

    From simple to complex: the constant 0, a conjunction of 4 bits, "at least 6 of 7 bits"
    (8 positive inputs), one input bit, majority-of-7 (the old default) and parity (the hardest
    for the prior).
    """
    x = boolean_inputs().astype(int)
    s = x.sum(axis=1)
    return {
        "zero": _bits_to_str(np.zeros(128, dtype=int)),
        "and-4": _bits_to_str(x[:, 0] & x[:, 1] & x[:, 2] & x[:, 3]),
        "sum>=6": _bits_to_str(s >= 6),
        "x0": _bits_to_str(x[:, 0]),
        "majority-7": _bits_to_str(s >= 4),
        "parity-7": _bits_to_str(s % 2),
    }


def screen(prior, sizes) -> None:
    """Cheap proxy, no training: the Bayesian posterior of each candidate in the sample.

    ``P(S)``: fraction of sampled networks that fit S; ``mass P>=1e-6``: fraction of those whose
    function has sampled frequency >= 1e-6 (if SGD samples near the posterior, the share of its
    runs Fig 2 can place); ``fns P>=1e-6``: how many such functions fit S.
    """
    from flatprior.data import make_task

    print(f"{'target':<12} {'|S|':>4} {'P(S)':>9} {'mass P>=1e-6':>12} {'fns P>=1e-6':>11}")
    for name, target in candidates().items():
        for n_train in sizes:
            task = make_task("boolean", n_train, 0, 128 - n_train, 0, target=target)
            post = prior.posterior(task.idx_train, task.y_train.numpy().astype(np.uint8))
            good = post.counts >= prior.n_samples * 1e-6
            mass = post.counts[good].sum() / post.n_samples if post.n_samples else float("nan")
            print(f"{name:<12} {n_train:>4} {post.n_samples / prior.n_samples:>9.2e} "
                  f"{mass:>12.3f} {int(good.sum()):>11}")


def train_functions(target: str, n_train: int, n_runs: int, workers: int) -> list[str]:
    """The functions (128-char strings) found by ``n_runs`` fig2-boolean paper-settings runs."""
    from flatprior.experiments.runner import run_sweep
    from flatprior.experiments.specs import resolve
    from flatprior.experiments.store import Store

    res = resolve("fig2-boolean", "paper", None, {
        "seed": list(range(n_runs)), "boolean_target": target, "n_train": n_train,
        "n_test": 128 - n_train, "measures": []})
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "c.db") as st:
        run_sweep(res.configs, st, res.label, workers=workers, progress=False, ensemble="auto")
        recs = list(st.records())
    return [r["function"] for r in recs if r["status"] == "zero_error"]


#: the SGD candidates measured (NAME:|S|,...): simple targets at several |S|, the old default
DEFAULT_GRID = ["zero:2,4,8,16", "and-4:16,64,96", "sum>=6:16,64", "x0:32,64,96,112",
                "majority-7:16,64"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1000, help="SGD runs per candidate")
    ap.add_argument("--samples", type=int, default=10_000_000, help="random networks to sample")
    ap.add_argument("--prior", type=Path, nargs="*", default=[],
                    help="saved BooleanPrior chunk files to use instead of sampling")
    ap.add_argument("--save-prior", type=Path, default=None, help="save the sample here")
    ap.add_argument("--sizes", type=int, nargs="*", default=[4, 8, 16, 32, 64, 96],
                    help="|S| values of the screen")
    ap.add_argument("--grid", nargs="*", default=None,
                    help="SGD candidates as NAME:SIZE,SIZE (default: the measured grid below)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--top", type=int, default=1000, help="Fig 2 keeps this many functions")
    ap.add_argument("--quick", action="store_true", help="100 runs, 1e6 samples, |S| 16 and 64")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.samples, a.sizes, a.grid = 100, 1_000_000, [8, 64], ["zero:4", "x0:96"]
    grid = [(g.split(":")[0], int(m)) for g in (a.grid or DEFAULT_GRID)
            for m in g.split(":")[1].split(",")]

    from flatprior.analysis.report import boolean_prior_for
    from flatprior.experiments.specs import resolve

    proto = resolve("fig2-boolean", "paper", None, {"seed": [0]}).configs[0]
    t0 = time.perf_counter()
    prior = boolean_prior_for(proto, samples=0 if a.prior else a.samples, files=a.prior,
                              seed=12345)
    print(f"prior: {prior.n_samples:.3g} networks FCN {prior.widths}, {prior.n_functions} "
          f"distinct functions ({time.perf_counter() - t0:.0f} s; machine shared with other "
          "jobs)")
    if a.save_prior is not None:
        prior.save(a.save_prior)
    print("\nScreen (sampled posterior only, no training):")
    screen(prior, a.sizes)
    lo7, lo6 = prior.n_samples * 1e-7, prior.n_samples * 1e-6
    cands = candidates()
    print(f"\n{a.runs} SGD runs per candidate (momentum, lr 1e-3, batch 1, data_seed 0); "
          f"K = {a.top}")
    print(f"{'target':<12} {'|S|':>4} {'runs':>5} {'distinct':>8} {'runs P>=1e-7':>12} "
          f"{'fns P>=1e-7':>11} {'fns P>=1e-6':>11} {'med log10 P':>11} {'fns >=2x':>8} "
          f"{'of those P>=1e-7':>16} {'top-K P>=1e-7':>13} {'time s':>7}")
    for name, n_train in grid:
        t0 = time.perf_counter()
        funcs = train_functions(cands[name], n_train, a.runs, a.workers)
        uniq, per = np.unique(funcs, return_counts=True)
        cnt = prior.counts_of(np.array([np.frombuffer(f.encode(), np.uint8) - 48
                                        for f in uniq]).reshape(len(uniq), 128))
        runs_cnt = np.repeat(cnt, per)
        seen = runs_cnt[runs_cnt > 0]
        med = np.median(np.log10(seen / prior.n_samples)) if seen.size else float("nan")
        freq = cnt[per >= 2] >= lo7
        top = np.lexsort((uniq, -per))[: a.top]  # most frequent first, ties by string
        print(f"{name:<12} {n_train:>4} {len(funcs):>5} {len(uniq):>8} "
              f"{np.mean(runs_cnt >= lo7):>12.3f} {np.mean(cnt >= lo7):>11.3f} "
              f"{np.mean(cnt >= lo6):>11.3f} {med:>11.2f} {freq.size:>8} "
              f"{freq.mean() if freq.size else np.nan:>16.3f} "
              f"{np.mean(cnt[top] >= lo7):>13.3f} "
              f"{time.perf_counter() - t0:>7.1f}", flush=True)

if __name__ == "__main__":
    main()
