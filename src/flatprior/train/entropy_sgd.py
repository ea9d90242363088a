"""Entropy-SGD, an optimizer that biases gradient descent into wide valleys.

Chaudhari et al., "Entropy-SGD: biasing gradient descent into wide valleys", ICLR 2017.

Written here because no maintained package ships it (the authors' reference code is an
unpackaged research repository pinned to an old PyTorch). Algorithm 1 of the paper, per outer
step with weights x:

    x' <- x, mu <- x
    repeat L times:                               (SGLD on the local-entropy Gibbs measure)
        g  = grad f(x') - gamma (x - x')  (+ weight decay)
        x' <- x' - eta' g + sqrt(eta') * noise * N(0, I)
        mu <- (1 - alpha) mu + alpha x'
    x <- x - eta * gamma (x - mu)                 (gradient of the negative local entropy)
    gamma <- gamma (1 + gamma_growth)             ("scoping")

With ``inner_steps = 1, alpha = 1, noise = 0, gamma_growth = 0`` one outer step is exactly
an SGD step with learning rate ``eta * gamma * eta'`` (tested).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class EntropySGD(Optimizer):
    """Entropy-SGD; ``step(closure)`` needs a closure returning the loss after ``backward()``.

    The closure is evaluated ``inner_steps`` times on the same mini-batch (the trainer passes the
    current batch); the paper draws fresh mini-batches inside the loop — here one outer step costs
    ``inner_steps`` gradient evaluations of one batch.
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        gamma: float = 0.3,
        gamma_growth: float = 1e-3,
        noise: float = 1e-4,
        alpha: float = 0.75,
        weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        if lr <= 0 or inner_lr <= 0 or inner_steps < 1 or gamma <= 0 or not 0 < alpha <= 1:
            raise ValueError(
                "EntropySGD needs lr, inner_lr, gamma > 0, inner_steps >= 1, alpha in (0, 1]"
            )
        defaults = dict(
            lr=lr,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            gamma=gamma,
            gamma_growth=gamma_growth,
            noise=noise,
            alpha=alpha,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        # source of the Langevin noise (None: torch's global generator)
        self.generator = generator

    @torch.no_grad()
    def step(self, closure=None):
        """One outer step (``L`` inner Langevin steps, each calling ``closure``)."""
        if closure is None:
            raise RuntimeError("EntropySGD.step needs a closure that recomputes the loss")
        groups = self.param_groups
        x0 = [[p.detach().clone() for p in g["params"]] for g in groups]
        mu = [[p.detach().clone() for p in g["params"]] for g in groups]
        loss = None
        n_inner = groups[0]["inner_steps"]
        for _ in range(n_inner):
            with torch.enable_grad():
                value = closure()
            loss = value if loss is None else loss
            for g, xs, ms in zip(groups, x0, mu, strict=True):
                lr_in, gam, a = g["inner_lr"], g["gamma"], g["alpha"]
                for p, x, m in zip(g["params"], xs, ms, strict=True):
                    if p.grad is None:
                        continue
                    d = p.grad + g["weight_decay"] * p - gam * (x - p)
                    p.add_(d, alpha=-lr_in)
                    if g["noise"] > 0:
                        noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype,
                                            device=p.device)
                        p.add_(noise, alpha=math.sqrt(lr_in) * g["noise"])
                    m.mul_(1 - a).add_(p, alpha=a)
        for g, xs, ms in zip(groups, x0, mu, strict=True):
            for p, x, m in zip(g["params"], xs, ms, strict=True):
                p.copy_(x - g["lr"] * g["gamma"] * (x - m))
            g["gamma"] *= 1 + g["gamma_growth"]
        return loss
