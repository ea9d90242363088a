"""Benchmark: `flatprior run fig3 mnist-fcn --preset paper` (55 runs: |A| = 0..500 step 50 x 5
seeds, SGD, |S| = 500, |E| = 1000, sharpness + log P(f)) through the runner and the SQLite store.

Prints the wall time of the sweep, the time per run split by phase (data, train, sharpness,
kernel, EP) from the stored records, and compares with a baseline measured in the same run: a
plain loop in this process calling the same library functions (make_task, make_model, train,
flatness + prior measures) without runner or store, on a subset of the configurations (the seed-0
runs). Ratios printed:

* work ratio = per-run time inside the runner / per-run time of the plain loop, same configs
  (> 1 means the runner's worker processes make each run slower);
* sweep efficiency = (sum of per-run times / workers) / sweep wall time (1 = perfect overlap);
* projected plain loop = baseline mean per-run time x 55 / workers vs the measured sweep.

Usage: python benchmarks/bench_fig3.py [--quick] [--workers 2] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

PHASES = ("data_s", "train_time_s", "sharpness_time_s", "kernel_time_s", "log_prior_time_s")
NAMES = {
    "data_s": "data+model",
    "train_time_s": "train",
    "sharpness_time_s": "sharpness",
    "kernel_time_s": "kernel",
    "log_prior_time_s": "EP",
}


def plain_run(cfg) -> dict[str, float]:
    """The same work as flatprior.pipeline.run, as a bare loop body: phases timed."""
    import torch

    from flatprior.pipeline import build_model, build_task, compute_measures
    from flatprior.train import TrainConfig, train

    t0 = time.perf_counter()
    task = build_task(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task.input_shape)
    t_data = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = train(
        model,
        task,
        TrainConfig(
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            max_epochs=cfg.max_epochs,
            seed=cfg.seed,
        ),
    )
    t_train = time.perf_counter() - t1
    model.eval()
    m = compute_measures(model, task, cfg, cfg.measures)
    return {
        "data_s": t_data,
        "train_time_s": t_train,
        "sharpness_time_s": m.get("sharpness_time_s", 0.0),
        "kernel_time_s": m.get("kernel_time_s", 0.0),
        "log_prior_time_s": m.get("log_prior_time_s", 0.0),
        "wall_time_s": time.perf_counter() - t0,
        "status": res.status,
        "log_prior": m.get("log_prior"),
        "sharpness": m.get("sharpness"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 attack sizes x 1 seed (< 30 s)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--data-root",
        default=os.environ.get(
            "FLATPRIOR_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
        ),
    )
    ap.add_argument(
        "--baseline-runs",
        type=int,
        default=None,
        help="configs in the plain-loop baseline (default: 11, quick: 1)",
    )
    args = ap.parse_args(argv)

    import torch

    from flatprior.analysis import correlation_table, wide_table
    from flatprior.experiments.runner import preflight, run_sweep
    from flatprior.experiments.specs import resolve
    from flatprior.experiments.store import Store

    over = {"data_root": args.data_root}
    if args.quick:
        over.update(n_attack=[0, 250, 500], seed=[0])
    res = resolve("fig3", "paper", "mnist-fcn", over)
    configs = res.configs
    preflight(configs)
    n_base = args.baseline_runs or (1 if args.quick else 11)
    base_cfgs = [c for c in configs if c.seed == 0][:n_base]
    print(
        f"fig3 mnist-fcn paper: {len(configs)} runs, {args.workers} workers; baseline: "
        f"plain loop over {len(base_cfgs)} of them (seed 0), 1 thread, this process"
    )

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        t0 = time.perf_counter()
        with Store(db) as st:
            summ = run_sweep(
                configs, st, res.label, info=res.info(), workers=args.workers, progress=False
            )
            recs = {r["key"]: r for r in st.records()}
            df = st.to_frame()
        sweep_wall = time.perf_counter() - t0
    assert summ.failed == 0, [r.get("error") for r in recs.values() if r["status"] == "failed"]
    for r in recs.values():  # data+model = what the record's phases do not cover
        r["data_s"] = r["wall_time_s"] - sum(r.get(p, 0.0) for p in PHASES[1:])

    torch.set_num_threads(1)  # like a runner worker
    base = []
    for cfg in base_cfgs:
        base.append((cfg.key(), plain_run(cfg)))

    def mean(rows, k):
        return statistics.fmean(r.get(k, 0.0) for r in rows)

    runner_rows = list(recs.values())
    same = [recs[k] for k, _ in base]
    brows = [b for _, b in base]
    print(
        f"\nsweep wall time: {sweep_wall:.1f} s for {len(configs)} runs "
        f"({sweep_wall / len(configs):.2f} s per run with {args.workers} workers)"
        + ("   [goal for the paper preset: <= 300 s]" if not args.quick else "")
    )
    print("\nmean time per run by phase (s):")
    print(f"{'phase':<12}{'runner, all':>12}{'runner, subset':>16}{'plain loop':>12}{'ratio':>8}")
    for p in (*PHASES, "wall_time_s"):
        a, b, c = mean(runner_rows, p), mean(same, p), mean(brows, p)
        name = NAMES.get(p, "total")
        print(f"{name:<12}{a:>12.2f}{b:>16.2f}{c:>12.2f}{(b / c if c else float('nan')):>8.2f}")
    work = mean(same, "wall_time_s") / mean(brows, "wall_time_s")
    eff = sum(r["wall_time_s"] for r in runner_rows) / args.workers / sweep_wall
    proj = mean(brows, "wall_time_s") * len(configs) / args.workers
    print(f"\nwork ratio (runner / plain loop, same configs): {work:.2f}")
    print(f"sweep efficiency (sum of run times / workers / wall): {eff:.2f}")
    print(
        f"projected plain loop for all {len(configs)} runs on {args.workers} cores: "
        f"{proj:.1f} s; runner measured {sweep_wall:.1f} s; ratio {sweep_wall / proj:.2f}"
    )
    eq = all(
        abs(recs[k]["log_prior"] - b["log_prior"]) < 1e-6 * abs(b["log_prior"]) for k, b in base
    )
    print(f"plain loop reproduces the stored log P(f) of the same configs: {eq}")
    if len(df) >= 3:
        t = correlation_table(df, n_boot=1000)
        print("\ncorrelation with generalization error (Kendall / Spearman / Pearson, 95 % CI):")
        print(wide_table(t).to_string(index=False))


if __name__ == "__main__":
    main()
