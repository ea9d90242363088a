"""Stop rules of the trainer (flatprior.train.stopping) and its RNG hygiene."""

from __future__ import annotations

import torch

from flatprior.data import make_task
from flatprior.models import make_model
from flatprior.train import TrainConfig, train
from flatprior.train.stopping import Collapse, EpochCap, Stop, StopRules, ZeroError


def _m(acc=0.5, attack=float("nan"), constant=False):
    return {"train_acc": acc, "attack_acc": attack, "constant": constant}


def test_zero_error_then_overtraining():
    rule = ZeroError(overtrain_epochs=3)
    assert rule(1, _m(0.9)) is None and rule.epoch is None
    assert rule(2, _m(1.0)) is None and rule.epoch == 2  # fitted; 3 more epochs to go
    assert rule(3, _m(0.9)) is None and rule(4, _m(1.0)) is None  # losing the fit: no matter
    assert rule(5, _m(0.9)) == Stop("zero_error") and rule.epoch == 2
    assert ZeroError()(7, _m(1.0)) == Stop("zero_error")  # no overtraining: stop at once


def test_zero_error_on_train_plus_attack_needs_both():
    rule = ZeroError(needs_attack=True)
    assert rule(1, _m(1.0, attack=0.8)) is None
    assert rule(2, _m(1.0, attack=1.0)) == Stop("zero_error") and rule.epoch == 2
    assert ZeroError(needs_attack=False)(1, _m(1.0, attack=0.0)) == Stop("zero_error")


def test_collapse_counts_consecutive_constant_epochs():
    rule = Collapse(patience=3)
    assert [rule(e, _m(constant=c)) for e, c in enumerate([1, 1, 0, 1, 1], 1)] == [None] * 5
    stop = rule(6, _m(0.25, constant=True))
    assert stop.status == "collapsed" and "for 3 epochs (train accuracy 0.250)" in stop.message
    assert Collapse(patience=0)(1, _m(constant=True)) is None  # disabled


def test_epoch_cap():
    assert EpochCap(4)(3, _m()) is None
    stop = EpochCap(4)(4, _m(0.875))
    assert stop.status == "did_not_reach_zero_error"
    assert "within 4 epochs (train accuracy 0.8750)" in stop.message


def test_rules_order_collapse_before_cap_and_no_cap_after_zero_error():
    cfg = TrainConfig(max_epochs=2, overtrain_epochs=5, collapse_patience=2)
    rules = StopRules.from_config(cfg, has_attack=False)
    assert rules.phase == "train" and rules(1, _m(constant=True)) is None
    assert rules(2, _m(constant=True)).status == "collapsed"  # both fire: collapse wins
    rules = StopRules.from_config(cfg, has_attack=False)
    assert rules(1, _m(1.0)) is None and rules.phase == "overtrain"
    assert [rules(e, _m(constant=True)) for e in range(2, 6)] == [None] * 4  # cap/collapse off
    assert rules(6, _m()) == Stop("zero_error")
    # zero_error_on = train+attack with an empty attack set: S alone decides
    cfg = TrainConfig(zero_error_on="train+attack")
    assert StopRules.from_config(cfg, has_attack=False)(1, _m(1.0)) == Stop("zero_error")


def test_training_leaves_the_global_rng_alone_and_is_reproducible():
    task = make_task("digits", 60, 5, 30, seed=0)
    cfg = TrainConfig(optimizer="entropy-sgd", max_epochs=3, seed=4)
    m1, m2 = (make_model("fcn", task.input_shape, seed=0) for _ in range(2))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    r1 = train(m1, task, cfg)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # a different global state changes nothing
    r2 = train(m2, task, cfg)
    assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r2.history]
    assert r1.epochs_trained == 3 and r1.status == "did_not_reach_zero_error"
