"""CIFAR-style ResNets (He et al. 2016) with one output logit.

Depth 18 (basic) and 50 (bottleneck, blocks [3, 4, 6, 3]). ``width`` scales the channels (64 in
the paper; use 16 on a CPU).
"""

from __future__ import annotations

from torch import nn

from flatprior.errors import FlatpriorError


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1) shortcut."""

    expansion = 1

    def __init__(self, c_in: int, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(c_in, c * self.expansion, stride)

    def forward(self, x):
        """Block output ``relu(F(x) + shortcut(x))``."""
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convolutions (4x expansion) with BatchNorm and a shortcut."""

    expansion = 4

    def __init__(self, c_in: int, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c * 4)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(c_in, c * 4, stride)

    def forward(self, x):
        """Block output ``relu(F(x) + shortcut(x))``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


ARCH = {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    """``stem conv3x3 -> 4 stages -> global average pool -> features -> Linear(features, 1)``.

    The output layer is the last registered module (``self.fc``) so Monte-Carlo NNGP kernels can
    hook the pooled features that feed it.
    """

    def __init__(self, depth: int = 18, in_channels: int = 3, width: int = 64):
        super().__init__()
        if depth not in ARCH:
            raise FlatpriorError(f"ResNet depth must be one of {sorted(ARCH)}, got {depth}")
        block, counts = ARCH[depth]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, c_in = [], width
        for i, n in enumerate(counts):
            c = width * 2**i
            for j in range(n):
                stages.append(block(c_in, c, 2 if (j == 0 and i > 0) else 1))
                c_in = c * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.n_features = c_in
        self.fc = nn.Linear(c_in, 1)

    def forward(self, x):
        """Logits ``[N, 1]`` of images ``[N, C, H, W]``."""
        return self.fc(self.pool(self.stages(self.stem(x))))
