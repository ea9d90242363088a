"""Norm-based complexity measures: path norm and products of layer norms (Jiang et al.'s baselines).

Jiang, Neyshabur, Mobahi, Krishnan, Bengio, "Fantastic generalization measures and where to find
them", ICLR 2020 (measures 44 "path.norm", 32 "log.prod.of.spec", 37 "log.prod.of.fro");
Neyshabur, Tomioka, Srebro, "Norm-based capacity control in neural networks", COLT 2015.
For the Linear/Conv layers ``W_1 .. W_L`` (a conv weight ``[out, in, kh, kw]`` read as the matrix
``[out, in*kh*kw]``, as in Jiang et al.'s code)::

    log_prod_spectral  = sum_l log ||W_l||_2^2        (largest singular value, squared)
    log_prod_frobenius = sum_l log ||W_l||_F^2
    path_norm          = sum_out f_{w^2}(1)   = sum over input-output paths of prod_(edges) w_e^2

``f_{w^2}(1)``: the network with every parameter squared (biases too: a bias is an edge from a
constant-one unit), fed an all-ones input. All activations are then >= 0, so ReLUs pass them
unchanged and the output is the sum over paths. Exact for Linear/Conv/ReLU/average-pool networks;
a max-pool keeps the largest incoming path sum instead of their sum (Jiang et al.'s code does the
same). Natural logs; the products themselves overflow for deep nets.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from flatprior.errors import FlatpriorError
from flatprior.models.rescale import WEIGHTED


def _weights(model: nn.Module) -> list[torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise FlatpriorError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ws = [m.weight.detach().double() for m in model.modules() if isinstance(m, WEIGHTED)]
    if not ws:
        raise FlatpriorError("model has no Linear/Conv layer; norm measures need one")
    return [w.reshape(w.shape[0], -1) for w in ws]


def layer_norms(model: nn.Module) -> list[dict[str, float]]:
    """Per Linear/Conv layer (forward order): ``{"spectral": ||W||_2, "frobenius": ||W||_F}``."""
    return [{"spectral": float(torch.linalg.matrix_norm(w, ord=2)),
             "frobenius": float(torch.linalg.matrix_norm(w, ord="fro"))} for w in _weights(model)]


def _log_sum(values: list[float], name: str) -> float:
    if any(v == 0 for v in values):
        raise FlatpriorError(f"a layer has an all-zero weight matrix; log product of {name} "
                             "norms is -inf")
    return float(sum(2 * math.log(v) for v in values))


def log_prod_spectral(model: nn.Module) -> float:
    """``sum_l log ||W_l||_2^2`` over the Linear/Conv layers (natural log)."""
    return _log_sum([d["spectral"] for d in layer_norms(model)], "spectral")


def log_prod_frobenius(model: nn.Module) -> float:
    """``sum_l log ||W_l||_F^2`` over the Linear/Conv layers (natural log)."""
    return _log_sum([d["frobenius"] for d in layer_norms(model)], "Frobenius")


@torch.no_grad()
def path_norm(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> float:
    """Squared l2 path norm ``sum_out f_{w^2}(1)`` (see the module docstring).

    Args:
        model: a network of Linear/Conv layers and positively homogeneous or linear modules
            (ReLU, pooling, Flatten, Dropout); BatchNorm is refused (fold it into the previous
            layer first). The original is untouched.
        input_shape: one input's shape without the batch dimension; default: the first Linear
            layer's ``in_features`` (FCNs). Required for conv nets.

    Returns:
        The path norm (float, ``>= 0``; invariant under Dinh alpha-scaling).
    """
    _weights(model)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise FlatpriorError("path_norm does not handle BatchNorm; fold it into the previous "
                             "layer (or use a network without BatchNorm)")
    if input_shape is None:
        first = next(m for m in model.modules() if isinstance(m, WEIGHTED))
        if not isinstance(first, nn.Linear):
            raise FlatpriorError("path_norm of a conv net needs input_shape, e.g. (1, 28, 28)")
        input_shape = (first.in_features,)
    net = copy.deepcopy(model).double().eval()
    for p in net.parameters():
        p.pow_(2)
    try:
        out = net(torch.ones(1, *input_shape, dtype=torch.float64))
    except RuntimeError as exc:
        raise FlatpriorError(
            f"path_norm: the model does not take inputs of shape {tuple(input_shape)} "
            f"({str(exc).splitlines()[0][:120]}); pass input_shape"
        ) from None
    return float(out.sum())
