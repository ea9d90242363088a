import json

import pytest
import torch

from flatprior.errors import FlatpriorError
from flatprior.models import alpha_scale
from flatprior.pipeline import (
    _alpha_callback,
    build_model,
    build_task,
    compute_measures,
    make_config,
    run,
)


def test_record_is_json_and_complete():
    rec = run(dict(dataset="digits", n_train=100, n_attack=10, n_test=100, measures=(), seed=2))
    json.dumps(rec)  # serialisable
    assert rec["status"] == "zero_error" and rec["train_error"] == 0.0
    assert rec["config"]["n_attack"] == 10 and rec["seed"] == 2
    assert rec["history"][0]["epoch"] == 0
    assert rec["key"] == make_config(**rec["config"]).key()


def test_key_depends_on_config_not_on_paths():
    a = make_config(dataset="mnist", data_root="/a")
    assert a.key() == make_config(dataset="mnist", data_root="/b").key()
    assert a.key() != make_config(dataset="mnist", seed=1).key()


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(n_trian=5), "n_trian: unknown field"),
        (dict(n_train="many"), "n_train"),
        (dict(sharpness_eps=0), "sharpness_eps"),
        (dict(alpha=-2.0), "alpha"),
        (dict(measures=("flatness",)), "unknown measure"),
        (dict(model="vit"), "unknown model 'vit'"),
    ],
)
def test_bad_config_one_line(fields, match):
    with pytest.raises(FlatpriorError, match=match) as info:
        make_config(**fields)
    assert "\n" not in str(info.value)


def test_alpha_event_keeps_function_and_scales_weights():
    cfg = make_config(dataset="digits", n_train=50, n_test=50, alpha_epoch=2, alpha=4.0,
                      alpha_after_zero_error=False)
    task = build_task(cfg)
    model = build_model(cfg, task.input_shape)
    before = model(task.x_test).detach().clone()
    w0 = model[1].weight.detach().clone()
    cb = _alpha_callback(cfg, task)
    m1 = {"epoch": 1, "phase": "train"}
    cb(model, m1)
    assert "alpha_scaled" not in m1
    m2 = {"epoch": 2, "phase": "train"}
    cb(model, m2)
    assert m2["alpha_scaled"] is True and m2["alpha_same_function"] is True
    assert "before_alpha" not in m2  # measure_every = 0: no per-epoch measures
    assert torch.allclose(model[1].weight, 4.0 * w0)
    assert torch.allclose(model(task.x_test), before, atol=1e-4, rtol=1e-4)


def test_alpha_event_measures_the_same_weights_before_the_scaling():
    cfg = make_config(dataset="digits", n_train=50, n_test=50, alpha_epoch=1, alpha=0.2,
                      alpha_after_zero_error=False, measure_every=5,
                      epoch_measures=("sharpness_lbfgsb", "log_prior"))
    task = build_task(cfg)
    model = build_model(cfg, task.input_shape)
    m = {"epoch": 1, "phase": "train"}
    _alpha_callback(cfg, task)(model, m)
    after = compute_measures(model.eval(), task, cfg, cfg.epoch_measures)
    before = m["before_alpha"]
    assert before["log_prior"] == after["log_prior"]  # same function, same labels, same EP
    # alpha = 0.2 on layer 0 moves Keskar sharpness (L-BFGS-B) by far more than rounding
    assert after["sharpness_lbfgsb"] / before["sharpness_lbfgsb"] > 2


def test_log_prior_invariant_under_alpha_scaling():
    pytest.importorskip("flatprior.prior.ep")
    from flatprior.pipeline import prior_measures
    from flatprior.train import TrainConfig, train

    cfg = make_config(dataset="digits", n_train=80, n_test=120, seed=1)
    task = build_task(cfg)
    model = build_model(cfg, task.input_shape)
    train(model, task, TrainConfig(seed=1))
    a = prior_measures(model, task, cfg)
    b = prior_measures(alpha_scale(model, 0, 37.0), task, cfg)
    assert a["log_prior"] == b["log_prior"]  # same function => same value, exactly
    assert a["log_prior"] < 0 and a["pac_bayes_bound"] > 0


def test_record_stores_tilting_interval():
    rec = run(dict(dataset="digits", n_train=40, n_test=40, seed=0, measures=("log_prior",),
                   prior_method="tilting"))
    assert rec["log_prior_ci_low"] <= rec["log_prior"] <= rec["log_prior_ci_high"]
    assert 0 < rec["log_prior_std_err"] < 1.0
    assert rec["config"]["prior_method"] == "tilting"
