"""Trainer overhead: FCN 784-40-40-1 on 500 MNIST images to zero training error.

Baseline, measured in the same run: a bare torch loop doing the same work (same init, same batch
order, same SGD steps, train accuracy on S after every epoch). Goal: trainer overhead ≤ 10 %.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from flatprior.data import make_task
from flatprior.models import make_model
from flatprior.train import TrainConfig, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def bare_loop(model, task, lr: float, seed: int, max_epochs: int) -> int:
    """The minimal loop: shuffle, SGD on mean BCE, accuracy on S after each epoch."""
    x, y = task.x_train, task.y_train
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(1, max_epochs + 1):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 128):
            idx = perm[i : i + 128]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]).reshape(-1), y[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            if ((model(x).reshape(-1) > 0).float() == y).all():
                return epoch
    return max_epochs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2 seeds instead of 5")
    ap.add_argument("--data-root", default=str(DATA))
    args = ap.parse_args(argv)
    task = make_task("mnist", 500, 0, 1000, seed=0, data_root=args.data_root)
    seeds = range(2 if args.quick else 5)
    bare_loop(make_model("fcn", task.input_shape), task, 0.1, 0, 5)  # warm-up (allocator, MKL)
    t_bare = t_fp = t_fp_test = 0.0
    epochs = 0
    for seed in seeds:
        m = make_model("fcn", task.input_shape, seed=seed)
        t0 = time.perf_counter()
        e_bare = bare_loop(m, task, 0.1, seed, 2000)
        t_bare += time.perf_counter() - t0
        m = make_model("fcn", task.input_shape, seed=seed)
        t0 = time.perf_counter()
        r = train(m, task, TrainConfig(lr=0.1, seed=seed, track_test=False))
        t_fp += time.perf_counter() - t0
        assert r.epochs_to_zero_error == e_bare, "trainer and bare loop must do the same work"
        epochs += e_bare
        m = make_model("fcn", task.input_shape, seed=seed)
        t0 = time.perf_counter()
        train(m, task, TrainConfig(lr=0.1, seed=seed, track_test=True))
        t_fp_test += time.perf_counter() - t0
    print(f"bench_train: FCN 784-40-40-1, |S|=500 MNIST, {len(seeds)} seeds, {epochs} epochs total")
    print(f"  bare torch loop            {epochs / t_bare:8.1f} epochs/s   (baseline)")
    print(f"  flatprior.train            {epochs / t_fp:8.1f} epochs/s   "
          f"overhead {100 * (t_fp / t_bare - 1):+.1f} %  (goal <= +10 %)")
    print(f"  + test-set metrics/epoch   {epochs / t_fp_test:8.1f} epochs/s   "
          f"overhead {100 * (t_fp_test / t_bare - 1):+.1f} %  (extra work: |E|=1000 and A)")


if __name__ == "__main__":
    main()
