"""Benchmark of the function-prior code, each figure with its baseline measured in the same run.

(a) EP (log_prior_ep) on the arc-cosine kernel of n MNIST test images (label = digit >= 5)
    vs one float64 Cholesky of the same kernel (goal: EP <= 60 s at n = 10000, ratio <= 20);
    also reports where the cheaper log-P-change stopping rule (1e-6 relative) would have
    stopped and how far its value is from the site-rule value.
(b) vs GPy's EP (optional dependency) with the Heaviside link and a fixed kernel, n = 1000
    and 2000: same log P to 1e-4 relative, speed ratio.
(c) Boolean sampler (FCN 7-40-40-1): networks per second vs the time torch needs only to draw
    the same number of Gaussian weights (RNG bound), independent networks and antithetic pairs
    (the default: a network and its twin with the last layer negated).

Run: ``python benchmarks/bench_prior.py`` (about 3 min) or ``--quick`` (< 30 s); ``--only c``
runs one part.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
import warnings
from pathlib import Path

import numpy as np

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
print = functools.partial(print, flush=True)  # noqa: A001 - progress visible when piped


def load_mnist(n: int) -> tuple[np.ndarray, np.ndarray]:
    """First ``n`` t10k images as float64 [n, 784] in [0, 1] and labels (digit >= 5) in {0,1}."""
    from flatprior.data.mnist import load_mnist_raw

    images, labels = load_mnist_raw(MNIST.parent)["test"]
    return images[:n].reshape(n, 784).astype(np.float64) / 255.0, (labels[:n] >= 5).astype(np.int64)


def _cholesky_seconds(K: np.ndarray) -> float:
    from scipy.linalg import lapack

    buf = np.asfortranarray(K)  # copy, F-ordered as EP uses it
    t = time.perf_counter()
    _, info = lapack.dpotrf(buf, lower=1, overwrite_a=1)
    dt = time.perf_counter() - t
    if info != 0:
        raise RuntimeError("Cholesky failed")
    return dt


def bench_ep(n: int) -> None:
    from flatprior.prior import arccos_kernel, log_prior_ep

    x, y = load_mnist(n)
    t = time.perf_counter()
    K = arccos_kernel(x, depth=2, sigma_w2=2.0, sigma_b2=1.0).numpy()
    t_kernel = time.perf_counter() - t
    t_chol = _cholesky_seconds(K)
    print(f"(a) EP on MNIST arc-cosine kernel, n = {n} (true labels, digit >= 5)")
    print(f"    kernel build          {t_kernel:8.2f} s")
    print(f"    one Cholesky (f64)    {t_chol:8.2f} s   <- baseline")
    t = time.perf_counter()
    res = log_prior_ep(K, y)
    t_ep = time.perf_counter() - t
    print(
        f"    EP (site tol 1e-6)    {t_ep:8.2f} s   iterations {res.n_iter}, "
        f"converged {res.converged}, log P = {res.log_prob:.6f}"
    )
    print(
        f"    ratio EP / Cholesky   {t_ep / t_chol:8.1f}      (goal <= 20; EP goal <= 60 s "
        "at n = 10000)"
    )
    hist = np.array(res.history)
    rel = np.abs(np.diff(hist)) / np.maximum(1.0, np.abs(hist[1:]))
    hit = np.flatnonzero(rel <= 1e-6)
    if hit.size:
        k = int(hit[0]) + 1
        diff = abs(hist[k] - res.log_prob) / abs(res.log_prob)
        print(
            f"    log-P-change rule (1e-6 rel.) would stop after {k} updates, value "
            f"{hist[k]:.6f}: rel. diff to site rule {diff:.1e}; estimated time "
            f"{t_ep * k / res.n_iter:.1f} s, ratio {t_ep * k / res.n_iter / t_chol:.1f}"
        )


def bench_gpy(sizes: list[int]) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import GPy
    except Exception as exc:  # optional dependency: skip gracefully
        print(f"(b) GPy comparison skipped: GPy not importable ({type(exc).__name__}: {exc})")
        return
    from flatprior.prior import arccos_kernel, log_prior_ep

    print("(b) vs GPy EP (Bernoulli + Heaviside link, kern.Fixed), same kernel and labels")
    for n in sizes:
        x, y = load_mnist(n)
        K = arccos_kernel(x).numpy()
        t = time.perf_counter()
        ours = log_prior_ep(K, y).log_prob
        t_ours = time.perf_counter() - t
        lik = GPy.likelihoods.Bernoulli(gp_link=GPy.likelihoods.link_functions.Heaviside())
        inf = GPy.inference.latent_function_inference.expectation_propagation.EP()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            model = GPy.core.GP(
                X=np.arange(n, dtype=float)[:, None],
                Y=y[:, None].astype(float),
                kernel=GPy.kern.Fixed(1, K),
                likelihood=lik,
                inference_method=inf,
            )
            gpy = float(model.log_likelihood())
            t_gpy = time.perf_counter() - t
        rel = abs(ours - gpy) / abs(gpy)
        print(
            f"    n = {n:5d}: ours {ours:.6f} in {t_ours:6.2f} s | GPy {gpy:.6f} in "
            f"{t_gpy:6.2f} s | rel. diff {rel:.1e} (goal <= 1e-4) | speed-up "
            f"{t_gpy / t_ours:5.1f}x (goal >= 30x)"
        )


def bench_boolean(n_samples: int, n_workers: int | None) -> None:
    import torch

    from flatprior.prior import sample_boolean_prior

    widths = (7, 40, 40, 1)
    per_net = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    sample_boolean_prior(1000, seed=99)  # warm-up
    t = time.perf_counter()
    prior = sample_boolean_prior(n_samples, widths=widths, seed=1, n_workers=n_workers,
                                 antithetic=False)
    t_sample = time.perf_counter() - t
    t = time.perf_counter()
    paired = sample_boolean_prior(n_samples, widths=widths, seed=1, n_workers=n_workers)
    t_paired = time.perf_counter() - t
    # baseline: the faster of torch.randn (fresh tensor per call) and Tensor.normal_ into one
    # reused buffer, in calls of 1024 networks, one generator (torch draws serially per
    # generator; the sampler draws into a reused buffer too, so normal_ is the fair bound)
    batch = 1024
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for lo in range(0, n_samples, batch):
        torch.randn(min(batch, n_samples - lo) * per_net, generator=gen)
    t_randn = time.perf_counter() - t
    buf = torch.empty(batch * per_net)
    t = time.perf_counter()
    for lo in range(0, n_samples, batch):
        buf[: min(batch, n_samples - lo) * per_net].normal_(generator=gen)
    t_normal = time.perf_counter() - t
    t_rng = min(t_randn, t_normal)
    workers = n_workers or torch.get_num_threads()
    print(f"(c) Boolean sampler, FCN {widths}, {n_samples} networks, {workers} worker threads")
    print(f"    sampler, independent networks {n_samples / t_sample:10.0f} networks/s   "
          "(goal >= 6e4)")
    print(f"    sampler, antithetic pairs     {n_samples / t_paired:10.0f} networks/s   "
          f"(default; {t_sample / t_paired:.2f}x the independent rate)")
    print(
        f"    RNG only {n_samples / t_rng:10.0f} networks/s   <- baseline ({per_net} "
        f"Gaussians per network; torch.randn {n_samples / t_randn:.0f}/s, normal_ into a "
        f"buffer {n_samples / t_normal:.0f}/s)"
    )
    print(f"    ratio independent sampler / RNG bound {t_rng / t_sample:.2f}   (goal >= 0.7)")
    for name, p in (("independent", prior), ("antithetic", paired)):
        row = p.table(1).iloc[0]
        print(f"    most frequent function ({name}) {row.function}: log P = {row.log_p:.3f} "
              f"[{row.log_p_ci_low:.3f}, {row.log_p_ci_high:.3f}]")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 30 s")
    parser.add_argument("--n-ep", type=int, default=None, help="n for (a) (default 10000)")
    parser.add_argument("--workers", type=int, default=None,
                        help="threads for (c) (default: torch's thread count)")
    parser.add_argument(
        "--gpy-sizes",
        type=int,
        nargs="*",
        default=None,
        help="n for (b) (default 1000; GPy takes ~12 min at n = 2000)",
    )
    parser.add_argument("--only", choices=("a", "b", "c"), default=None,
                        help="run one part: a (EP), b (vs GPy) or c (Boolean sampler)")
    args = parser.parse_args(argv)
    n_ep = args.n_ep or (1500 if args.quick else 10_000)
    t0 = time.perf_counter()
    if args.only in (None, "a"):
        bench_ep(n_ep)
    if args.only in (None, "b"):
        bench_gpy(args.gpy_sizes or ([300] if args.quick else [1000]))
    if args.only in (None, "c"):
        bench_boolean(40_000 if args.quick else 400_000, args.workers)
    print(f"total {time.perf_counter() - t0:.1f} s; load average {_load():s}")


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
