"""One config (flatprior.config), one measure registry (flatprior.measures), and the CLI's
`train` options checked against both."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from flatprior import cli, measures, names
from flatprior.config import TRAIN_FIELDS, RunConfig, make_config


def _train_params() -> dict:
    command = typer.main.get_command(cli.app).commands["train"]
    return {p.name: p for p in command.params}


def test_every_runconfig_field_is_a_train_option_with_its_default_or_listed_as_not_exposed():
    params = _train_params()
    fields = RunConfig.model_fields
    assert not set(cli.TRAIN_NOT_EXPOSED) & set(params)
    assert set(cli.TRAIN_NOT_EXPOSED) <= set(fields)
    for name, info in fields.items():
        if name in cli.TRAIN_NOT_EXPOSED:
            continue
        assert name in params, f"RunConfig.{name} has no `flatprior train` option"
        default = params[name].default
        if name == "measures":
            default = cli._measures(default)
        assert default == info.default, name
    # options that are not config fields are about the output only
    assert set(params) - set(fields) == {"json_out", "history", "save_model"}
    # the CLI's measures default is RunConfig's (it used to add pac_bayes)
    assert params["measures"].default == "sharpness,log_prior"


def test_train_forwards_every_exposed_option_into_the_config(monkeypatch):
    import flatprior.pipeline

    seen = {}

    def fake_run(cfg, progress=None, save_model=None):
        seen["cfg"] = cfg
        return {"key": cfg.key(), "history": [], "notes": []}

    monkeypatch.setattr(flatprior.pipeline, "run", fake_run)
    values = {"dataset": "mnist", "data_root": "/tmp/x", "n_train": 7, "n_attack": 3,
              "n_test": 11, "model": "cnn", "optimizer": "adam", "lr": 0.5, "batch_size": 9,
              "max_epochs": 13, "overtrain_epochs": 2, "seed": 5, "measures": "trace,pac_bayes",
              "sharpness_eps": 0.01, "sharpness_method": "lbfgsb", "sharpness_epochs": 4,
              "prior_method": "tilting", "fam_strength": 0.25, "label_column": "target"}
    # --data-path switches the dataset to "file" (tests/test_data_files.py runs it end to end)
    assert set(values) == set(_train_params()) - {"json_out", "history", "save_model",
                                                  "data_path"}
    args = ["train", "--json"]
    for k, v in values.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    for k, v in values.items():
        want = tuple(v.split(",")) if k == "measures" else v
        assert getattr(cfg, k) == want, k


def test_train_config_copies_the_training_fields():
    from dataclasses import fields

    from flatprior.train import TrainConfig

    cfg = make_config(optimizer="momentum", lr=0.3, batch_size=17, max_epochs=9,
                      overtrain_epochs=4, zero_error_on="train+attack", loss_reduction="sum",
                      augment=True, fam_strength=0.5, seed=3)
    tcfg = cfg.train_config()
    assert isinstance(tcfg, TrainConfig)
    for f in TRAIN_FIELDS:
        assert getattr(tcfg, f) == getattr(cfg, f), f
    # every TrainConfig field that RunConfig also has is copied
    shared = {f.name for f in fields(TrainConfig)} & set(RunConfig.model_fields)
    assert shared == set(TRAIN_FIELDS)


def test_torch_free_names_match_the_registries_that_build_the_objects():
    from flatprior.data import DATASETS
    from flatprior.models import MODELS
    from flatprior.train import OPTIMIZERS

    assert DATASETS == names.DATASETS
    assert MODELS == names.MODELS
    assert tuple(OPTIMIZERS) == names.OPTIMIZERS


@pytest.mark.parametrize("code", [
    "import sys; sys.argv = ['flatprior', 'list']; from flatprior.cli import main; main()",
    "import flatprior.config, flatprior.measures; flatprior.config.make_config(model='cnn')",
    "from flatprior.experiments.specs import resolve; resolve('fig3', 'quick', 'mnist-fcn')",
])
def test_config_list_and_spec_resolution_import_no_torch(code):
    check = "; import sys; assert 'torch' not in sys.modules, 'torch imported'"
    p = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr


def test_registry_derived_tables_are_the_ones_the_analysis_used():
    new = ("adaptive_worst", "adaptive_average", "pac_bayes_flatness", "pac_bayes_mag_flatness",
           "path_norm")
    assert measures.MEASURE_COLUMNS == (
        "log_prior", "sharpness", "sharpness_lbfgsb", "spectral_norm", "logprod_topk", "trace",
        "relative_flatness", *new, "log_prod_spectral", "log_prod_frobenius", "pac_bayes_bound")
    assert measures.LOG_SCALE == (
        "sharpness", "sharpness_lbfgsb", "spectral_norm", "trace", "relative_flatness", *new)
    assert set(measures.FLATNESS_MEASURES) == {
        "sharpness", "sharpness_lbfgsb", "spectral_norm", "logprod_topk", "trace",
        "relative_flatness", *new, "log_prod_spectral", "log_prod_frobenius"}
    assert set(measures.PRIOR_MEASURES) == {"log_prior", "pac_bayes"}
    from flatprior.analysis.plots import label

    assert label("logprod_top50") == "log Π top-50 Hessian eigenvalues"
    assert label("sharpness_lbfgsb") == "sharpness (L-BFGS-B)"
    assert label("test_error") == "generalization error"
    assert measures.measure_of_column("logprod_top7").name == "logprod_topk"
    assert measures.measure_of_column("test_error") is None


def test_registry_flatness_group_matches_flatness_measures_dispatch():
    from flatprior import flatness

    grouped = {n for n, m in measures.REGISTRY.items()
               if m.compute == "flatprior.pipeline:flatness_group"}
    assert grouped == set(flatness.MEASURES)


def test_unknown_measure_is_one_line_naming_the_registry():
    from flatprior.errors import FlatpriorError

    with pytest.raises(FlatpriorError, match=r"measures: unknown measure\(s\) \['flat'\]"):
        make_config(measures=("flat",))
    with pytest.raises(FlatpriorError, match="choose from"):
        measures.get("flat")


def test_every_measure_writes_only_its_declared_keys_and_its_column():
    """All measures through the registry's dispatch on a tiny digits FCN (about 3 s)."""
    from flatprior.pipeline import build_model, build_task, compute_measures
    from flatprior.train import train

    cfg = make_config(n_train=40, n_test=30, hidden=(6,), topk=5, sharpness_epochs=2,
                      measures=measures.MEASURES, max_epochs=300)
    task = build_task(cfg)
    model = build_model(cfg, task.input_shape)
    train(model, task, cfg.train_config())  # PAC-Bayes flatness needs a loss that noise raises
    model.eval()
    base = {"kernel_time_s"}
    for name, m in measures.REGISTRY.items():
        out = compute_measures(model, task, cfg, (name,))
        declared = {k.format(topk=cfg.topk) for k in m.keys}
        assert set(out) <= declared | base, (name, set(out) - declared)
        column = m.column if m.column_pattern is None else f"logprod_top{cfg.topk}"
        assert m.matches(column) and isinstance(out[column], float), name
        assert callable(m.function())
    # together: one call per compute function, the union of the keys
    everything = compute_measures(model, task, cfg, measures.MEASURES)
    assert set(everything) >= {"log_prior", "pac_bayes_bound", "sharpness", "trace",
                               "logprod_top5", "relative_flatness", "sharpness_lbfgsb"}
