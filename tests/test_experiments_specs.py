import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatprior.errors import FlatpriorError
from flatprior.experiments.specs import _expand_axis as expand_axis
from flatprior.experiments.specs import (
    list_specs,
    load_overrides,
    load_spec,
    parse_sets,
    parse_value,
    resolve,
    sweep_for_display,
)

EXPECTED = {"fig2-boolean", "fig3", "fig4", "figS18", "fig5", "figS9", "figS11-16", "figS19"}


def test_every_shipped_spec_resolves_to_valid_configs():
    specs = list_specs()
    assert EXPECTED <= set(specs)
    for s in specs.values():
        assert s.reproduces and s.title and s.analysis in ("attack", "epochs", "boolean",
                                                            "psgd")
        for v in list(s.variants) or [None]:
            for p in ("quick", "paper"):
                if s.name in ("fig2-boolean", "psgd-boolean") and p == "paper":
                    continue  # 1e5+ runs: built in test_specific_spec_contents
                r = resolve(s, p, v)
                assert len(r.configs) == r.n_runs >= 1
                assert len({c.key() for c in r.configs}) == len(r.configs)


def test_fig3_paper_is_the_study_sweep():
    r = resolve("fig3", "paper", "mnist-fcn")
    assert r.label == "fig3/mnist-fcn@paper"
    assert len(r.configs) == 55
    assert sorted({c.n_attack for c in r.configs}) == list(range(0, 501, 50))
    assert {c.seed for c in r.configs} == {0, 1, 2, 3, 4}
    c = r.configs[0]
    assert (c.dataset, c.n_train, c.n_test, c.optimizer, c.hidden) == (
        "mnist", 500, 1000, "sgd", (40, 40))
    assert set(c.measures) == {"sharpness", "sharpness_lbfgsb", "log_prior"}


def test_every_paper_preset_measures_sharpness_as_the_study_did():
    """eps 1e-4, SGD ascent, 100 epochs (lr 1e-3, batch 128 are the measure's defaults), with
    L-BFGS-B stored beside it; per-epoch specs measure a converged maximiser per epoch."""
    from flatprior.experiments.specs import list_specs

    for name, s in list_specs().items():
        if s.analysis == "psgd":  # counts the functions training finds; measures nothing
            continue
        for v in list(s.variants) or [None]:
            r = resolve(s, "paper", v, {"seed": [0, 1, 2]})
            for c in r.configs[:3]:
                assert c.sharpness_eps == 1e-4 and c.sharpness_method == "sgd", name
                assert c.sharpness_epochs == 100, name
                assert {"sharpness", "sharpness_lbfgsb"} <= set(c.measures), name
                if c.measure_every:
                    assert "sharpness_lbfgsb" in c.epoch_measures, name
            assert "ascent 100 ep + L-BFGS-B" in r.sharpness_settings(), name


def test_quick_presets_that_need_no_files_use_embedded_data():
    for name, variant in [("fig3", "mnist-fcn"), ("fig4", None), ("figS18", None),
                          ("fig5", None), ("figS9", None), ("figS11-16", None),
                          ("fig2-boolean", None)]:
        r = resolve(name, "quick", variant)
        assert {c.dataset for c in r.configs} <= {"digits", "boolean"}, name
    # CIFAR variants need files in both presets and say so
    for v in ("cifar-fcn", "cifar-resnet"):
        assert "--data-root" in resolve("fig3", "quick", v).needs
    assert "train files" in resolve("figS19", "paper").needs


def test_specific_spec_contents():
    f4 = resolve("fig4", "quick")
    assert {c.optimizer for c in f4.configs} >= {"adam", "entropy-sgd"}
    s18 = resolve("figS18", "paper")
    assert {c.optimizer for c in s18.configs} == {"adagrad", "momentum", "rmsprop", "gd",
                                                   "adadelta"}
    s11 = resolve("figS11-16", "paper")
    assert {c.overtrain_epochs for c in s11.configs} == {0, 100, 1000}
    assert s11.spec.group_by == ["optimizer", "overtrain_epochs"]
    f5 = resolve("fig5", "paper").configs[0]
    assert f5.n_attack == 0 and f5.measure_every > 0 and f5.alpha_epoch is not None
    assert f5.overtrain_epochs >= 1000
    assert resolve("figS19", "paper").configs[0].n_train == 10000
    b = resolve("fig2-boolean", "paper")
    assert len(b.configs) == 100000 and b.spec.analysis == "boolean"
    assert {c.data_seed for c in b.configs[:10]} == {0}  # same S, different inits


def test_set_takes_the_range_form_that_list_and_dry_run_print():
    # what `flatprior list` shows ({range = [0, 100000]}) can be typed back with --set
    r = resolve("fig2-boolean", "quick", None, parse_sets(["seed={range = [10, 40, 3]}"]))
    assert [c.seed for c in r.configs] == list(range(10, 40, 3))
    assert sweep_for_display(r.sweep) == {"seed": list(range(10, 40, 3))}  # 10 values: a list
    r = resolve("fig2-boolean", "quick", None, parse_sets(["seed={range=[0, 1000]}"]))
    assert sweep_for_display(r.sweep) == {"seed": {"range": [0, 1000]}}
    for bad, match in (("seed={range=[5, 0]}", "is empty"),
                       ("seed={range=[0, 9], step=2}", "use a list or"),
                       ("seed={range=[0, 2e9]}", "more than the 1000000 runs"),
                       ("seed={range=[0, \"ten\"]}", "range needs integers")):
        with pytest.raises(FlatpriorError, match=match):
            resolve("fig2-boolean", "quick", None, parse_sets([bad]))


def test_overrides_fix_sweep_and_set_tuples():
    r = resolve("fig3", "quick", "mnist-fcn", parse_sets(
        ["n_train=200", "optimizer=adam", "seed=[3, 4]", "n_attack=0",
         "measures=sharpness,log_prior", "hidden=[20, 20]", "lr=1e-3"]))
    assert len(r.configs) == 2
    assert {c.seed for c in r.configs} == {3, 4}
    c = r.configs[0]
    assert (c.n_train, c.optimizer, c.n_attack, c.hidden, c.lr) == (200, "adam", 0, (20, 20),
                                                                    1e-3)
    assert c.measures == ("sharpness", "log_prior")
    r2 = resolve("fig3", "quick", "mnist-fcn", {"hidden": [[10], [20, 20]], "seed": 0,
                                                "n_attack": 0})
    assert sorted(c.hidden for c in r2.configs) == [(10,), (20, 20)]
    r3 = resolve("fig3", "quick", "mnist-fcn", {"measures": "none", "seed": 0, "n_attack": 0})
    assert r3.configs[0].measures == ()


def test_parse_value():
    assert parse_value("200") == 200 and parse_value("1e-3") == 1e-3
    assert parse_value("true") is True and parse_value("[0, 1]") == [0, 1]
    assert parse_value("adam") == "adam" and parse_value("entropy-sgd") == "entropy-sgd"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"n_trian": 5}, "unknown run field (did you mean 'n_train'?)"),
        ({"n_train": "abc"}, "n_train: Input should be a valid integer"),
        ({"n_train": -3}, "n_train: Input should be greater than or equal to 1"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
        ({"measures": "flatness"}, "unknown measure"),
        ({"seed": []}, "empty list"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, match):
    import re

    with pytest.raises(FlatpriorError, match=re.escape(match)) as e:
        resolve("fig3", "quick", "mnist-fcn", overrides)
    assert "\n" not in str(e.value)


def test_bad_names():
    with pytest.raises(FlatpriorError, match="did you mean 'figS9'"):
        load_spec("fig9")
    with pytest.raises(FlatpriorError, match="no variant 'mnist'"):
        resolve("fig3", "quick", "mnist")
    with pytest.raises(FlatpriorError, match="unknown preset"):
        resolve("fig3", "huge")
    with pytest.raises(FlatpriorError, match="no variants"):
        resolve("fig4", "quick", "x")
    with pytest.raises(FlatpriorError, match="FIELD=VALUE"):
        parse_sets(["n_train"])


def test_config_file_overrides_and_custom_spec_file(tmp_path):
    f = tmp_path / "o.toml"
    f.write_text('n_train = 100\noptimizer = "adam"\n[sweep]\nseed = {range = [0, 3]}\n'
                 "n_attack = [0, 10]\n")
    r = resolve("fig3", "quick", "mnist-fcn", load_overrides(f))
    assert len(r.configs) == 6 and {c.n_train for c in r.configs} == {100}
    bad = tmp_path / "bad.toml"
    bad.write_text("n_train = \n")
    with pytest.raises(FlatpriorError, match="not valid TOML"):
        load_overrides(bad)
    spec = tmp_path / "mine.toml"
    spec.write_text('name = "mine"\ntitle = "t"\nreproduces = "nothing"\n[base]\n'
                    'dataset = "digits"\nn_train = 50\nn_test = 50\n[sweep]\nseed = [0, 1]\n'
                    "[presets.quick]\n[presets.paper]\n[presets.paper.base]\nn_train = 100\n")
    assert len(resolve(str(spec), "quick").configs) == 2
    assert resolve(str(spec), "paper").configs[0].n_train == 100
    spec.write_text('name = "mine"\ntitle = "t"\nreproduces = "x"\n[base]\nn_trainn = 5\n'
                    "[presets.quick]\n[presets.paper]\n")
    with pytest.raises(FlatpriorError, match="unknown run field 'n_trainn'"):
        load_spec(str(spec))


def test_spec_ensemble_default_is_validated(tmp_path):
    assert load_spec("fig2-boolean").ensemble == load_spec("psgd-boolean").ensemble == "auto"
    assert load_spec("fig3").ensemble == "off"  # long MNIST training: one task per run
    spec = tmp_path / "mine.toml"
    head = 'name = "mine"\ntitle = "t"\nreproduces = "x"\n'
    spec.write_text(head + 'ensemble = "auto"\n[presets.quick]\n[presets.paper]\n')
    assert load_spec(str(spec)).ensemble == "auto"
    spec.write_text(head + 'ensemble = "on"\n[presets.quick]\n[presets.paper]\n')
    with pytest.raises(FlatpriorError, match=r"invalid spec: ensemble: Input should be 'auto' "
                                             r"or 'off'"):
        load_spec(str(spec))


def test_sweep_for_display_writes_long_even_runs_in_the_range_form():
    shown = sweep_for_display({
        "seed": list(range(100_000)),
        "n_attack": list(range(0, 501, 50)),  # 11 values: short, kept as a list
        "lr": [0.1 * k for k in range(30)],  # floats: kept
        "width_seed": list(range(10, -50, -2)),  # 30 values, step -2
        "irregular": list(range(30)) + [99],
        "flags": [True, False] * 15,  # bools are not integers here
    })
    assert shown["seed"] == {"range": [0, 100_000]}
    assert shown["n_attack"] == list(range(0, 501, 50))
    assert shown["lr"] == [0.1 * k for k in range(30)]
    assert shown["width_seed"] == {"range": [10, -50, -2]}
    assert shown["irregular"] == list(range(30)) + [99]
    assert shown["flags"] == [True, False] * 15


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-10**6, 10**6), min_size=1, max_size=60)
       | st.builds(lambda a, n, d: [a + d * k for k in range(n)], st.integers(-10**6, 10**6),
                   st.integers(1, 200), st.integers(-1000, 1000).filter(bool)))
def test_sweep_for_display_expands_back_to_the_same_axis(values):
    # the shown form is what a spec file may write: reading it back gives the same runs
    shown = sweep_for_display({"seed": values})["seed"]
    assert expand_axis("seed", shown) == values


def test_list_of_a_1e5_run_spec_stays_short(cli):
    p = cli("list", "fig2-boolean")
    assert p.returncode == 0, p.stderr
    assert '"sweep": {"seed": {"range": [0, 100000]}}' in p.stdout
    assert len(p.stdout) < 20_000  # it printed all 100 000 seeds (~600 kB) per preset before
