"""Relative flatness vs the dense index formula, FAM regulariser, Dinh alpha-scaling."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from flatprior.errors import FlatpriorError
from flatprior.flatness import (
    fam_regularizer,
    flatness_measures,
    hessian_spectral_norm,
    keskar_sharpness,
    relative_flatness,
)
from test_flatness_hessian import dense_hessian, tiny_problem
from test_flatness_keskar import load_mnist_subset, train_fcn_to_zero_error

BCE = nn.BCEWithLogitsLoss()




def dense_relative_flatness(net: nn.Module, layer: nn.Module, x, y) -> float:
    """sum_{s,s'} <w_s, w_s'> sum_c d2L/dW[s,c]dW[s',c], loops straight from the definition."""
    h = dense_hessian(net, BCE, x, y)
    off = 0
    for p in net.parameters():
        if p is layer.weight:
            break
        off += p.numel()
    w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    m, n = w.shape
    hw = h[off:off + m * n, off:off + m * n].reshape(m, n, m, n)
    total = 0.0
    for s in range(m):
        for t in range(m):
            tr = sum(float(hw[s, c, t, c]) for c in range(n))
            total += float(w[s] @ w[t]) * tr
    return total


@pytest.mark.parametrize("layer", [0, 1, 2, None, -1])
def test_relative_flatness_matches_dense_definition(layer):
    net, x, y = tiny_problem(seed=11)
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    mod = layers[-1] if layer is None else layers[layer]
    want = dense_relative_flatness(net, mod, x, y)
    got = relative_flatness(net, BCE, x, y, layer, batch_size=10, probe_chunk=7)
    assert got == pytest.approx(want, rel=1e-10)
    assert relative_flatness(net, BCE, x, y, mod) == pytest.approx(want, rel=1e-10)


def test_relative_flatness_conv_layer_reads_weight_as_out_by_rest():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 1))
    x = torch.randn(20, 1, 5, 5)
    y = (torch.rand(20, 1) > 0.5).float()
    want = dense_relative_flatness(net, net[0], x, y)
    assert relative_flatness(net, BCE, x, y, 0) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("layer,method", [(1, "exact"), (None, "exact"), (None, "closed_form"),
                                          (-1, "auto"), (0, "auto")])
def test_fam_exact_equals_relative_flatness_and_has_right_gradient(layer, method):
    net, x, y = tiny_problem(seed=12)
    net = net.double()
    xd, yd = x.double(), y.double()
    reg = fam_regularizer(net, BCE, xd, yd, layer, method=method)
    assert float(reg.detach()) == pytest.approx(relative_flatness(net, BCE, x, y, layer), rel=1e-10)
    # gradient w.r.t. all parameters vs central finite differences of relative_flatness
    grads = torch.autograd.grad(reg, list(net.parameters()))
    g = torch.cat([q.reshape(-1) for q in grads])
    torch.manual_seed(0)
    v = torch.randn_like(g)
    v /= v.norm()
    w0 = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    h = 1e-5
    vals = []
    for sgn in (1, -1):
        shifted = copy.deepcopy(net)
        torch.nn.utils.vector_to_parameters(w0 + sgn * h * v, shifted.parameters())
        vals.append(relative_flatness(shifted, BCE, x, y, layer))
    fd = (vals[0] - vals[1]) / (2 * h)
    assert float(g @ v) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_fam_hutchinson_is_unbiased():
    net, x, y = tiny_problem(seed=13)
    net = net.double()
    xd, yd = x.double(), y.double()
    layer = 1  # 3 x 4 weights
    exact = relative_flatness(net, BCE, x, y, layer)
    # variance of v^T B v for Rademacher v, B = (G kron I) H_W: 2 (||B_sym||_F^2 - sum B_ii^2)
    lay = [m for m in net.modules() if isinstance(m, nn.Linear)][layer]
    h = dense_hessian(net, BCE, x, y)
    off = sum(p.numel() for p in list(net.parameters())[:2])
    m, n = lay.weight.shape
    hw = h[off:off + m * n, off:off + m * n]
    w = lay.weight.detach()
    b = torch.kron(w @ w.T, torch.eye(n, dtype=torch.float64)) @ hw
    bs = (b + b.T) / 2
    var1 = 2 * (float((bs**2).sum()) - float((bs.diagonal() ** 2).sum()))
    k = 4000
    gen = torch.Generator().manual_seed(0)
    est = fam_regularizer(net, BCE, xd, yd, layer, method="hutchinson", n_samples=k,
                          generator=gen)
    assert abs(float(est.detach()) - exact) < 5 * math.sqrt(var1 / k)
    assert float(torch.trace(b)) == pytest.approx(exact, rel=1e-10)


def test_fam_bad_inputs():
    net, x, y = tiny_problem()
    for case in [
        lambda: fam_regularizer(net, BCE, x, y, method="sam"),
        lambda: fam_regularizer(net, BCE, x, y, layer=1, method="closed_form"),
        lambda: fam_regularizer(net, BCE, x, y, layer=7),
        lambda: fam_regularizer(net, BCE, x[:0], y[:0]),
        lambda: relative_flatness(net, BCE, x, y, layer="last"),
        lambda: relative_flatness(net, lambda o, t: o.mean() * float("nan"), x, y),
    ]:
        with pytest.raises(FlatpriorError) as err:
            case()
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------- Dinh alpha-scaling
@pytest.fixture(scope="module")
def trained_mnist_fcn():
    x, y = load_mnist_subset(n=200, seed=1)
    return train_fcn_to_zero_error(x, y, seed=1), x, y


def _alpha_scale(model, layer_index, alpha):
    try:
        from flatprior.models import alpha_scale
    except ImportError:  # pragma: no cover - foundation not present
        pytest.skip("flatprior.models.alpha_scale not available")
    return alpha_scale(model, layer_index, alpha)


@pytest.mark.parametrize("layer_index,alpha,min_factor", [(0, 0.1, 10.0), (1, 100.0, 2.0)])
def test_dinh_scaling_moves_hessian_flatness_not_relative_flatness(
    trained_mnist_fcn, layer_index, alpha, min_factor
):
    # Measured on this net (eps 1e-3, L-BFGS-B): (0, 0.1) -> spectral norm x88, sharpness x60;
    # (1, 100) -> spectral norm x528, sharpness x3.6.
    net, x, y = trained_mnist_fcn
    net = copy.deepcopy(net).double()  # scale in float64: no float32 rounding in the comparison
    scaled = _alpha_scale(net, layer_index, alpha)
    xd = x.double()
    with torch.no_grad():
        assert torch.allclose(net(xd), scaled(xd), rtol=1e-10, atol=1e-10)
    # both layers touched by the scaling; layer 0 (40 x 784 = 31k HVPs) is skipped for time
    for lay in {layer_index, layer_index + 1} - {0}:
        a = relative_flatness(net, BCE, x, y, lay)
        b = relative_flatness(scaled, BCE, x, y, lay)
        assert b == pytest.approx(a, rel=1e-6), lay
    s0 = hessian_spectral_norm(net, BCE, x, y, tol=1e-6)
    s1 = hessian_spectral_norm(scaled, BCE, x, y, tol=1e-6)
    assert max(s1 / s0, s0 / s1) > 10
    k0 = keskar_sharpness(net, BCE, x, y, eps=1e-3, method="lbfgsb")
    k1 = keskar_sharpness(scaled, BCE, x, y, eps=1e-3, method="lbfgsb")
    assert max(k1 / k0, k0 / k1) > min_factor


def test_flatness_measures_bundle(trained_mnist_fcn):
    net, x, y = trained_mnist_fcn
    small = nn.Sequential(nn.Linear(784, 6), nn.ReLU(), nn.Linear(6, 1))
    small.load_state_dict({"0.weight": net[0].weight[:6], "0.bias": net[0].bias[:6],
                           "2.weight": net[4].weight[:, :6], "2.bias": net[4].bias})
    out = flatness_measures(small, x, y.reshape(-1), sharpness_epochs=3, topk=3,
                            trace_samples=20)
    for key in ("sharpness", "spectral_norm", "logprod_top3", "trace", "relative_flatness"):
        assert math.isfinite(out[key]) and out[f"{key}_time_s"] >= 0
    assert out["sharpness_method"] == "sgd" and out["sharpness_eps"] == 1e-4
    assert out["spectral_norm"] == pytest.approx(
        hessian_spectral_norm(small, BCE, x, y), rel=1e-8
    )
    assert out["relative_flatness"] == pytest.approx(relative_flatness(small, BCE, x, y),
                                                     rel=1e-10)
    only = flatness_measures(small, x, y, which=("spectral_norm",))
    assert set(only) == {"spectral_norm", "spectral_norm_time_s"}
    with pytest.raises(FlatpriorError):
        flatness_measures(small, x, y, which=("sharpnes",))


def test_one_dimensional_float_targets_match_column_targets():
    # the trainer passes y as [N] while the FCN returns logits [N, 1]
    net, x, y = tiny_problem(seed=14)
    y1 = y.reshape(-1)
    assert keskar_sharpness(net, BCE, x, y1, eps=1e-3, epochs=3) == keskar_sharpness(
        net, BCE, x, y, eps=1e-3, epochs=3)
    assert hessian_spectral_norm(net, BCE, x, y1) == pytest.approx(
        hessian_spectral_norm(net, BCE, x, y), rel=1e-12)
    assert relative_flatness(net, BCE, x, y1) == pytest.approx(
        relative_flatness(net, BCE, x, y), rel=1e-12)
    a = fam_regularizer(net, BCE, x, y1, method="exact")
    b = fam_regularizer(net, BCE, x, y, method="exact")
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-6)


def test_fam_closed_form_multi_logit_cross_entropy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (30,))
    ce = nn.CrossEntropyLoss()
    want = relative_flatness(net, ce, x, y)
    for method in ("closed_form", "exact"):
        got = fam_regularizer(net, ce, x, y, method=method)
        assert float(got.detach()) == pytest.approx(want, rel=1e-10), method
