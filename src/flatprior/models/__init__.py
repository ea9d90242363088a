"""Models: FCN, small CNN, CIFAR-style ResNet; initialisation; alpha-scaling."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from flatprior.errors import FlatpriorError, check_choice, refuse_renamed
from flatprior.models.fcn import FCN, SmallCNN
from flatprior.models.init import init_weights
from flatprior.models.rescale import alpha_scale, linear_layers
from flatprior.models.resnet import ResNet
from flatprior.names import DEFAULT_HIDDEN, MODELS, architecture_mismatch

__all__ = [
    "FCN",
    "MODELS",
    "ResNet",
    "SmallCNN",
    "alpha_scale",
    "init_weights",
    "linear_layers",
    "make_model",
]


@refuse_renamed
def make_model(
    name: str,
    input_shape: Sequence[int],
    *,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    width: int | None = None,
    sigma_w2: float = 2.0,
    sigma_b2: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """Build and initialise a one-logit network for inputs of ``input_shape`` (no batch dim).

    ``fcn``: widths ``(prod(input_shape), *hidden, 1)``; ``cnn``: :class:`SmallCNN`;
    ``resnet18``/``resnet50``: :class:`ResNet` with ``width`` base channels (default 16 on CPU).
    Weights He-normal (``sigma_w2 / fan_in``), biases ``N(0, sigma_b2)``, drawn from ``seed``.
    """
    check_choice("model", name, MODELS)
    input_shape = tuple(int(v) for v in input_shape)
    if width is not None and (isinstance(width, bool) or int(width) != width or width < 1):
        raise FlatpriorError(f"width must be a whole number >= 1 (or None), got {width!r}")
    why = architecture_mismatch(name, hidden, width)
    if why is not None:
        raise FlatpriorError(why)
    if name == "fcn":
        model: nn.Module = FCN((int(np.prod(input_shape)), *hidden, 1))
    elif name == "cnn":
        model = SmallCNN(input_shape)
    else:
        if len(input_shape) != 3:
            raise FlatpriorError(f"{name} needs image inputs [C, H, W], got {input_shape}")
        model = ResNet(int(name[6:]), in_channels=input_shape[0], width=width or 16)
    return init_weights(model, sigma_w2=sigma_w2, sigma_b2=sigma_b2, seed=seed)
