"""SAM / ASAM (pytorch-optimizer) in the trainer: rho = 0 is SGD step for step; rho > 0 is the
two-gradient SAM update."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatprior.data import make_task
from flatprior.models import make_model
from flatprior.train import TrainConfig, train
from flatprior.train.optimizers import OPTIMIZERS


@pytest.fixture(scope="module")
def task():
    return make_task("digits", 120, 0, 60, seed=0)


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_rho_zero_reduces_to_sgd_step_for_step(task, name):
    base = make_model("fcn", task.input_shape, seed=3)
    histories = {}
    for opt, kw in (("sgd", {}), (name, {"rho": 0.0})):
        model = copy.deepcopy(base)
        params = []
        train(model, task, TrainConfig(optimizer=opt, lr=0.05, batch_size=32, max_epochs=3,
                                       optimizer_kwargs=kw, seed=1),
              callbacks=[lambda m, met, params=params: params.append(
                  torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone())])
        histories[opt] = params
    assert len(histories["sgd"]) == len(histories[name]) >= 2
    for a, b in zip(histories["sgd"], histories[name], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,adaptive", [("sam", False), ("asam", True)])
def test_one_step_is_the_sam_update(name, adaptive):
    # w' = w - lr * grad L(w + e),  e = rho T^2 g / ||T g||, T = |w| (ASAM) or 1 (SAM)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 1)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = (torch.rand(16) > 0.5).double()
    loss_fn = nn.BCEWithLogitsLoss()
    rho, lr = 0.3, 0.1
    w = torch.nn.utils.parameters_to_vector(net.parameters()).detach()

    def grad_at(v):
        m = copy.deepcopy(net)
        torch.nn.utils.vector_to_parameters(v, m.parameters())
        loss_fn(m(x).reshape(-1), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in m.parameters()])

    g = grad_at(w)
    t = w.abs() if adaptive else torch.ones_like(w)
    e = rho * t**2 * g / ((t * g).norm() + 1e-12)
    want = w - lr * grad_at(w + e)
    spec = OPTIMIZERS[name]
    opt = spec.cls(net.parameters(), lr=lr, **{**spec.kwargs, "rho": rho})

    def closure():
        opt.zero_grad()
        loss = loss_fn(net(x).reshape(-1), y)
        loss.backward()
        return loss

    closure()
    opt.step(closure)
    got = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(got, w - lr * g, rtol=1e-6, atol=1e-9)  # not a plain SGD step


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_sam_and_asam_train_to_zero_error(name):
    task = make_task("digits", 200, 0, 100, seed=0)  # SGD: 179 epochs, SAM 215, ASAM 242
    res = train(make_model("fcn", task.input_shape, seed=0), task,
                TrainConfig(optimizer=name, seed=0, max_epochs=1000))
    assert res.status == "zero_error" and res.train_error == 0.0
