"""Fully connected ReLU network and a small CNN, both one-logit binary classifiers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from flatprior.errors import FlatpriorError


class FCN(nn.Sequential):
    """``Flatten -> Linear(w0, w1) -> ReLU -> … -> Linear(w_{L-1}, 1)``.

    Args:
        widths: layer widths including input dimension and the output (must end in 1), e.g.
            ``(784, 40, 40, 1)`` — the study's MNIST network.
    """

    def __init__(self, widths: Sequence[int] = (784, 40, 40, 1)):
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise FlatpriorError(f"FCN widths must be >= 2 positive integers, got {widths}")
        if widths[-1] != 1:
            raise FlatpriorError(f"FCN must end in one output logit (last width 1), got {widths}")
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.widths = widths


class SmallCNN(nn.Sequential):
    """Two conv-ReLU-maxpool stages, then a ReLU hidden layer and one logit.

    ``Conv(c_in, c1, 3, pad 1) -> ReLU -> MaxPool2 -> Conv(c1, c2, 3, pad 1) -> ReLU -> MaxPool2
    -> Flatten -> Linear(c2·(H/4)·(W/4), hidden) -> ReLU -> Linear(hidden, 1)``. Every stage is
    positively homogeneous, so :func:`flatprior.models.alpha_scale` applies to any layer pair.
    """

    def __init__(
        self, input_shape: Sequence[int] = (1, 28, 28), channels=(16, 32), hidden: int = 64
    ):
        if len(input_shape) != 3:
            raise FlatpriorError(f"SmallCNN needs image inputs [C, H, W], got {tuple(input_shape)}")
        c, h, w = (int(v) for v in input_shape)
        if c < 1 or h < 4 or w < 4:
            raise FlatpriorError(
                f"SmallCNN needs >= 1 channel and images of at least 4x4 pixels (two 2x2 "
                f"max-pools), got {tuple(input_shape)}; use the fcn model for smaller inputs"
            )
        c1, c2 = channels
        super().__init__(
            nn.Conv2d(c, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (h // 4) * (w // 4), hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
