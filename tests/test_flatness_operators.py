"""Curvature as operators: build the Hessian operator once, apply every spectral/trace function.

References: the dense float64 Hessian from torch.func (as in test_flatness_hessian.py) and the
one-call ``hessian_*`` forms, which must give the same numbers bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flatprior.flatness as F
from flatprior.flatness import (
    CurvatureOptions,
    FlatnessOptions,
    flatness_measures,
    hessian_operator,
    log_product_topk,
    spectral_norm,
    top_eigenvalues,
    trace,
)

BCE = nn.BCEWithLogitsLoss()


def _problem(seed=0, n=41):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(n, 4, generator=g)
    y = (torch.rand(n, 1, generator=g) > 0.5).float()
    return net, x, y


def _dense(net, x, y):
    from torch.func import functional_call, hessian

    net = net.double()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    numels = [p.numel() for p in net.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(w):
        ps = {n: c.view(s) for n, c, s in zip(names, torch.split(w, numels), shapes, strict=True)}
        return BCE(functional_call(net, ps, (x.double(),)), y.double())

    return hessian(loss)(w0)


def test_one_operator_serves_every_function_and_matches_the_one_call_forms():
    net, x, y = _problem()
    op = hessian_operator(net, BCE, x, y, batch_size=16)
    ev = torch.linalg.eigvalsh(_dense(net, x, y))  # ascending, p = 31
    top = top_eigenvalues(op, 4)
    assert torch.allclose(top, ev.flip(0)[:4], rtol=1e-9, atol=1e-12)
    assert spectral_norm(op) == pytest.approx(float(ev.abs().max()), rel=1e-9)
    val, npos = log_product_topk(op, 4, return_count=True)
    pos = ev.flip(0)[:4][ev.flip(0)[:4] > 0]
    assert npos == pos.numel() and val == pytest.approx(float(torch.log(pos).sum()), rel=1e-9)
    assert trace(op, method="exact") == pytest.approx(float(ev.sum()), rel=1e-10)
    # the one-call forms build their own operator and give identical numbers
    assert torch.equal(F.hessian_top_eigenvalues(net, BCE, x, y, 4, batch_size=16), top)
    assert F.hessian_spectral_norm(net, BCE, x, y, batch_size=16) == spectral_norm(op)
    assert F.hessian_trace(net, BCE, x, y, n_samples=9, batch_size=16) == trace(op, n_samples=9)
    assert F.hessian_log_product_topk(net, BCE, x, y, 4, batch_size=16) == val


def test_flatness_measures_builds_the_hessian_once(monkeypatch):
    net, x, y = _problem(1)
    calls = []
    real = F.hessian_operator
    monkeypatch.setattr(F, "hessian_operator", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = flatness_measures(net, x, y[:, 0], which=("spectral_norm", "logprod_topk", "trace"),
                            topk=3, trace_samples=5)
    assert len(calls) == 1
    assert out["logprod_top3_npos"] <= 3 and math.isfinite(out["spectral_norm"])
    assert out["trace_method"] == "hutchinson"


def test_options_object_equals_keywords_and_unknown_keyword_is_refused():
    net, x, y = _problem(2)
    which = ("sharpness", "spectral_norm", "trace")
    a = flatness_measures(net, x, y, which=which, eps=1e-3, sharpness_epochs=2, trace_samples=4)
    b = flatness_measures(net, x, y, which=which,
                          options=FlatnessOptions(eps=1e-3, sharpness_epochs=2, trace_samples=4))
    strip = lambda d: {k: v for k, v in d.items() if not k.endswith("_time_s")}  # noqa: E731
    assert strip(a) == strip(b)
    with pytest.raises(TypeError, match="topK"):
        flatness_measures(net, x, y, which=("trace",), topK=3)
    assert FlatnessOptions(batch_size=7, seed=3).curvature() == CurvatureOptions(batch_size=7,
                                                                                  seed=3)
