"""train_ensemble against the single-network trainer: same trajectories, stops and functions."""

import copy
import math

import pytest
import torch

from flatprior.data import make_task
from flatprior.data.boolean import boolean_inputs
from flatprior.errors import FlatpriorError
from flatprior.models import make_model
from flatprior.train import TrainConfig, predict, train
from flatprior.train.ensemble import stacked_memory_per_member, train_ensemble

LR = {"sgd": 0.05, "momentum": 0.01, "adam": 1e-3}
KEYS = ("train_loss", "train_acc", "attack_acc", "test_acc", "test_loss")


def _singles(models, tasks, cfg, seeds):
    out = []
    for m, t, s in zip(models, tasks, seeds, strict=True):
        net = copy.deepcopy(m)
        out.append((net, train(net, t, TrainConfig(**{**cfg.__dict__, "seed": s}))))
    return out


def _assert_same(single, outcome, model, x_probe, min_epochs=20):
    net, ref = single
    res = outcome.result
    assert outcome.error is None
    assert (res.status, res.epochs_to_zero_error, res.epochs_trained) == (
        ref.status, ref.epochs_to_zero_error, ref.epochs_trained)
    assert len(res.history) == len(ref.history) >= min_epochs + 1
    for a, b in zip(ref.history, res.history, strict=True):
        assert a["epoch"] == b["epoch"] and a["phase"] == b["phase"]
        assert a["constant"] == b["constant"]
        for k in KEYS:
            if math.isnan(a[k]):
                assert math.isnan(b[k])
            else:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-12), (k, a["epoch"])
    assert res.train_error == ref.train_error and res.test_error == ref.test_error
    assert torch.equal(predict(net, x_probe), predict(model, x_probe))  # same final function


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_boolean_members_equal_single_trainer(opt):
    task = make_task("boolean", 64, 0, 64, 0)
    seeds = [0, 1, 2]
    models = [make_model("fcn", task.input_shape, sigma_w2=1.0, seed=s) for s in seeds]
    cfg = TrainConfig(optimizer=opt, lr=LR[opt], batch_size=8, max_epochs=30, overtrain_epochs=15)
    singles = _singles(models, [task] * 3, cfg, seeds)
    outs = train_ensemble(models, task, cfg, seeds)
    assert any(o.result.status == "zero_error" for o in outs)
    x = torch.as_tensor(boolean_inputs())
    for s, o, m in zip(singles, outs, models, strict=True):
        _assert_same(s, o, m, x)


@pytest.mark.parametrize("opt,backend", [("momentum", "bmm"), ("adam", "vmap")])
def test_own_data_sizes_and_attack_sets(opt, backend):
    """Members with different |A| (different epoch lengths, last batches) and data seeds."""
    tasks = [make_task("digits", 40, a, 40, s) for s, a in ((0, 0), (1, 7), (2, 20))]
    models = [make_model("fcn", tasks[0].input_shape, seed=10 + i) for i in range(3)]
    cfg = TrainConfig(optimizer=opt, lr=LR[opt], batch_size=16, max_epochs=22,
                      zero_error_on="train+attack", collapse_patience=0)
    singles = _singles(models, tasks, cfg, [5, 6, 7])
    outs = train_ensemble(models, tasks, cfg, [5, 6, 7], backend=backend)
    for s, o, m, t in zip(singles, outs, models, tasks, strict=True):
        _assert_same(s, o, m, t.x_test)


@pytest.mark.parametrize("opt", ["adagrad", "rmsprop", "adadelta", "gd"])
def test_other_elementwise_optimizers(opt):
    tasks = [make_task("digits", 30, a, 20, s) for s, a in ((0, 0), (1, 9))]
    models = [make_model("fcn", tasks[0].input_shape, seed=20 + i) for i in range(2)]
    cfg = TrainConfig(optimizer=opt, batch_size=8, max_epochs=6, collapse_patience=0)
    singles = _singles(models, tasks, cfg, [3, 4])
    outs = train_ensemble(models, tasks, cfg, [3, 4])
    for s, o, m, t in zip(singles, outs, models, tasks, strict=True):
        _assert_same(s, o, m, t.x_test, min_epochs=1)


def test_chunks_give_the_same_members():
    task = make_task("boolean", 32, 0, 32, 0)
    cfg = TrainConfig(optimizer="adam", lr=3e-3, batch_size=4, max_epochs=10)
    models = [make_model("fcn", task.input_shape, seed=s) for s in range(5)]
    copies = [copy.deepcopy(m) for m in models]
    one = train_ensemble(models, task, cfg, range(5))
    per = stacked_memory_per_member(models[0], task, cfg)
    seen = []
    two = train_ensemble(copies, task, cfg, range(5), memory_budget=2 * per,
                         on_finished=lambda m, o: seen.append(m))
    assert sorted(seen) == list(range(5))
    for a, b in zip(one, two, strict=True):
        # other M, other matmul blocking: equal up to float32 rounding
        assert [h["train_loss"] for h in a.result.history] == pytest.approx(
            [h["train_loss"] for h in b.result.history], rel=1e-5)


def test_refusals_are_one_line():
    task = make_task("boolean", 16, 0, 16, 0)
    models = [make_model("fcn", task.input_shape, seed=s) for s in range(2)]
    for cfg in (TrainConfig(optimizer="entropy-sgd"), TrainConfig(fam_strength=0.1)):
        with pytest.raises(FlatpriorError, match="--ensemble off"):
            train_ensemble(models, task, cfg)
    other = make_model("fcn", task.input_shape, hidden=(10,), seed=0)
    with pytest.raises(FlatpriorError, match="one architecture"):
        train_ensemble([models[0], other], task, TrainConfig())
    with pytest.raises(FlatpriorError, match="raise memory_budget"):
        train_ensemble(models, task, TrainConfig(), memory_budget=1000)


def test_diverging_member_fails_alone():
    task = make_task("boolean", 32, 0, 32, 0)
    models = [make_model("fcn", task.input_shape, seed=s) for s in range(2)]
    with torch.no_grad():
        models[1][1].weight.mul_(1e30)  # logits ~1e30: BCE overflows to inf at the first step
    ref = copy.deepcopy(models[1])
    with pytest.raises(FlatpriorError) as single:
        train(ref, task, TrainConfig(max_epochs=3, seed=1))
    outs = train_ensemble(models, task, TrainConfig(max_epochs=3), [0, 1])
    assert outs[0].result is not None and outs[1].result is None
    assert str(outs[1].error) == str(single.value)


def test_loop_backend_is_bitwise_the_single_trainer():
    """backend='loop' runs the single network's own kernels: identical trajectories, also over
    long runs where float32 rounding differences would otherwise grow."""
    tasks = [make_task("digits", 40, a, 30, s) for s, a in ((0, 0), (1, 6))]
    models = [make_model("fcn", tasks[0].input_shape, seed=30 + i) for i in range(2)]
    cfg = TrainConfig(optimizer="adam", batch_size=16, max_epochs=60, collapse_patience=0)
    singles = _singles(models, tasks, cfg, [8, 9])
    outs = train_ensemble(models, tasks, cfg, [8, 9], backend="loop")
    for (net, ref), o, m in zip(singles, outs, models, strict=True):
        assert [h["train_acc"] for h in o.result.history] == [h["train_acc"] for h in ref.history]
        assert o.result.epochs_trained == ref.epochs_trained
        for p, q in zip(net.parameters(), m.parameters(), strict=True):
            assert torch.equal(p, q)


def test_collapse_and_cap_match_single_trainer():
    task = make_task("boolean", 32, 0, 32, 0)
    models = [make_model("fcn", task.input_shape, seed=s) for s in range(3)]
    with torch.no_grad():
        models[1][-1].bias.fill_(1e4)  # saturated: always class 1 -> collapse
    cfg = TrainConfig(collapse_patience=4, lr=1e-6, max_epochs=6)
    singles = _singles(models, [task] * 3, cfg, [0, 1, 2])
    outs = train_ensemble(models, task, cfg, [0, 1, 2])
    for (_, ref), o in zip(singles, outs, strict=True):
        r = o.result
        assert (r.status, r.epochs_trained, r.message) == (ref.status, ref.epochs_trained,
                                                           ref.message)
    assert outs[1].result.status == "collapsed"
    assert outs[0].result.status == "did_not_reach_zero_error"


def test_diverged_cap_message_matches_single_trainer():
    """A member whose loss ends above its start is told to lower the lr, as train() says."""
    task = make_task("digits", 200, 0, 50, seed=0)
    models = [make_model("fcn", task.input_shape, seed=s) for s in range(2)]
    cfg = TrainConfig(lr=1000.0, max_epochs=12, collapse_patience=0)
    singles = _singles(models, [task] * 2, cfg, [0, 1])
    outs = train_ensemble(models, task, cfg, [0, 1], backend="loop")  # bitwise the trainer
    for (_, ref), o in zip(singles, outs, strict=True):
        if ref.status != "did_not_reach_zero_error":
            continue
        assert o.result is not None and o.result.status == ref.status
        assert o.result.message.split(" (train accuracy")[0] == ref.message.split(
            " (train accuracy")[0]
    assert any(r.message.startswith("diverged:") for _, r in singles)


@pytest.mark.parametrize("hidden", [(40, 40), (12, 8, 5)])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", ["mean", "sum", "weight"])
def test_written_out_fcn_gradients_are_autograds_bit_for_bit(hidden, batch, mode):
    # the bmm backend's step skips the autograd engine: its gradients must be autograd's, exactly
    from torch import nn

    from flatprior.models.stacked import fcn_bce_and_grads, fcn_forward, stack_parameters

    gen = torch.Generator().manual_seed(batch + len(hidden))
    M = 7
    models = [make_model("fcn", (7,), hidden=hidden, seed=s) for s in range(M)]
    ps = stack_parameters(models)
    xb = torch.rand(M, batch, 7, generator=gen).round()
    yb = (torch.rand(M, batch, generator=gen) > 0.5).float()
    weight = None
    if mode == "weight":  # ragged batches: some rows padded out, one member sits out
        w = (torch.rand(M, batch, generator=gen) > 0.3).float()
        w[:, 0] = 1.0
        w[3] = 0.0
        weight = w / w.sum(1, keepdim=True).clamp(min=1)
    row_grad = weight if weight is not None else (
        torch.ones_like(yb) / batch if mode == "mean" else None)
    bce_rows, grads = fcn_bce_and_grads(ps, xb, yb, row_grad)
    losses = ((bce_rows * weight).sum(1) if weight is not None
              else bce_rows.mean(1) if mode == "mean" else bce_rows.sum(1))
    leaves = [p.detach().clone().requires_grad_(True) for p in ps]
    bce = nn.functional.binary_cross_entropy_with_logits(fcn_forward(leaves, xb), yb,
                                                         reduction="none")
    ref = ((bce * weight).sum(1) if weight is not None
           else bce.mean(1) if mode == "mean" else bce.sum(1))
    ref_grads = torch.autograd.grad(ref.sum(), leaves)
    assert torch.equal(losses, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.shape == r.shape and torch.equal(g, r)
