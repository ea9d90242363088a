"""EP vs certified (importance-sampling) log P(f) on the MNIST FCN attack-set sweep.

Setting (REFERENCE.md): |S| = 500 training digits, |E| = 1000 test digits, label = digit >= 5,
pixels / 255; FCN 784-40-40-1 (He-normal weights, N(0, 1) biases) trained with plain SGD
(lr 0.1, mean BCE-with-logits, batch 128) on S plus an attack set A of |A| flipped-label digits
until 100 % accuracy on S ∪ A. f's labels on S ∪ E are the network's own predictions; the
kernel is the arc-cosine NNGP kernel (depth 2, σ_w² = 2, σ_b² = 1) on those 1500 inputs.

Printed: per attack size the test error, EP log P, the sampling estimate ± SE (95 % CI), the
difference and the time of each (EP is the baseline: time ratio tilting / EP); Kendall τ and
Spearman ρ of each estimate with the test error; and how the sampling estimator's SE and time
scale with n. The network trainer is a plain torch loop so the benchmark does not depend on the
library's trainer.

Run: ``python benchmarks/bench_tilting.py`` (≈ 5 min on 2 busy cores) or ``--quick``
(|S| = 100, |E| = 200, ≈ 30 s).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from flatprior.prior.ep import log_prior_ep
from flatprior.prior.kernels import arccos_kernel
from flatprior.prior.tilting import log_prior_tilting

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def load_mnist_t10k(root: Path = MNIST) -> tuple[np.ndarray, np.ndarray]:
    """t10k images ``[10000, 784]`` in [0, 1] (float32) and binary labels (digit >= 5)."""
    from flatprior.data.mnist import load_mnist_raw  # the project's validated IDX reader

    x, lab = load_mnist_raw(root.parent)["test"]
    x = x.reshape(-1, 784)
    return (x / 255.0).astype(np.float32), (lab >= 5).astype(np.float32)


def make_fcn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(784, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
                              torch.nn.ReLU(), torch.nn.Linear(40, 1))
    for m in net:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # var 2 / fan_in
            torch.nn.init.normal_(m.bias, 0.0, 1.0)
    return net


def train_to_zero_error(x: np.ndarray, y: np.ndarray, seed: int, *, lr: float = 0.1,
                        batch: int = 128, max_epochs: int = 3000) -> tuple[torch.nn.Module, int]:
    """SGD on mean BCE until every point of (x, y) is classified right; returns (net, epochs)."""
    net = make_fcn(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(1, max_epochs + 1):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss_fn(net(xt[idx]).squeeze(1), yt[idx]).backward()
            opt.step()
        with torch.no_grad():
            acc = ((net(xt).squeeze(1) > 0).float() == yt).float().mean().item()
        if acc == 1.0:
            return net, epoch
    raise RuntimeError(f"training did not reach zero error in {max_epochs} epochs (acc {acc})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="|S|=100, |E|=200, 3 attack sizes")
    ap.add_argument("--attacks", type=int, nargs="*", help="attack-set sizes")
    ap.add_argument("--samples", type=int, default=None,
                    help="particles / samples per estimate (default 32000, --quick 8000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    args = ap.parse_args(argv)
    if args.samples is None:
        args.samples = 8000 if args.quick else 32_000
    torch.set_num_threads(2)
    n_s, n_e = (100, 200) if args.quick else (500, 1000)
    attacks = args.attacks if args.attacks else ([0, 50, 100] if args.quick
                                                 else [0, 100, 250, 500])
    x, lab = load_mnist_t10k()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(x))
    i_s, i_e = order[:n_s], order[n_s : n_s + n_e]
    i_a = order[n_s + n_e : n_s + n_e + max(attacks)]
    x_se = x[np.concatenate([i_s, i_e])]
    t = time.perf_counter()
    K = arccos_kernel(torch.from_numpy(x_se).double(), depth=2, sigma_w2=2.0, sigma_b2=1.0)
    K = K.numpy()
    print(f"MNIST FCN: |S| = {n_s}, |E| = {n_e}, n = {n_s + n_e}; kernel "
          f"{time.perf_counter() - t:.2f} s; samples per estimate {args.samples}")
    hdr = (f"{'|A|':>4} {'ep':>3} {'test err':>8} {'EP logP':>10} {'IS logP':>10} {'SE':>6} "
           f"{'95% CI':>21} {'IS-EP':>7} {'bound':>9} {'prop':>7} {'t_EP':>6} {'t_IS':>6}")
    print(hdr)
    rows = []
    for a in attacks:
        xa = np.concatenate([x[i_s], x[i_a[:a]]])
        ya = np.concatenate([lab[i_s], 1.0 - lab[i_a[:a]]])
        net, epochs = train_to_zero_error(xa, ya, seed=args.seed + a)
        with torch.no_grad():
            pred = (net(torch.from_numpy(x_se)).squeeze(1) > 0).numpy().astype(float)
        test_err = float(np.mean(pred[n_s:] != lab[i_e]))
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = log_prior_ep(K, pred)
        t_ep = time.perf_counter() - t
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            r = log_prior_tilting(K, pred, n_samples=args.samples, seed=args.seed)
        flag = "" if r.reliable else " (unreliable)"
        flag += "" if ep.converged else " (EP not converged)"
        rows.append((a, test_err, ep.log_prob, r, pred))
        print(f"{a:>4} {epochs:>3} {test_err:>8.3f} {ep.log_prob:>10.2f} {r.log_prob:>10.2f} "
              f"{r.std_err:>6.3f} [{r.ci_low:>9.2f},{r.ci_high:>9.2f}] "
              f"{r.log_prob - ep.log_prob:>7.2f} {r.log_upper_bound:>9.2f} {r.proposal:>7} "
              f"{t_ep:>6.1f} {r.wall_time:>6.1f}{flag}"
              + ("" if not w else f"  [{len(w)} warning(s)]"))
    errs = np.array([row[1] for row in rows])
    ep_vals = np.array([row[2] for row in rows])
    is_vals = np.array([row[3].log_prob for row in rows])
    if len(rows) >= 3:
        print("correlation with test error (log P should fall as the error grows):")
        for name, v in (("EP", ep_vals), ("tilting/SMC", is_vals)):
            tau = kendalltau(v, errs).statistic
            rho = spearmanr(v, errs).statistic
            print(f"  {name:<12} Kendall tau = {tau:+.3f}   Spearman rho = {rho:+.3f}")
        same = (np.argsort(ep_vals) == np.argsort(is_vals)).all()
        print(f"  EP and sampling rank the functions {'identically' if same else 'differently'};"
              f" EP - sampling offsets: {np.round(ep_vals - is_vals, 2).tolist()}")

    if args.no_scaling:
        return
    print(f"\nscaling (labels of the |A| = {rows[0][0]} network on the first n points of S ∪ E; "
          f"ep proposal, {args.samples} particles; M_0.05 / t_0.05 = samples / time for SE 0.05 "
          "extrapolated with SE ∝ 1/√M):")
    print(f"{'n':>5} {'logP':>10} {'SE':>6} {'t_IS':>6} {'M_0.05':>8} {'t_0.05':>7} {'t_EP':>6} "
          f"{'t_IS/t_EP':>9}")
    net_labels = rows[0][4]
    sizes = [n for n in (250, 500, 1000, 1500) if n <= len(x_se)]
    for n in sizes:
        Kn = K[:n, :n]
        yn = net_labels[:n]
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = log_prior_ep(Kn, yn)
        t_ep = time.perf_counter() - t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = log_prior_tilting(Kn, yn, n_samples=args.samples, seed=args.seed, proposal="ep")
        m05 = r.n_samples * (r.std_err / 0.05) ** 2
        t05 = r.time_setup + r.time_sample * m05 / r.n_samples
        print(f"{n:>5} {r.log_prob:>10.2f} {r.std_err:>6.3f} {r.wall_time:>6.1f} {m05:>8.0f} "
              f"{t05:>7.1f} {t_ep:>6.1f} {r.wall_time / t_ep:>9.1f}"
              + ("" if r.reliable else " (unreliable)"))
    n = sizes[-1]
    m_direct = (1 if args.quick else 3) * args.samples
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = log_prior_tilting(K[:n, :n], net_labels[:n], n_samples=m_direct, seed=args.seed + 1,
                              proposal="ep", n_replicates=16)
    print(f"direct run at n = {n}, {m_direct} particles in 16 replicates: log P = "
          f"{r.log_prob:.2f}, SE {r.std_err:.3f} (replicate sd {r.replicate_log_sd:.2f} nats) in "
          f"{r.wall_time:.1f} s (goal: SE <= 0.05 in <= 60 s on 2 cores)")


if __name__ == "__main__":
    main()
