"""Optimizers by name, with defaults that train the study's networks to zero error.

Learning rates are for the *mean* BCE-with-logits loss over a batch (the authors' code summed
it: lr 1e-3 summed over a batch of 128 ≈ lr 0.128 with the mean).

``sam`` / ``asam``: sharpness-aware minimisation (Foret et al., ICLR 2021) and its adaptive
version (Kwon et al., ICML 2021) from pytorch-optimizer (``pytorch_optimizer.SAM``, ``adaptive``
flag: perturbation ``rho T^2 g / ||T g||`` with ``T = |w|``), both around plain SGD. Every step
takes two gradients (at ``w`` and at the perturbed weights): ``step_style="sam"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from flatprior.errors import check_choice, check_positive
from flatprior.train.entropy_sgd import EntropySGD


def _sam(params, **kwargs: Any) -> torch.optim.Optimizer:
    """``pytorch_optimizer.SAM(params, **kwargs)``, imported on first use.

    pytorch-optimizer takes ~1 s to import (its whole optimizer zoo), which every sweep worker
    and CLI call that imports :mod:`flatprior.train` would otherwise pay.
    """
    from pytorch_optimizer import SAM

    return SAM(params, **kwargs)


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer class with the study's default learning rate and keyword arguments."""

    cls: Callable[..., torch.optim.Optimizer]
    lr: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    full_batch: bool = False
    doc: str = ""
    #: how the trainer calls ``step``: ``"plain"`` (backward, then ``step()``), ``"closure"``
    #: (``step(closure)``; Entropy-SGD), ``"sam"`` (``closure()`` then ``step(closure)``: the
    #: first gradient at ``w``, the closure recomputes it at the perturbed weights)
    step_style: Literal["plain", "closure", "sam"] = "plain"


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(torch.optim.SGD, 0.1, {}, doc="plain mini-batch SGD"),
    "momentum": OptimizerSpec(
        torch.optim.SGD,
        0.01,
        {"momentum": 0.9, "weight_decay": 5e-4},
        doc="SGD + momentum 0.9 + weight decay 5e-4",
    ),
    "adam": OptimizerSpec(torch.optim.Adam, 1e-3, doc="Adam"),
    "adagrad": OptimizerSpec(torch.optim.Adagrad, 1e-2, doc="Adagrad"),
    "rmsprop": OptimizerSpec(torch.optim.RMSprop, 1e-3, doc="RMSprop"),
    "adadelta": OptimizerSpec(torch.optim.Adadelta, 1.0, doc="Adadelta"),
    "gd": OptimizerSpec(
        torch.optim.SGD, 0.5, {}, full_batch=True, doc="full-batch gradient descent"
    ),
    "entropy-sgd": OptimizerSpec(EntropySGD, 1.0, {}, doc="Entropy-SGD (Chaudhari et al. 2017)",
                                 step_style="closure"),
    "sam": OptimizerSpec(_sam, 0.1, {"base_optimizer": torch.optim.SGD, "rho": 0.05},
                         doc="SAM around SGD, rho 0.05 (Foret et al. 2021)", step_style="sam"),
    "asam": OptimizerSpec(_sam, 0.1, {"base_optimizer": torch.optim.SGD, "rho": 0.5,
                                     "adaptive": True},
                          doc="adaptive SAM around SGD, rho 0.5 (Kwon et al. 2021)",
                          step_style="sam"),
}


def make_optimizer(
    name: str, params, lr: float | None = None, **overrides: Any
) -> tuple[torch.optim.Optimizer, OptimizerSpec]:
    """Instantiate optimizer ``name`` on ``params``; ``lr=None`` takes the default above."""
    check_choice("optimizer", name, OPTIMIZERS)
    spec = OPTIMIZERS[name]
    lr = spec.lr if lr is None else lr
    check_positive("lr", lr)
    return spec.cls(params, lr=lr, **{**spec.kwargs, **overrides}), spec
