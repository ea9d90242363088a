"""Your own data and your own network: flatness and log P(f) of the function it finds.

Run: ``.venv/bin/python examples/own_data_and_model.py`` (≈ 20 s on a laptop CPU).

The data here are two interleaved half-moons from scikit-learn standing in for yours; the
network is a custom ``nn.Module`` (not one of flatprior's). Its NNGP kernel has no closed form
in general, so log P(f) uses the Monte-Carlo kernel of the network's last hidden layer.
"""

from __future__ import annotations

import torch
from sklearn.datasets import make_moons
from torch import nn

from flatprior.data import task_from_arrays
from flatprior.flatness import hessian_spectral_norm, keskar_sharpness
from flatprior.models import init_weights
from flatprior.prior import empirical_kernel, log_prior
from flatprior.train import TrainConfig, predict, train


class MyNet(nn.Module):
    """Any module with one output logit whose last registered module is the output Linear."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        return self.head(self.body(x))


def make_net(seed: int) -> nn.Module:
    return init_weights(MyNet(), seed=seed)  # He-normal weights, N(0, 1) biases


def main() -> list[dict]:
    x, y = make_moons(n_samples=1200, noise=0.1, random_state=0)
    rows = []
    for n_attack in (0, 100, 200):
        task = task_from_arrays(x, y, n_train=300, n_attack=n_attack, n_test=500, seed=0)
        model = make_net(seed=0)
        res = train(model, task, TrainConfig(optimizer="adam", max_epochs=3000))
        loss = nn.BCEWithLogitsLoss()
        targets = task.y_train[:, None]
        sharp = keskar_sharpness(model, loss, task.x_train, targets, eps=1e-4, method="lbfgsb")
        lam = hessian_spectral_norm(model, loss, task.x_train, targets)
        xs = torch.cat([task.x_train, task.x_test])
        K = empirical_kernel(make_net, xs, n_draws=200, seed=1)  # MC NNGP kernel, float64
        logp = log_prior(K, predict(model, xs), method="ep").log_prob
        rows.append(dict(n_attack=n_attack, status=res.status, test_error=res.test_error,
                         sharpness=sharp, spectral_norm=lam, log_prior=logp))
        print(f"|A| = {n_attack:3d}  {res.status:24s}  test error {res.test_error:.3f}  "
              f"sharpness {sharp:.4f}  spectral norm {lam:8.3f}  log P(f) {logp:9.2f}")
    return rows


if __name__ == "__main__":
    main()
