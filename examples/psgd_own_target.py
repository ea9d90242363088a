"""Your own Boolean target: does SGD find functions as often as the Bayesian posterior has them?

Run: ``.venv/bin/python examples/psgd_own_target.py`` (≈ 30 s on a laptop CPU).

The Boolean system of the study (FCN 7-40-40-1 on the 128 points of {0,1}^7) with a target of
your own, here "all 7 bits set" (1 on one input of 128). For one training set S of 4 inputs it

1. trains 1000 networks at once (:func:`flatprior.train.train_ensemble`, one initialisation
   and batch order per seed) and counts the function each one found on all 128 inputs:
   ``P_SGD(f)``;
2. samples 1e6 random networks of the same architecture and initialisation
   (:func:`flatprior.prior.sample_boolean_prior`) and keeps those that fit S: the Bayesian
   posterior ``P_B(f | S)`` (Mingard et al., JMLR 22, 2021);
3. measures the Keskar sharpness of every trained network in one batched call
   (:func:`flatprior.flatness.batched_keskar_sharpness`) and compares it with the log prior of
   its function.

Whether a comparison is possible depends on the labels of S: with most targets the functions
SGD finds are too rare for any sample of random networks to see (the script says so);
``benchmarks/choose_boolean_target.py`` measures this for candidate targets. The same analysis
at paper scale is ``flatprior run psgd-boolean --preset paper`` and ``flatprior report``; this
script shows the library calls underneath, for targets and training sets that no spec ships.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import kendalltau

from flatprior.data import make_task
from flatprior.data.boolean import boolean_inputs
from flatprior.flatness.batched import batched_keskar_sharpness
from flatprior.models import make_model
from flatprior.prior import sample_boolean_prior
from flatprior.train import TrainConfig, predict, train_ensemble

N_NETS, N_PRIOR, N_TRAIN = 1000, 1_000_000, 4
SIGMA_W2, SIGMA_B2 = 1.0, 1.0  # the sampled prior must use the trained networks' initialisation


def all_bits_set(x: np.ndarray) -> np.ndarray:
    """Your target: any function of the ``[128, 7]`` inputs to {0, 1}."""
    return x.min(axis=1).astype(np.float32)


def main(n_nets: int = N_NETS, n_prior: int = N_PRIOR) -> dict:
    task = make_task("boolean", n_train=N_TRAIN, n_attack=0, n_test=128 - N_TRAIN, seed=0,
                     target=all_bits_set)
    models = [make_model("fcn", task.input_shape, sigma_w2=SIGMA_W2, sigma_b2=SIGMA_B2, seed=s)
              for s in range(n_nets)]
    outs = train_ensemble(models, task, TrainConfig(optimizer="sgd", lr=0.1, batch_size=8),
                          seeds=range(n_nets))
    fitted = [m for m, o in zip(models, outs, strict=True)
              if o.error is None and o.result.status == "zero_error"]
    cube = torch.as_tensor(boolean_inputs())
    bits = np.array([predict(m, cube).numpy() for m in fitted], dtype=np.int8)  # [runs, 128]
    functions, n_found = np.unique(bits, axis=0, return_counts=True)
    p_sgd = n_found / len(fitted)

    prior = sample_boolean_prior(n_prior, (7, 40, 40, 1), SIGMA_W2, SIGMA_B2, seed=0)
    s_idx = task.idx_train
    posterior = prior.posterior(s_idx, task.y_train.numpy())
    p_b = posterior.counts_of(functions) / posterior.n_samples
    both = p_b > 0

    # sharpness of every trained network (one batched ascent), mean per function
    sharp = np.array(batched_keskar_sharpness(fitted, task.x_train, task.y_train, eps=1e-4,
                                              epochs=20, seeds=list(range(len(fitted)))).value)
    which = np.unique(bits, axis=0, return_inverse=True)[1].reshape(-1)
    mean_sharp = np.bincount(which, weights=sharp) / n_found
    with np.errstate(divide="ignore"):
        log_prior = np.log(prior.counts_of(functions) / prior.n_samples)  # -inf: never sampled
    seen = np.isfinite(log_prior)

    print(f"{len(fitted)} of {n_nets} networks fit S (|S| = {N_TRAIN}); {len(functions)} "
          f"distinct functions; {int(posterior.n_samples)} of {n_prior} random networks fit S")
    print(f"{'P_SGD':>8} {'P_B(f|S)':>9} {'sharpness':>10}  function (128 bits, hex)")
    for k in np.argsort(-p_sgd, kind="stable")[:8]:
        hexf = np.packbits(functions[k]).tobytes().hex()
        print(f"{p_sgd[k]:8.3f} {p_b[k]:9.2e} {mean_sharp[k]:10.4f}  {hexf}")
    tau = tau_sharp = float("nan")
    if both.sum() < 3:
        print(f"only {int(both.sum())} of the {len(functions)} functions SGD found are in the "
              "posterior sample: too few to correlate (many distinct functions: too rare, draw "
              "more random networks or give S simpler labels; few: run more networks)")
    else:
        tau = kendalltau(np.log(p_sgd[both]), np.log(p_b[both])).statistic
        tau_sharp = kendalltau(mean_sharp[seen], log_prior[seen]).statistic
        print(f"Kendall tau(log P_SGD, log P_B) over the {int(both.sum())} functions both "
              f"found: {tau:+.2f}")
        print(f"Kendall tau(mean sharpness, log P(f)) over the {int(seen.sum())} sampled "
              f"functions: {tau_sharp:+.2f}")
    return {"n_fit": len(fitted), "functions": functions, "n_found": n_found, "p_sgd": p_sgd,
            "p_b": p_b, "tau": tau, "mean_sharpness": mean_sharp, "sharpness": sharp,
            "which": which, "tau_sharpness": tau_sharp, "prior": prior, "posterior": posterior,
            "s_idx": s_idx, "bits": bits}


if __name__ == "__main__":
    main()
