import copy

import pytest
import torch

from flatprior.data import make_task
from flatprior.errors import FlatpriorError
from flatprior.models import make_model
from flatprior.train import EntropySGD, TrainConfig, evaluate, train


@pytest.fixture(scope="module")
def task():
    return make_task("digits", 200, 20, 300, seed=0)


def test_reaches_zero_training_error_and_reports(task):
    model = make_model("fcn", task.input_shape, seed=0)
    seen = []
    res = train(model, task, TrainConfig(seed=0), callbacks=[lambda m, met: seen.append(met)])
    assert res.status == "zero_error" and res.reached_zero_error
    assert res.train_error == 0.0
    _, acc, _ = evaluate(model, task.x_train, task.y_train)
    assert acc == 1.0  # the returned model really fits S
    assert res.epochs_to_zero_error == res.epochs_trained == len(seen) - 1
    assert seen[0]["epoch"] == 0 and seen[-1]["train_acc"] == 1.0
    assert {"train_loss", "train_acc", "attack_acc", "test_acc", "test_loss"} <= set(seen[-1])
    assert 0.0 < res.test_error < 0.5


def test_attack_set_hurts_and_fit_on_train_plus_attack(task):
    clean = make_task("digits", 200, 0, 300, seed=0)
    r0 = train(make_model("fcn", clean.input_shape, seed=1), clean, TrainConfig(seed=1))
    m = make_model("fcn", task.input_shape, seed=1)
    r1 = train(m, task, TrainConfig(seed=1, zero_error_on="train+attack"))
    assert r1.status == "zero_error" and r1.attack_error == 0.0
    _, acc_attack, _ = evaluate(m, task.x_attack, task.y_attack)
    assert acc_attack == 1.0  # memorised the flipped labels
    assert r1.test_error > r0.test_error


def test_overtraining_adds_epochs():
    clean = make_task("digits", 200, 0, 100, seed=0)
    res = train(make_model("fcn", clean.input_shape), clean, TrainConfig(overtrain_epochs=7))
    assert res.epochs_trained == res.epochs_to_zero_error + 7
    assert res.history[-1]["phase"] == "overtrain"
    assert res.history[res.epochs_to_zero_error]["train_acc"] == 1.0
    # (train_error is measured at the end: SGD may leave zero error again while overtraining)


def test_cap_gives_clear_result_not_hang(task):
    res = train(make_model("fcn", task.input_shape), task, TrainConfig(max_epochs=2, lr=1e-4))
    assert res.status == "did_not_reach_zero_error" and res.epochs_to_zero_error is None
    assert "did not reach zero training error within 2 epochs" in res.message
    assert res.train_error > 0


def test_collapse_is_reported(task):
    model = make_model("fcn", task.input_shape)
    with torch.no_grad():
        model[-1].bias.fill_(1e4)  # saturated: always predicts class 1, gradient ~ 0
    res = train(model, task, TrainConfig(collapse_patience=5, lr=1e-6))
    assert res.status == "collapsed" and "predicted one class" in res.message


def test_seeded_runs_are_bit_identical(task):
    def once():
        m = make_model("fcn", task.input_shape, seed=3)
        r = train(m, task, TrainConfig(seed=3, optimizer="adam", overtrain_epochs=2))
        return r, [p.detach().clone() for p in m.parameters()]

    (r1, p1), (r2, p2) = once(), once()
    assert r1.epochs_to_zero_error == r2.epochs_to_zero_error
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))


@pytest.mark.parametrize(
    "opt", ["sgd", "momentum", "adam", "adagrad", "rmsprop", "adadelta", "gd", "entropy-sgd"]
)
def test_every_optimizer_trains_to_zero_error(opt):
    t = make_task("digits", 100, 0, 100, seed=0)
    res = train(
        make_model("fcn", t.input_shape, seed=0), t, TrainConfig(optimizer=opt, max_epochs=3000)
    )
    assert res.status == "zero_error", res.message


def test_entropy_sgd_reduces_to_sgd():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    x, y = torch.randn(32, 5), torch.rand(32, 1)
    loss = torch.nn.MSELoss()
    eta, gamma, eta_in = 0.7, 0.2, 0.3
    ent = EntropySGD(
        a.parameters(),
        lr=eta,
        gamma=gamma,
        inner_lr=eta_in,
        inner_steps=1,
        alpha=1.0,
        noise=0.0,
        gamma_growth=0.0,
    )
    sgd = torch.optim.SGD(b.parameters(), lr=eta * gamma * eta_in)
    for _ in range(5):

        def closure():
            ent.zero_grad()
            value = loss(a(x), y)
            value.backward()
            return value

        ent.step(closure)
        sgd.zero_grad()
        loss(b(x), y).backward()
        sgd.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (TrainConfig(optimizer="lion"), "unknown optimizer 'lion'.*adam"),
        (TrainConfig(lr=-0.1), "lr must be > 0"),
        (TrainConfig(batch_size=0), "batch_size"),
        (TrainConfig(overtrain_epochs=-1), "overtrain_epochs"),
    ],
)
def test_bad_training_config(task, cfg, match):
    with pytest.raises(FlatpriorError, match=match):
        train(make_model("fcn", task.input_shape), task, cfg)


def test_diverging_loss_is_a_clear_error(task):
    with pytest.raises(FlatpriorError, match="lower the learning rate"):
        train(make_model("fcn", task.input_shape), task, TrainConfig(lr=1e12, optimizer="sgd"))


def test_augmentation_only_changes_training_batches():
    from flatprior.train.trainer import _augment

    x = torch.rand(6, 3, 8, 8)
    out = _augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    # every augmented image is a shifted (and maybe flipped) crop of the zero-padded original
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        found = any(
            torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1))
            for c in (padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9))
        )
        assert found


def test_predict_is_evaluates_predictions_and_keeps_the_mode():
    from flatprior.train import predict

    task = make_task("boolean", 64, 0, 64, 0)
    model = make_model("fcn", (7,), hidden=(12, 8), seed=1)
    x = torch.cat([task.x_train, task.x_test])
    for training in (True, False):
        model.train(training)
        pred = predict(model, x, batch_size=48)  # three chunks
        assert model.training is training
        assert torch.equal(pred, evaluate(model, x, torch.zeros(len(x)), batch_size=48)[2])
        assert 0 < float(pred.sum()) < len(x)  # both classes: the comparison means something
    assert predict(model, x[:0]).shape == (0,)
