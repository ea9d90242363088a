"""The issue-16 predictors through the pipeline: values and wall times in the record, the run key
unchanged for configs that do not use the new fields, SAM's rho reaching the optimizer."""

from __future__ import annotations

import hashlib
import json

import pytest
from torch import nn

from flatprior.flatness import adaptive_sharpness, pac_bayes_flatness, path_norm
from flatprior.pipeline import LATER_FIELDS, build_model, build_task, make_config, run

NEW = ("adaptive_worst", "adaptive_average", "pac_bayes_flatness", "pac_bayes_mag_flatness",
       "path_norm", "log_prod_spectral", "log_prod_frobenius")


def test_record_holds_every_new_measure_with_its_time_and_matches_the_functions(tmp_path):
    cfg = dict(dataset="digits", n_train=60, n_test=60, seed=1, measures=NEW)
    rec = run(cfg, save_model=str(tmp_path / "net.pt"))
    json.dumps(rec)
    for m in NEW:
        assert isinstance(rec[m], float) and rec[f"{m}_time_s"] >= 0, m
    assert rec["adaptive_average_ci_low"] <= rec["adaptive_average"] <= rec[
        "adaptive_average_ci_high"]
    assert rec["pac_bayes_flatness_ci_low"] <= rec["pac_bayes_flatness"] <= rec[
        "pac_bayes_flatness_ci_high"]
    assert rec["pac_bayes_flatness"] == pytest.approx(1 / rec["pac_bayes_flatness_sigma"] ** 2)
    # the same numbers from the public functions on the trained network
    from flatprior.checkpoint import load_checkpoint

    c = make_config(**cfg)
    task = build_task(c)
    model = build_model(c, task.input_shape)
    net, _ = load_checkpoint(tmp_path / "net.pt", lambda _cfg: model)
    bce = nn.BCEWithLogitsLoss()
    y = task.y_train.reshape(-1, 1)
    assert rec["adaptive_worst"] == pytest.approx(
        adaptive_sharpness(net, bce, task.x_train, y, 0.01, "linf", "worst", seed=1), rel=1e-9)
    assert rec["pac_bayes_flatness"] == pytest.approx(
        pac_bayes_flatness(net, bce, task.x_train, y, 0.1, seed=1), rel=1e-9)
    assert rec["path_norm"] == pytest.approx(path_norm(net), rel=1e-9)


def test_key_of_configs_without_the_new_fields_is_unchanged():
    c = make_config(dataset="digits", seed=3, optimizer="adam")
    d = c.model_dump(mode="json", exclude={"data_root", *LATER_FIELDS})
    d["sigma_b"] = d.pop("sigma_b2") ** 0.5  # keyed under its name before the rename (#14)
    old = hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode())
    assert c.key() == old.hexdigest()[:16]
    assert make_config(optimizer="sam", sam_rho=0.1).key() != make_config(optimizer="sam").key()
    assert make_config(adaptive_rho=0.02).key() != c.key()


def test_sam_rho_reaches_the_optimizer(monkeypatch):
    import flatprior.train as train_mod

    seen = {}
    real = train_mod.train

    def spy(model, task, tcfg, *a, **k):
        seen["kw"] = tcfg.optimizer_kwargs
        return real(model, task, tcfg, *a, **k)

    monkeypatch.setattr(train_mod, "train", spy)
    run(dict(dataset="digits", n_train=40, n_test=20, optimizer="sam", sam_rho=0.0,
             measures=(), max_epochs=3))
    assert seen["kw"] == {"rho": 0.0}


def test_predictors_and_sam_specs():
    from flatprior.experiments.specs import resolve
    from flatprior.flatness import MEASURES as FLAT

    r = resolve("predictors", "quick", None)
    assert r.n_runs == 32
    axes = {"optimizer", "lr", "batch_size", "hidden", "n_attack"}
    for a in axes:
        assert len({getattr(c, a) for c in r.configs}) == 2, a
    c = r.configs[0]
    assert c.dataset == "digits" and set(c.measures) >= set(NEW) | {
        "log_prior", "pac_bayes", "sharpness", "spectral_norm", "relative_flatness"}
    assert set(NEW) <= set(FLAT)
    s = resolve("sam", "quick", None)
    assert {c.sam_rho for c in s.configs} == {0.0, 0.02, 0.05, 0.1, 0.2}
    assert {c.optimizer for c in s.configs} == {"sam"} and len({c.n_attack for c in s.configs}) > 1
