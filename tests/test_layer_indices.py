"""One weighted-layer list: models.linear_layers and the flatness layer index agree (Conv3d too),
and flatprior.prior.boolean_inputs is data.boolean's."""

from __future__ import annotations

import torch
from torch import nn

from flatprior.flatness._common import layer_index_in, layer_of
from flatprior.models import alpha_scale, linear_layers


def _net():
    return nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.ReLU(), nn.MaxPool3d(1),  # layer 0
        nn.Conv3d(2, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),  # layer 1
        nn.Linear(2, 3), nn.ReLU(),  # layer 2
        nn.Linear(3, 1),  # layer 3
    )


def test_every_module_counts_the_same_layers():
    net = _net()
    layers = linear_layers(net)
    assert [type(m).__name__ for m in layers] == ["Conv3d", "Conv3d", "Linear", "Linear"]
    for i, m in enumerate(layers):
        assert layer_of(net, i) is m and layer_index_in(net, m) == i
    assert layer_of(net, None) is layers[-1]


def test_alpha_scaling_across_conv3d_keeps_the_function():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(5, 1, 3, 3, 3)
    for layer in (0, 1, 2):
        scaled = alpha_scale(net, layer, 3.0)
        assert torch.allclose(scaled(x), net(x), atol=1e-6, rtol=1e-5)
        w, w2 = linear_layers(net)[layer].weight, linear_layers(scaled)[layer].weight
        assert torch.equal(w2, 3.0 * w)  # the layer flatness calls ``layer`` is the one scaled


def test_one_boolean_inputs():
    from flatprior.data.boolean import boolean_inputs as data_inputs
    from flatprior.prior import boolean_inputs

    assert boolean_inputs is data_inputs
    assert boolean_inputs(3).tolist()[6] == [1.0, 1.0, 0.0] and boolean_inputs().shape == (128, 7)
