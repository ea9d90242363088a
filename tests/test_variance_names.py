"""One spelling of the variance parameters everywhere (issue #14): ``sigma_w2``, ``sigma_b2``.

The old names are refused with a line naming the new one, and results stored under the old
``sigma_b`` (a standard deviation) keep their keys: a sweep resumes instead of re-running them,
reports read them as ``sigma_b2``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import _fake_runs
from flatprior.config import LATER_FIELDS, RunConfig, config_key, make_config, migrate_config
from flatprior.errors import FlatpriorError
from flatprior.experiments.runner import run_sweep
from flatprior.experiments.specs import load_spec, resolve
from flatprior.experiments.store import Store


def _old_key(old_config: dict) -> str:
    """The key recipe just before the rename: sorted JSON without data_root and without the
    later fields at their defaults, sha256, 16 hex digits (written out, not imported)."""
    d = {k: v for k, v in old_config.items() if k != "data_root"
         and not (k in LATER_FIELDS and v == RunConfig.model_fields[k].default)}
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()[:16]


def _as_stored_before_rename(cfg: RunConfig, sigma_b: float) -> dict:
    d = cfg.model_dump(mode="json")
    del d["sigma_b2"]
    d["sigma_b"] = sigma_b
    return d


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.just(0.0), st.floats(min_value=1e-150, max_value=1e150)))
def test_key_of_sigma_b2_equals_the_key_stored_under_sigma_b(sigma_b):
    # sqrt(fl(x * x)) == x for binary floats away from under/overflow: the key is unchanged
    assert math.sqrt(sigma_b * sigma_b) == sigma_b
    new = RunConfig(sigma_b2=sigma_b * sigma_b)
    old = _as_stored_before_rename(new, sigma_b)
    assert new.key() == _old_key(old) == config_key(old) == config_key(migrate_config(old))


def test_every_shipped_spec_keeps_its_keys():
    # all shipped configs use the default bias variance 1 (= the old sigma_b 1.0)
    for spec, preset in [("fig2-boolean", "quick"), ("fig3", "paper"), ("fig5", "paper")]:
        for cfg in resolve(spec, preset).configs[:20]:
            old = _as_stored_before_rename(cfg, math.sqrt(cfg.sigma_b2))
            assert cfg.key() == _old_key(old) == config_key(old)


@pytest.mark.parametrize("old, value, new", [("sigma_b", 0.5, "sigma_b2 = 0.25"),
                                             ("sigma_w", 2.0, "sigma_w2 = 4.0")])
def test_old_names_in_a_config_are_refused_naming_the_new_one(old, value, new):
    with pytest.raises(FlatpriorError) as e:
        make_config(**{old: value})
    msg = str(e.value)
    assert "\n" not in msg and f"{old} was renamed" in msg and new in msg


def test_old_names_in_spec_files_overrides_and_cli(tmp_path, cli):
    spec = tmp_path / "mine.toml"
    spec.write_text('name = "mine"\ntitle = "t"\nreproduces = "x"\n[base]\nsigma_b = 0.5\n'
                    "[presets.quick]\n[presets.paper]\n")
    with pytest.raises(FlatpriorError, match=r"sigma_b was renamed sigma_b2 .* sigma_b2 = 0.25"):
        load_spec(str(spec))
    p = cli("run", "fig3", "--dry-run", "--set", "sigma_b=0.5")
    assert p.returncode == 2 and "sigma_b2 = 0.25" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = cli("run", "fig3", "--dry-run", "--set", "sigma_b2=0.25")
    assert p.returncode == 0, p.stderr


def test_old_keyword_arguments_are_refused_naming_the_new_one():
    from flatprior.models import make_model
    from flatprior.models.fcn import FCN
    from flatprior.models.init import init_weights
    from flatprior.prior import sample_boolean_prior

    with pytest.raises(FlatpriorError, match="sigma_b2 = 0.25"):
        make_model("fcn", (4,), sigma_b=0.5)
    with pytest.raises(FlatpriorError, match="sigma_b2 = 4.0"):
        init_weights(FCN((4, 3, 1)), sigma_b=2.0)
    with pytest.raises(FlatpriorError, match="sigma_w was renamed sigma_w2"):
        sample_boolean_prior(10, (2, 1), sigma_w=1.0)


def test_init_weights_bias_variance():
    from torch import nn

    from flatprior.models.fcn import FCN
    from flatprior.models.init import init_weights

    m = init_weights(FCN((10, 4000, 1)), sigma_w2=1.0, sigma_b2=0.25, seed=0)
    first = next(mod for mod in m.modules() if isinstance(mod, nn.Linear))
    assert first.bias.shape == (4000,)
    assert float(first.bias.detach().var()) == pytest.approx(0.25, rel=0.08)  # 4000 draws: ±4.5 %


def test_boolean_sampler_reads_variances():
    """A threshold unit sign(w.x + b) on {0,1}^2 with w ~ N(0, sigma_w2/2), b ~ N(0, sigma_b2).

    Exact pattern probabilities (Gaussian orthants, as in test_prior_boolean) for variances
    (4, 0.25); read as standard deviations the weight/bias ratio would be 16 instead of 4.
    """
    from flatprior.prior import function_hex, sample_boolean_prior
    from test_prior_boolean import _pattern_prob

    A = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=float)
    C = A @ np.diag([4.0 / 2, 4.0 / 2, 0.25]) @ A.T
    probs = {function_hex(bits): _pattern_prob(C, [1 if b else -1 for b in bits])
             for bits in itertools.product((0, 1), repeat=4)}
    n = 60_000
    prior = sample_boolean_prior(n, widths=(2, 1), sigma_w2=4.0, sigma_b2=0.25, seed=5)
    assert (prior.sigma_w2, prior.sigma_b2) == (4.0, 0.25)
    seen = dict(zip(prior.table().function, prior.table()["count"], strict=True))
    keys = [k for k, p in probs.items() if p > 0]
    observed = np.array([seen.get(k, 0) for k in keys])
    assert chisquare(observed, np.array([probs[k] * n for k in keys])).pvalue > 1e-3


def test_boolean_prior_files_of_format_1_load_as_variances(tmp_path):
    from flatprior.prior import BooleanPrior, sample_boolean_prior

    prior = sample_boolean_prior(500, widths=(2, 3, 1), sigma_w2=0.25, sigma_b2=4.0, seed=1,
                                 antithetic=False)  # format 1 and 2 files hold independent draws
    old = tmp_path / "old.npz"
    meta = {"format": 1, "n_inputs": 2, "widths": [2, 3, 1], "sigma_w": 0.5, "sigma_b": 2.0,
            "n_samples": 500, "seeds": [1]}
    np.savez_compressed(old, keys=prior.keys, counts=prior.counts, meta=np.array(json.dumps(meta)))
    back = BooleanPrior.load(old)
    assert (back.sigma_w2, back.sigma_b2) == (0.25, 4.0)
    assert not back.antithetic
    assert back.merge(sample_boolean_prior(10, (2, 3, 1), sigma_w2=0.25, sigma_b2=4.0,
                                           seed=2, antithetic=False)).n_samples == 510
    new = tmp_path / "new.npz"
    prior.save(new)
    assert BooleanPrior.load(new).table().equals(prior.table())


def test_a_store_written_before_the_rename_resumes_and_reports_sigma_b2(tmp_path):
    cfgs = resolve("fig3", "quick", "mnist-fcn",
                   {"seed": [0, 1], "n_attack": [0], "sigma_b2": 0.25}).configs
    with Store(tmp_path / "old.db") as st:
        # the first run as an old flatprior stored it: config with sigma_b = 0.5, old key
        old_cfg = _as_stored_before_rename(cfgs[0], 0.5)
        rec = _fake_runs.fake_record(old_cfg)
        assert rec["key"] == _old_key(old_cfg) == cfgs[0].key()
        st.put(rec, spec="t")
        s = run_sweep(cfgs, st, "t", run_fn=_fake_runs.fake_record, workers=1, progress=False)
        assert (s.total, s.skipped, s.done) == (2, 1, 1)
        assert st.count() == 2
        df = st.to_frame()
    assert "sigma_b" not in df.columns and df["sigma_b2"].tolist() == [0.25, 0.25]
