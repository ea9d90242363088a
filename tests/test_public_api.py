"""The top-level API: ``import flatprior as fp`` is light, and every exported name works."""

from __future__ import annotations

import math
import subprocess
import sys

import flatprior as fp


def test_import_flatprior_does_not_import_torch():
    code = ("import sys, flatprior as fp; assert 'torch' not in sys.modules; "
            "assert 'log_prior' in fp.__all__ and 'log_prior' in dir(fp); "
            "fp.make_config(n_train=3); assert 'torch' not in sys.modules; "
            "fp.log_prior; assert 'torch' in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_every_exported_name_is_the_subpackage_object():
    from flatprior import data, flatness, measures, prior, train

    for name in fp.__all__:
        assert getattr(fp, name) is not None, name
    assert fp.make_task is data.make_task
    assert fp.keskar_sharpness is flatness.keskar_sharpness
    assert fp.log_prior is prior.log_prior
    assert fp.log_prior_tilting is prior.log_prior_tilting
    assert fp.train_network is train.train
    assert fp.MEASURE_REGISTRY is measures.REGISTRY
    try:
        fp.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("unknown attribute did not raise")


def test_quick_start_through_the_top_level_names():
    """A digits FCN to zero error, then sharpness, log P(f) and the bound via ``fp.*`` (≈ 2 s)."""
    import torch

    task = fp.make_task("digits", n_train=60, n_attack=0, n_test=60, seed=0)
    model = fp.make_model("fcn", task.input_shape, hidden=(20,), seed=0)
    res = fp.train_network(model, task, fp.TrainConfig(max_epochs=500))
    assert res.status == "zero_error" and fp.evaluate(model, task.x_train, task.y_train)[1] == 1.0
    s = fp.keskar_sharpness(model, torch.nn.BCEWithLogitsLoss(), task.x_train,
                            task.y_train[:, None], method="lbfgsb")
    assert s > 0
    # an independent kernel (identity) gives P(f) = 2^-n exactly, for every labelling
    eye = torch.eye(8, dtype=torch.float64)
    assert math.isclose(fp.log_prior(eye, torch.ones(8)).log_prob, -8 * math.log(2), rel_tol=1e-9)
    x = torch.cat([task.x_train, task.x_test])
    lp = fp.log_prior(fp.arccos_kernel(x.flatten(1).double(), depth=1), fp.predict(model, x))
    assert -len(x) * math.log(2) * 2 < lp.log_prob < 0
    lp_s = fp.log_prior(fp.arccos_kernel(task.x_train.flatten(1).double(), depth=1),
                        task.y_train).log_prob
    m = len(task.y_train)
    assert math.isclose(fp.pac_bayes_bound(lp_s, m), (-lp_s + math.log(2 * m / 0.05)) / (m - 1))
