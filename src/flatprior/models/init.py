"""Initialisation used by the study: He-normal weights, N(0, sigma_b2) biases."""

from __future__ import annotations

import math

import torch
from torch import nn

from flatprior.errors import check_positive, refuse_renamed


@refuse_renamed
@torch.no_grad()
def init_weights(
    model: nn.Module, *, sigma_w2: float = 2.0, sigma_b2: float = 1.0, seed: int | None = None
) -> nn.Module:
    """Draw W ~ N(0, sigma_w2 / fan_in) and b ~ N(0, sigma_b2) for every Linear and Conv layer.

    ``sigma_w2 = 2`` is He-normal (fan-in, ReLU gain); ``sigma_b2 = 1`` the study's N(0, 1)
    bias. Both are variances, as in every other part of flatprior.
    BatchNorm layers get weight 1 and bias 0. ``seed`` makes the draw reproducible; the global
    torch RNG is left untouched in that case.
    """
    check_positive("sigma_w2", sigma_w2, allow_zero=True)
    check_positive("sigma_b2", sigma_b2, allow_zero=True)
    sigma_b = math.sqrt(sigma_b2)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            w = torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype)
            m.weight.copy_(w * math.sqrt(sigma_w2 / fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype) * sigma_b)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
