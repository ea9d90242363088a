import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatprior.errors import FlatpriorError
from flatprior.models import FCN, alpha_scale, init_weights, linear_layers, make_model


@settings(max_examples=40, deadline=None)
@given(
    alpha=st.floats(min_value=1e-3, max_value=1e3),
    layer=st.integers(min_value=0, max_value=1),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_alpha_scale_keeps_function_fcn(alpha, layer, seed):
    model = make_model("fcn", (1, 8, 8), seed=seed).double()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    scaled = alpha_scale(model, layer, alpha)
    assert torch.allclose(model(x), scaled(x), rtol=1e-10, atol=1e-10)
    w0, w1 = linear_layers(model)[layer].weight, linear_layers(scaled)[layer].weight
    assert torch.allclose(w1, alpha * w0)
    assert linear_layers(model)[layer].weight is not w1  # a copy; the original is unchanged


@settings(max_examples=15, deadline=None)
@given(alpha=st.floats(min_value=1e-2, max_value=1e2), layer=st.integers(0, 2))
def test_alpha_scale_keeps_function_cnn(alpha, layer):
    model = make_model("cnn", (1, 8, 8), seed=1).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(model(x), alpha_scale(model, layer, alpha)(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(FlatpriorError, match="alpha"):
        alpha_scale(FCN((4, 3, 1)), 0, alpha)


def test_alpha_scale_bad_layer_and_resnet():
    with pytest.raises(FlatpriorError, match="layer_index must be in 0..1"):
        alpha_scale(FCN((4, 3, 3, 1)), 2, 2.0)
    with pytest.raises(FlatpriorError, match="nn.Sequential"):
        alpha_scale(make_model("resnet18", (3, 32, 32)), 0, 2.0)


def test_he_normal_and_unit_bias_statistics():
    model = init_weights(FCN((1000, 1000, 1)), seed=0)
    w, b = model[1].weight, model[1].bias
    assert abs(w.var().item() - 2.0 / 1000) < 0.02 * 2.0 / 1000
    assert abs(b.std().item() - 1.0) < 0.06
    again = init_weights(FCN((1000, 1000, 1)), seed=0)
    assert torch.equal(again[1].weight, w)
    custom = init_weights(FCN((1000, 1000, 1)), sigma_w2=1.0, sigma_b2=0.0, seed=0)
    assert abs(custom[1].weight.var().item() - 1e-3) < 3e-5 and custom[1].bias.abs().max() == 0


@pytest.mark.parametrize("name, params", [("resnet18", 700305), ("resnet50", 1479569)])
def test_resnets_one_logit(name, params):
    model = make_model(name, (3, 32, 32), width=16).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 1)
    assert sum(p.numel() for p in model.parameters()) == params


def test_resnet50_bottleneck_layout():
    model = make_model("resnet50", (3, 32, 32), width=64)
    assert model.n_features == 2048  # the study's pooled feature dimension
    assert len(model.stages) == 3 + 4 + 6 + 3


def test_bad_model_arguments():
    with pytest.raises(FlatpriorError, match="unknown model 'mlp'.*fcn"):
        make_model("mlp", (4,))
    with pytest.raises(FlatpriorError, match="one output logit"):
        FCN((4, 3, 2))
    with pytest.raises(FlatpriorError, match=r"\[C, H, W\]"):
        make_model("cnn", (64,))
    assert math.prod(make_model("fcn", (1, 8, 8))[1].weight.shape) == 64 * 40
