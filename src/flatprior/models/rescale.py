"""Dinh et al. (2017) alpha-scaling: a re-parameterisation that keeps the function."""

from __future__ import annotations

import copy

import torch
from torch import nn

from flatprior.errors import FlatpriorError, check_positive

#: the layers with a weight that layer indices count, everywhere in flatprior (alpha-scaling,
#: relative flatness, FAM): ``linear_layers(model)[i]`` is "layer i"
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules f with f(a·x) = a·f(x) for a > 0: scaling passes through them unchanged.
HOMOGENEOUS = (
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
)


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """The Linear/Conv layers of ``model`` in registration (forward, for Sequential) order."""
    return [m for m in model.modules() if isinstance(m, WEIGHTED)]


@torch.no_grad()
def alpha_scale(model: nn.Module, layer_index: int, alpha: float) -> nn.Module:
    """Return a copy with ``(W_l, b_l, W_{l+1}) -> (alpha W_l, alpha b_l, W_{l+1} / alpha)``.

    For a ReLU network ``relu(alpha z) = alpha relu(z)`` (alpha > 0), so the copy computes the
    same function while Hessian-based flatness changes by up to ``alpha^{±2}`` (Dinh et al.,
    "Sharp minima can generalize for deep nets", ICML 2017).

    Args:
        model: an ``nn.Sequential`` whose modules between layer ``l`` and ``l+1`` are positively
            homogeneous (ReLU, max/avg-pool, Flatten, Dropout), e.g. ``FCN``, ``SmallCNN``.
        layer_index: index ``l`` among the Linear/Conv layers (0 = first); ``l+1`` must exist.
        alpha: scale factor > 0.

    Returns:
        The rescaled copy (``model`` is unchanged).

    Example:
        Same function, weights scaled by ``alpha``:

        >>> import torch
        >>> from flatprior.models import make_model
        >>> net = make_model("fcn", (4,), hidden=(8, 8), seed=0)
        >>> scaled = alpha_scale(net, layer_index=0, alpha=10.0)
        >>> x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(net(x), scaled(x), rtol=1e-5, atol=1e-6)
        True
        >>> w0, w1 = linear_layers(net)[0].weight, linear_layers(scaled)[0].weight
        >>> torch.allclose(w1, 10 * w0)
        True
    """
    check_positive("alpha", alpha)
    if not isinstance(model, nn.Sequential):
        raise FlatpriorError(
            "alpha_scale needs an nn.Sequential network (FCN or SmallCNN); BatchNorm/residual "
            "networks have no function-preserving alpha-scaling of this form"
        )
    mods = list(model)
    pos = [i for i, m in enumerate(mods) if isinstance(m, WEIGHTED)]
    if not 0 <= layer_index < len(pos) - 1:
        raise FlatpriorError(
            f"layer_index must be in 0..{len(pos) - 2} (a layer followed by another), "
            f"got {layer_index}"
        )
    lo, hi = pos[layer_index], pos[layer_index + 1]
    for m in mods[lo + 1 : hi]:
        if not isinstance(m, HOMOGENEOUS):
            raise FlatpriorError(
                f"cannot alpha-scale across {m.__class__.__name__}: it is not positively "
                "homogeneous, the function would change"
            )
    new = copy.deepcopy(model)
    first, second = new[lo], new[hi]
    first.weight.mul_(alpha)
    if first.bias is not None:
        first.bias.mul_(alpha)
    second.weight.div_(alpha)
    return new
