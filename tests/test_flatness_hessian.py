"""Hessian operator / spectrum / trace vs the dense float64 Hessian from torch.func."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from flatprior.errors import FlatpriorError
from flatprior.flatness import (
    hessian_log_product_topk,
    hessian_operator,
    hessian_spectral_norm,
    hessian_top_eigenvalues,
    hessian_trace,
)

BCE = nn.BCEWithLogitsLoss()




def tiny_problem(seed: int = 0, n: int = 37, widths=(5, 4, 3)):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(widths[0], widths[1]), nn.ReLU(),
                        nn.Linear(widths[1], widths[2]), nn.Tanh(), nn.Linear(widths[2], 1))
    x = torch.randn(n, widths[0])
    y = (torch.rand(n, 1) > 0.5).float()
    return net, x, y


def dense_hessian(net: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """Hessian of the mean loss on the whole set, float64, all parameters (names order)."""
    net = copy.deepcopy(net).double().eval()
    x, y = x.double(), y.double()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    numels = [p.numel() for p in net.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(w):
        ps = {n: c.view(s) for n, c, s in zip(names, torch.split(w, numels), shapes, strict=True)}
        return loss_fn(functional_call(net, ps, (x,)), y)

    return hessian(loss)(w0)


@pytest.mark.parametrize("hvp,cache", [("double_backward", False), ("double_backward", True),
                                       ("functorch", False)])
def test_operator_is_hessian_of_mean_loss_with_uneven_batches(hvp, cache):
    net, x, y = tiny_problem()
    h = dense_hessian(net, BCE, x, y)
    op = hessian_operator(net, BCE, x, y, batch_size=10, hvp=hvp, cache_graph=cache)  # 10*3+7
    p = h.shape[0]
    for _ in range(2):  # second pass re-uses the cached graphs
        got = op @ torch.eye(p, dtype=torch.float64)
        assert torch.allclose(got, h, rtol=1e-10, atol=1e-13)
        v = torch.randn(p, dtype=torch.float64)
        assert torch.allclose(op @ v, h @ v, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("batch_size", [None, 8])
def test_top_eigenvalues_match_dense(batch_size):
    net, x, y = tiny_problem(seed=1)
    ev = torch.linalg.eigvalsh(dense_hessian(net, BCE, x, y)).flip(0)
    got = hessian_top_eigenvalues(net, BCE, x, y, k=4, batch_size=batch_size)
    assert got.dtype == torch.float64 and got.shape == (4,)
    assert torch.allclose(got, ev[:4], rtol=1e-8, atol=1e-8 * float(ev.abs().max()))


def test_all_eigenvalues_dense_path_k_equals_p():
    net, x, y = tiny_problem(seed=2)
    ev = torch.linalg.eigvalsh(dense_hessian(net, BCE, x, y)).flip(0)
    got = hessian_top_eigenvalues(net, BCE, x, y, k=ev.numel())
    assert torch.allclose(got, ev, rtol=1e-8, atol=1e-10)


def test_spectral_norm_matches_dense():
    net, x, y = tiny_problem(seed=3)
    ev = torch.linalg.eigvalsh(dense_hessian(net, BCE, x, y))
    got = hessian_spectral_norm(net, BCE, x, y, batch_size=16)
    assert got == pytest.approx(float(ev.abs().max()), rel=1e-8)


def test_spectral_norm_takes_magnitude_of_negative_eigenvalue():
    # loss = -mean(out^2) on a linear model: H = -2/N X^T X (negative definite); ||H|| = |min|.
    torch.manual_seed(0)
    net = nn.Linear(4, 1, bias=False)
    x = torch.randn(30, 4)
    y = torch.zeros(30, 1)

    def neg_sq(o, t):
        return -((o - t) ** 2).mean()

    xd = x.double()
    h = -2.0 / 30 * xd.T @ xd
    got = hessian_spectral_norm(net, neg_sq, x, y)
    assert got == pytest.approx(float(torch.linalg.eigvalsh(h).abs().max()), rel=1e-8)


def test_log_product_topk_matches_dense_and_counts_positive():
    net, x, y = tiny_problem(seed=4)
    ev = torch.linalg.eigvalsh(dense_hessian(net, BCE, x, y)).flip(0)
    k = 5
    want = float(torch.log(ev[:k][ev[:k] > 0]).sum())
    got, npos = hessian_log_product_topk(net, BCE, x, y, k=k, return_count=True)
    assert npos == int((ev[:k] > 0).sum())
    assert got == pytest.approx(want, rel=1e-8)
    # more eigenvalues requested than are positive: only the positive ones enter
    p = ev.numel()
    n_pos = int((ev > 1e-12).sum())
    assert n_pos < p
    got_all, npos_all = hessian_log_product_topk(net, BCE, x, y, k=p, return_count=True)
    assert npos_all == int((ev > 0).sum())
    assert got_all == pytest.approx(float(torch.log(ev[ev > 0]).sum()), rel=1e-6)


def test_trace_exact_matches_dense():
    net, x, y = tiny_problem(seed=5)
    h = dense_hessian(net, BCE, x, y)
    got = hessian_trace(net, BCE, x, y, method="exact", batch_size=9, probe_chunk=7)
    assert got == pytest.approx(float(h.trace()), rel=1e-8)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_stochastic_trace_within_its_standard_error(method):
    net, x, y = tiny_problem(seed=6, widths=(12, 10, 8))  # p = 243
    h = dense_hessian(net, BCE, x, y)
    p = h.shape[0]
    n = 150
    assert n < p
    # Rademacher Hutchinson variance: 2 (||H||_F^2 - sum_i H_ii^2) / n (Hutch++ has less)
    sd = math.sqrt(2 * (float((h**2).sum()) - float((h.diagonal() ** 2).sum())) / n)
    got = hessian_trace(net, BCE, x, y, method=method, n_samples=n, seed=0)
    assert abs(got - float(h.trace())) < 5 * sd
    again = hessian_trace(net, BCE, x, y, method=method, n_samples=n, seed=0)
    assert got == again  # seeded


def test_float32_model_is_not_modified_and_computed_in_float64():
    net, x, y = tiny_problem(seed=7)
    before = copy.deepcopy(net.state_dict())
    ev64 = hessian_top_eigenvalues(net, BCE, x, y, k=1)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == torch.float32
    ev32 = hessian_top_eigenvalues(net, BCE, x, y, k=1, dtype=None, tol=1e-6)
    assert ev64.dtype == torch.float64
    assert float(ev32[0]) == pytest.approx(float(ev64[0]), rel=1e-4)


def test_bad_inputs_raise_one_line():
    net, x, y = tiny_problem()
    p = sum(q.numel() for q in net.parameters())
    frozen = copy.deepcopy(net).requires_grad_(False)
    cases = [
        lambda: hessian_top_eigenvalues(net, BCE, x, y, k=p + 1),
        lambda: hessian_top_eigenvalues(net, BCE, x, y, k=0),
        lambda: hessian_top_eigenvalues(net, BCE, x[:0], y[:0]),
        lambda: hessian_spectral_norm(frozen, BCE, x, y),
        lambda: hessian_spectral_norm(net, lambda o, t: o.mean() * float("nan"), x, y),
        lambda: hessian_spectral_norm(net, nn.BCEWithLogitsLoss(reduction="sum"), x, y),
        lambda: hessian_trace(net, BCE, x, y, method="girard"),
        lambda: hessian_log_product_topk(net, BCE, x, y, k=p + 5),
    ]
    for case in cases:
        with pytest.raises(FlatpriorError) as err:
            case()
        assert "\n" not in str(err.value)
