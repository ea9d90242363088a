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
* ``--profile-mnist N``: N fig3 MNIST runs (seed 0) in-process by both paths, their phases,
  the ensemble's matmul floor and the largest ratio any ensemble of the same arithmetic can
  reach (EP costs both paths alike).
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
       [--profile M] [--profile-mnist N]
"""

from __future__ import annotations

import argparse
import math
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
    # what no ensemble of the same arithmetic can beat: the workers' start-up, then the matmuls
    # at the machine's bmm rate, spread over the workers
    start = _startup_time(workers)
    floor = _matmul_floor(configs[: min(250, n_runs)])
    least = start + floor * n_runs / workers
    print(f"  bound: starting {workers} workers {start:.1f} s + matmuls >= {floor * 1e3:.1f} ms "
          f"per run / {workers} workers = {least:.1f} s: any ensemble path of the same "
          f"arithmetic <= {proj / least:.0f}x")


def profile_boolean(m: int, variant: str) -> None:
    from flatprior.experiments.ensemble import run_ensemble
    from flatprior.experiments.specs import resolve

    configs = resolve("fig2-boolean", "paper", variant, {"seed": list(range(m))}).configs
    _import_worker_modules()  # before the clock (~1.9 s), as a sweep worker imports them once

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
    _matmul_floor(configs, wall)


def _bmm_rate(dtype, shape: tuple[int, int, int, int], reps: int = 50) -> float:
    """FLOP/s of ``torch.bmm`` at ``shape = (M, n, k, m)`` (best of five passes: an upper bound)."""
    import torch

    M, n, k, m = shape
    a, b = torch.randn(M, n, k, dtype=dtype), torch.randn(M, k, m, dtype=dtype)
    out = torch.empty(M, n, m, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.bmm(a, b, out=out)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * M * n * k * m / best


def _matmul_floor(configs, wall: float | None = None) -> float:
    """The matmul work of the ensemble and the least time it takes at this machine's bmm rate.

    Counts the FLOPs of every matmul (``torch.utils.flop_counter``: mm, bmm, addmm, baddbmm) of
    a second, identical ensemble run, training separately, and divides them by the rate of
    ``torch.bmm`` at the stack's dominant shapes (float32 training: one batch-1 hidden layer;
    float64 measures: the whole training set through a hidden layer). A lower bound on the
    ensemble's time (EP, element-wise ops and Python are not counted), hence an upper bound on
    what any speed-up of the same arithmetic can reach.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from flatprior.experiments.ensemble import _build_tasks, run_ensemble
    from flatprior.pipeline import build_model
    from flatprior.train import train_ensemble

    c0 = configs[0]
    M, n, width = len(configs), c0.n_train, c0.hidden[0]
    k = max(width, math.prod(_input_shape(c0)))  # the layer with the most multiply-adds
    tasks = _build_tasks(configs)
    models = [build_model(c, t.input_shape) for c, t in zip(configs, tasks, strict=True)]
    with FlopCounterMode(display=False) as fc:
        train_ensemble(models, tasks, configs[0].train_config(), [c.seed for c in configs])
    train_flop = fc.get_total_flops() / M
    with FlopCounterMode(display=False) as fc:
        run_ensemble(configs)
    meas_flop = fc.get_total_flops() / M - train_flop
    b = min(c0.batch_size, n)
    r32 = _bmm_rate(torch.float32, (M, b, k, width))
    r64 = _bmm_rate(torch.float64, (M, n, k, width))
    floor = train_flop / r32 + meas_flop / r64
    print(f"  matmul work per member (torch.utils.flop_counter): training {train_flop / 1e6:.1f} "
          f"MFLOP (float32), measures {meas_flop / 1e6:.1f} MFLOP (float64); this machine's bmm "
          f"at these shapes: {r32 / 1e9:.1f} GFLOP/s float32 [{M}, {b}, {k}] x [{k}, "
          f"{width}], {r64 / 1e9:.1f} GFLOP/s float64 [{M}, {n}, {k}] x [{k}, {width}]")
    if wall is not None:
        print(f"  => the matmuls alone take >= {floor * 1e3:.1f} ms per member; measured "
              f"{wall / M * 1e3:.1f} ms ({floor / (wall / M):.0%} of it)")
    return floor


def _import_worker_modules(_=None) -> None:
    """Import what a sweep worker imports once for all its runs and ensembles.

    The profiles call it before their clocks start (else ~1.9 s of imports would count as
    "other", "kernel" and "sharpness_lbfgsb" of one ensemble); :func:`_startup_time` runs it in
    each new worker.
    """
    import scipy.optimize  # noqa: F401

    import flatprior.experiments.ensemble  # noqa: F401
    import flatprior.flatness.batched  # noqa: F401
    import flatprior.pipeline  # noqa: F401
    import flatprior.prior.api  # noqa: F401
    import flatprior.train  # noqa: F401


def _startup_time(workers: int) -> float:
    """Seconds to spawn ``workers`` processes that import what a sweep worker imports."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_import_worker_modules, range(workers)))
    return time.perf_counter() - t0


def _input_shape(cfg) -> tuple[int, ...]:
    from flatprior.experiments.ensemble import _build_tasks

    return tuple(_build_tasks([cfg])[0].input_shape)


def profile_mnist(data_root: str, n_runs: int) -> None:
    """In-process (one thread): fig3 mnist-fcn paper runs of seed 0 by both paths, and the bound.

    The per-run path (``pipeline.run`` per config) and one ensemble of the same runs, their
    phases, the ensemble's matmul floor (:func:`_matmul_floor`) and the largest ratio any
    ensemble could reach: per-run time / (matmul floor + the ensemble's EP and kernel time,
    which both paths spend alike: one EP per distinct function).
    """
    from flatprior.experiments.ensemble import run_ensemble
    from flatprior.experiments.specs import resolve
    from flatprior.pipeline import run

    res = resolve("fig3", "paper", "mnist-fcn", {"data_root": data_root, "seed": 0})
    configs = res.configs[:n_runs]
    _import_worker_modules()  # before the clock, as in a sweep worker

    phases = ("train", "sharpness", "sharpness_lbfgsb", "kernel", "log_prior")
    rows = {}
    for name, fn in (("per-run", lambda: [run(c) for c in configs]),
                     ("ensemble", lambda: run_ensemble(configs))):
        t0 = time.perf_counter()
        recs = fn()
        rows[name] = (time.perf_counter() - t0, recs)
        per = {ph: sum(r.get(f"{ph}_time_s", 0.0) for r in recs) / len(recs) for ph in phases}
        print(f"  {name:<8s} {rows[name][0]:6.1f} s for {len(recs)} runs: "
              + ", ".join(f"{ph} {v:.2f}" for ph, v in per.items()) + " s per run")
    t_run, _ = rows["per-run"]
    t_ens, recs = rows["ensemble"]
    floor = _matmul_floor(configs, t_ens)
    ep = sum(r.get("log_prior_time_s", 0.0) + r.get("kernel_time_s", 0.0) for r in recs)
    bound = t_run / (floor * len(configs) + ep)
    print(f"  ratio per-run / ensemble here: {t_run / t_ens:.2f}x; any ensemble of the same "
          f"arithmetic: <= {bound:.2f}x (matmul floor + EP)   [goal >= 3x]")


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
    ap.add_argument("--profile-mnist", type=int, default=None, metavar="N",
                    help="only: N fig3 MNIST runs (seed 0) in-process by both paths, and the "
                    "largest ratio any ensemble of the same arithmetic could reach")
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
    if args.profile_mnist:
        print(f"\nfig3 mnist-fcn paper preset, seed 0, {args.profile_mnist} runs, in this "
              "process (one thread):")
        profile_mnist(args.data_root, args.profile_mnist)
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
