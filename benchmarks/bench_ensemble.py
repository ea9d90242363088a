"""Benchmark: ensemble training (``flatprior run --ensemble auto``) vs the per-run path.

Both paths go through the runner and the SQLite store (``run_sweep``) with the same number of
worker processes, measured in the same process run:

* Boolean ``fig2-boolean --preset paper`` runs (``--boolean-variant``: ``sampleable``, |S| = 4,
  and/or ``majority``, |S| = 64, the spec the goal was set on; default both; FCN 7-40-40-1,
  batch 1, momentum, to zero error, sharpness + L-BFGS-B sharpness + Hessian spectral norm +
  log P(f)): the ensemble path on ``--boolean-runs`` runs (default 1000); the per-run path on
  the first ``--baseline-runs`` of them (default 200) and on half as many, its time projected to
  all runs as start-up + slope x runs (printed as such). Goal: >= 50x.
* ``fig3 mnist-fcn --preset paper`` (55 runs, SGD batch 128, |S| = 500, sharpness + log P(f)):
  both paths on all runs. Goal: >= 3x.
* ``--backends``: one training step (forward + backward) of the stacked ``bmm`` and ``vmap``
  forwards on both systems.
* ``--profile M``: where the time of ONE ensemble of M Boolean paper-preset members goes
  (``--boolean-variant``; ``both``: sampleable), in
  this process (one thread): training, each batched measure, log P(f) (kernel + batched EP over
  the distinct functions) and the per-member L-BFGS-B sharpness, from the records' times
  (modules imported before the clock, as in a sweep worker that runs many ensembles).

The records of the runs both paths made are compared: how many have the same status, stopping
epoch and function (float32 rounding differs between batched and single matmuls, and over
hundreds of MNIST epochs it can grow until a stopping epoch differs), and the largest relative
difference of the measures on those.

Usage: python benchmarks/bench_ensemble.py [--quick] [--workers 2] [--data-root DIR]
       [--boolean-runs N] [--baseline-runs N] [--boolean-variant V] [--skip-boolean]
       [--skip-mnist] [--backends]
       [--profile M]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _sweep(configs, label, workers, ensemble):
    from flatprior.experiments.runner import run_sweep
    from flatprior.experiments.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        with Store(Path(tmp) / "b.db") as st:
            t0 = time.perf_counter()
            s = run_sweep(configs, st, label, workers=workers, progress=False, ensemble=ensemble)
            wall = time.perf_counter() - t0
            recs = {r["key"]: r for r in st.records()}
    bad = [r.get("error") for r in recs.values() if r["status"] == "failed"]
    assert s.failed == 0, bad[:3]
    return wall, recs


def _compare(per_run: dict, ens: dict, measures) -> str:
    same = [
        k for k, r in per_run.items()
        if (ens[k]["status"], ens[k]["epochs_to_zero_error"], ens[k].get("function"))
        == (r["status"], r["epochs_to_zero_error"], r.get("function"))
    ]
    parts = [f"same status/stopping epoch/function: {len(same)} of {len(per_run)} runs"]
    for m in measures:
        rel = max(abs(ens[k][m] - per_run[k][m]) / max(abs(per_run[k][m]), 1e-300) for k in same)
        parts.append(f"max rel diff {m} on those: {rel:.1e}")
    return "; ".join(parts)


def bench_boolean(n_runs: int, n_base: int, workers: int, variant: str) -> None:
    from flatprior.experiments.specs import resolve

    res = resolve("fig2-boolean", "paper", variant, {"seed": list(range(n_runs))})
    configs = res.configs
    print(f"\nBoolean fig2 paper preset, variant {variant} (batch 1, {configs[0].optimizer}, "
          f"measures "
          f"{list(configs[0].measures)}): {n_runs} runs, {workers} workers")
    # the per-run time is a + b n (a: starting the workers, importing torch); fit on n_base
    # and n_base / 2 runs: projecting t(n_base) proportionally would count `a` many times over
    t_half, _ = _sweep(configs[: n_base // 2], res.label, workers, "off")
    t_base, base = _sweep(configs[:n_base], res.label, workers, "off")
    slope = (t_base - t_half) / (n_base - n_base // 2)
    proj = t_base + slope * (n_runs - n_base)
    print(f"  per-run path: {n_base // 2} runs in {t_half:.1f} s, {n_base} runs in {t_base:.1f} s "
          f"({slope:.3f} s per run beyond the start-up); projected to {n_runs} runs: {proj:.1f} s")
    t_ens, ens = _sweep(configs, res.label, workers, "auto")
    print(f"  ensemble path: {n_runs} runs in {t_ens:.1f} s ({t_ens / n_runs * 1e3:.1f} ms per "
          f"run)")
    print(f"  RATIO per-run (projected) / ensemble: {proj / t_ens:.1f}x   [goal >= 50x]")
    print("  " + _compare(base, {k: ens[k] for k in base}, configs[0].measures))
    n_fun = len({r["function"] for r in ens.values()})
    print(f"  distinct functions among {n_runs} runs: {n_fun} (log P(f) computed once each)")


def profile_boolean(m: int, variant: str) -> None:
    from flatprior.experiments.ensemble import run_ensemble
    from flatprior.experiments.specs import resolve

    configs = resolve("fig2-boolean", "paper", variant, {"seed": list(range(m))}).configs
    # a sweep worker imports these once for all its ensembles: import them before the clock
    # (~1.9 s, which would otherwise count as "other", "kernel" and "sharpness_lbfgsb" of this
    # one ensemble)
    import scipy.optimize  # noqa: F401

    import flatprior.flatness.batched  # noqa: F401
    import flatprior.pipeline  # noqa: F401
    import flatprior.prior.api  # noqa: F401
    import flatprior.train  # noqa: F401

    t0 = time.perf_counter()
    recs = run_ensemble(configs)
    wall = time.perf_counter() - t0
    print(f"\none ensemble of {m} Boolean paper-preset members ({variant} variant) in this "
          f"process: {wall:.1f} s "
          f"({wall / m * 1e3:.1f} ms per member)")
    phases = ("train", "sharpness", "sharpness_lbfgsb", "spectral_norm", "kernel", "log_prior")
    for ph in phases:
        total = sum(r.get(f"{ph}_time_s", 0.0) for r in recs)
        print(f"  {ph:<17s} {total:6.2f} s  ({total / m * 1e3:5.1f} ms per member)")
    other = wall - sum(sum(r.get(f"{ph}_time_s", 0.0) for r in recs) for ph in phases)
    print(f"  {'other':<17s} {other:6.2f} s  (records, kernels' inputs, predictions)")
    n_fun = len({r["function"] for r in recs})
    print(f"  distinct functions: {n_fun} (one batched EP call over them)")


def bench_mnist(data_root: str, workers: int, quick: bool) -> None:
    from flatprior.experiments.runner import preflight
    from flatprior.experiments.specs import resolve

    over = {"data_root": data_root}
    if quick:
        over.update(n_attack=[0, 250, 500], seed=[0, 1])
    res = resolve("fig3", "paper", "mnist-fcn", over)
    configs = res.configs
    preflight(configs)
    print(f"\nfig3 mnist-fcn paper preset: {len(configs)} runs, {workers} workers")
    t_base, base = _sweep(configs, res.label, workers, "off")
    print(f"  per-run path: {t_base:.1f} s")
    t_ens, ens = _sweep(configs, res.label, workers, "auto")
    print(f"  ensemble path: {t_ens:.1f} s")
    print(f"  RATIO per-run / ensemble: {t_base / t_ens:.2f}x   [goal >= 3x]")
    print("  " + _compare(base, ens, configs[0].measures))


def bench_backends(reps: int) -> None:
    import torch

    from flatprior.models import make_model
    from flatprior.models.stacked import stack_parameters, stacked_forward

    print("\nstacked forward+backward of one training step (ms):")
    for d, b, m in ((7, 1, 1000), (784, 128, 55)):
        models = [make_model("fcn", (d,), seed=s) for s in range(m)]
        ps = [p.requires_grad_(True) for p in stack_parameters(models)]
        x, y = torch.randn(m, b, d), (torch.rand(m, b) > 0.5).float()
        row = []
        for backend in ("bmm", "vmap"):
            f = stacked_forward(models[0], backend)
            for _rep in range(2):  # first pass warms up
                t0 = time.perf_counter()
                for _ in range(reps):
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(f(ps, x), y)
                    torch.autograd.grad(loss, ps)
                dt = (time.perf_counter() - t0) / reps * 1e3
            row.append(f"{backend} {dt:.2f}")
        print(f"  FCN {d}-40-40-1, batch {b}, M = {m}: " + ", ".join(row))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 Boolean runs, 6 MNIST runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--boolean-runs", type=int, default=None)
    ap.add_argument("--baseline-runs", type=int, default=None)
    ap.add_argument("--boolean-variant", choices=("sampleable", "majority", "both"),
                    default="both")
    ap.add_argument("--skip-boolean", action="store_true")
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--backends", action="store_true", help="only the bmm/vmap step timing")
    ap.add_argument("--profile", type=int, default=None, metavar="M",
                    help="only: where one ensemble of M Boolean members spends its time")
    ap.add_argument(
        "--data-root",
        default=os.environ.get(
            "FLATPRIOR_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
        ),
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.backends:
        bench_backends(5 if args.quick else 30)
        return
    if args.profile:
        profile_boolean(args.profile, "sampleable" if args.boolean_variant == "both"
                        else args.boolean_variant)
        return
    if not args.skip_boolean:
        n = args.boolean_runs or (100 if args.quick else 1000)
        variants = (("sampleable", "majority") if args.boolean_variant == "both"
                    else (args.boolean_variant,))
        for v in variants:
            bench_boolean(n, min(n, args.baseline_runs or (20 if args.quick else 200)),
                          args.workers, v)
    if not args.skip_mnist:
        bench_mnist(args.data_root, args.workers, args.quick)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
