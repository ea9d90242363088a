"""Path norm and layer-norm products on tiny nets against explicit path sums and numpy SVDs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from flatprior.errors import FlatpriorError
from flatprior.flatness.norms import layer_norms, log_prod_frobenius, log_prod_spectral, path_norm
from flatprior.models import FCN, SmallCNN, alpha_scale, init_weights


def _tiny_fcn():
    return init_weights(FCN((3, 4, 2, 1)), seed=3)


def test_path_norm_equals_the_explicit_sum_over_paths():
    net = _tiny_fcn()
    (w1, b1), (w2, b2), (w3, b3) = [(m.weight.detach().double().numpy(),
                                     m.bias.detach().double().numpy())
                                    for m in net if isinstance(m, nn.Linear)]
    total = float(b3[0] ** 2)  # path from the last bias
    for k in range(2):  # paths starting at b2[k]
        total += b2[k] ** 2 * w3[0, k] ** 2
    for j, k in itertools.product(range(4), range(2)):  # paths starting at b1[j]
        total += b1[j] ** 2 * w2[k, j] ** 2 * w3[0, k] ** 2
    for i, j, k in itertools.product(range(3), range(4), range(2)):  # input paths
        total += w1[j, i] ** 2 * w2[k, j] ** 2 * w3[0, k] ** 2
    assert path_norm(net) == pytest.approx(total, rel=1e-12)


def test_path_norm_of_a_conv_layer_counts_padding_correctly():
    # 1x3x3 input, one 3x3 conv with padding 1, average over the 9 outputs (linear) -> logit:
    # output position (r, c) sees the input pixels inside the image only.
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(9, 1, bias=False))
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 10.0).reshape(1, 1, 3, 3))
        net[2].weight.fill_(0.5)
    k2 = (np.arange(1.0, 10.0).reshape(3, 3)) ** 2
    total = 0.0
    for r, c in itertools.product(range(3), range(3)):
        for dr, dc in itertools.product(range(3), range(3)):
            rr, cc = r + dr - 1, c + dc - 1
            if 0 <= rr < 3 and 0 <= cc < 3:
                total += k2[dr, dc] * 0.25
    assert path_norm(net, (1, 3, 3)) == pytest.approx(total, rel=1e-12)


def test_layer_norm_products_match_numpy():
    net = init_weights(SmallCNN((1, 8, 8), channels=(2, 3), hidden=5), seed=1)
    mats = [m.weight.detach().double().numpy().reshape(m.weight.shape[0], -1)
            for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    spec = [np.linalg.svd(w, compute_uv=False)[0] for w in mats]
    fro = [np.sqrt((w**2).sum()) for w in mats]
    got = layer_norms(net)
    assert [d["spectral"] for d in got] == pytest.approx(spec, rel=1e-12)
    assert [d["frobenius"] for d in got] == pytest.approx(fro, rel=1e-12)
    assert log_prod_spectral(net) == pytest.approx(sum(2 * math.log(s) for s in spec), rel=1e-12)
    assert log_prod_frobenius(net) == pytest.approx(sum(2 * math.log(f) for f in fro), rel=1e-12)


@pytest.mark.parametrize("layer", [0, 1])
def test_alpha_scaling_leaves_path_norm_and_products_unchanged(layer):
    net = _tiny_fcn().double()  # float64: the check is exact up to rounding
    scaled = alpha_scale(net, layer, 7.0)
    assert path_norm(scaled) == pytest.approx(path_norm(net), rel=1e-10)
    assert log_prod_spectral(scaled) == pytest.approx(log_prod_spectral(net), rel=1e-10)
    # the Frobenius norms scale the same way (alpha^2 and alpha^-2)
    assert log_prod_frobenius(scaled) == pytest.approx(log_prod_frobenius(net), rel=1e-10)


def test_bad_inputs_one_line():
    cnn = SmallCNN((1, 8, 8))
    bn = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    cases = [
        lambda: path_norm(cnn),
        lambda: path_norm(bn),
        lambda: path_norm(_tiny_fcn(), (5,)),
        lambda: log_prod_spectral(nn.ReLU()),
        lambda: log_prod_spectral("net"),
    ]
    for case in cases:
        with pytest.raises(FlatpriorError) as err:
            case()
        assert "\n" not in str(err.value)
