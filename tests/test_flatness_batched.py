"""Batched measures' fast paths: written-out HVPs, and stacks cut to their running members."""

import pytest
import torch
from torch import nn

import flatprior.flatness.batched as batched_mod
from flatprior.data import make_task
from flatprior.flatness import hessian_spectral_norm
from flatprior.flatness.batched import batched_hessian_spectral_norm, batched_keskar_sharpness
from flatprior.models import make_model
from flatprior.models.stacked import FcnBceHessian, fcn_forward, stack_parameters


@pytest.mark.parametrize("hidden", [(40, 40), (12, 8, 5), (6,)])
@pytest.mark.parametrize("batch", [1, 4])
def test_written_out_hvp_equals_autograd_double_backward(hidden, batch):
    gen = torch.Generator().manual_seed(len(hidden) + batch)
    M = 5
    models = [make_model("fcn", (7,), hidden=hidden, seed=s) for s in range(M)]
    ps = stack_parameters(models, torch.float64)
    x = torch.rand(M, batch, 7, generator=gen, dtype=torch.float64).round()
    y = (torch.rand(M, batch, generator=gen) > 0.5).double()
    row_grad = torch.rand(M, batch, generator=gen, dtype=torch.float64)
    row_grad[2, 0] = 0.0  # a padding row
    vs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
    leaves = [p.clone().requires_grad_(True) for p in ps]
    bce = nn.functional.binary_cross_entropy_with_logits(fcn_forward(leaves, x), y,
                                                         reduction="none")
    grads = torch.autograd.grad((bce * row_grad).sum(), leaves, create_graph=True)
    ref = torch.autograd.grad(grads, leaves, grad_outputs=vs)
    hess = FcnBceHessian(ps, x, y, row_grad)
    out = hess(vs)
    for h, r in zip(out, ref, strict=True):
        assert h.shape == r.shape
        torch.testing.assert_close(h, r, rtol=1e-12, atol=1e-14)
    # a subset's products are the full stack's rows, bit for bit
    idx = torch.tensor([4, 1])
    for h, s in zip(out, hess.subset(idx)([v[idx] for v in vs]), strict=True):
        assert torch.equal(h[idx], s)


def _boolean_nets(n_nets, n_train):
    task = make_task("boolean", n_train, 0, 16, 0)
    models = [make_model("fcn", (7,), hidden=(40, 40), sigma_w2=1.0, seed=s)
              for s in range(n_nets)]
    return models, task


def _runs_at_cut_fractions(monkeypatch, cls, measure):
    """``measure()`` with the stack cut at every finish (0), at the default 1/8, never (2);
    returns the three results and the sizes of every cut made."""
    cuts = []
    sub = cls.subset
    monkeypatch.setattr(cls, "subset", lambda self, idx: cuts.append(len(idx)) or sub(self, idx))
    runs = {}
    for frac in (0.0, 0.125, 2.0):
        monkeypatch.setattr(batched_mod, "_COMPACT_FRACTION", frac)
        runs[frac] = measure()
    return runs, cuts


def test_lanczos_stack_cut_changes_no_member(monkeypatch):
    # members converge after different numbers of iterations; cutting the stack to the running
    # ones at every convergence, at the default fraction, or never: the same bits
    models, task = _boolean_nets(12, 4)
    runs, cuts = _runs_at_cut_fractions(
        monkeypatch, batched_mod._HessianOperator, lambda: batched_hessian_spectral_norm(
            models, task.x_train, task.y_train, seeds=list(range(12))))
    # the stack was cut (fraction 0: at every convergence), never below two members (a batch
    # of one takes other matmul kernels); the last cut kept a finished member beside a lone one
    assert len(cuts) >= 3 and min(cuts) == 2
    assert torch.equal(runs[0.0], runs[2.0]) and torch.equal(runs[0.125], runs[2.0])
    # the autograd double-backward operator (graph rebuilt on every cut) agrees to rounding
    monkeypatch.setattr(batched_mod, "fcn_forward", object())
    monkeypatch.setattr(batched_mod, "_COMPACT_FRACTION", 0.0)
    auto = batched_hessian_spectral_norm(models, task.x_train, task.y_train,
                                         seeds=list(range(12)))
    torch.testing.assert_close(auto, runs[2.0], rtol=1e-12, atol=0)
    for i in (0, 7):  # and the single-network measure (ARPACK on curvlinops' operator)
        ref = hessian_spectral_norm(models[i], nn.BCEWithLogitsLoss(), task.x_train,
                                    task.y_train.reshape(-1, 1), seed=i)
        assert float(runs[0.0][i]) == pytest.approx(ref, rel=1e-6)


def test_ascent_stack_cut_changes_no_member(monkeypatch):
    models, task = _boolean_nets(10, 4)
    runs, cuts = _runs_at_cut_fractions(
        monkeypatch, batched_mod._Stack, lambda: batched_keskar_sharpness(
            models, task.x_train, task.y_train, 1e-3, lr=0.05, epochs=40, patience=2, tol=1e-2,
            seeds=list(range(10))))
    assert len(set(runs[2.0].n_steps)) > 2  # members stopped at several epochs
    assert len(cuts) >= 3 and min(cuts) >= 2
    for frac in (0.0, 0.125):
        assert (runs[frac].value, runs[frac].max_loss, runs[frac].n_steps) == (
            runs[2.0].value, runs[2.0].max_loss, runs[2.0].n_steps)
