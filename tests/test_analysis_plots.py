import numpy as np
import pandas as pd

from flatprior.analysis.plots import attack_figure, boolean_figure, epochs_figure, to_png


def attack_frame():
    rows = []
    for opt in ("sgd", "adam"):
        for a in (0, 100, 200):
            rows.append({"optimizer": opt, "n_attack": a, "status": "zero_error",
                         "test_error": 0.1 + a / 1000, "log_prior": -100.0 - a,
                         "sharpness": 0.1 + a / 100})
    rows.append({"optimizer": "sgd", "n_attack": 300, "status": "collapsed",
                 "test_error": 0.5, "log_prior": -1.0, "sharpness": 1.0})
    return pd.DataFrame(rows)


def scatter_data(ax):
    (coll,) = ax.collections
    return coll.get_offsets(), coll.get_array()


def test_attack_figure_panels_and_colours():
    fig = attack_figure(attack_frame())
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert len(axes) == 4  # 2 optimizers x (log P, sharpness)
    titles = {a.get_title() for a in axes}
    assert titles == {"optimizer=adam", "optimizer=sgd"}
    lp = next(a for a in axes if a.get_ylabel() == "log P(f)" and a.get_title() == "optimizer=sgd")
    xy, c = scatter_data(lp)
    assert len(xy) == 3  # the collapsed run is not plotted
    assert np.allclose(xy[:, 0], [0.1, 0.2, 0.3]) and np.allclose(xy[:, 1], [-100, -200, -300])
    assert list(c) == [0, 100, 200]
    sh = next(a for a in axes if a.get_ylabel() == "sharpness")
    assert sh.get_yscale() == "log"
    assert to_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_epochs_figure_marks_zero_error_and_alpha_scaling():
    hist = []
    for e in range(0, 61):
        m = {"epoch": e, "train_acc": min(1.0, 0.5 + e / 40), "test_acc": 0.8,
             "train_loss": 1.0 / (1 + e), "phase": "train" if e <= 20 else "overtrain"}
        if e % 10 == 0 or e == 35:
            m.update(sharpness=5.0 if e == 35 else 0.1, log_prior=-50.0)
        if e == 35:
            m["alpha_scaled"] = True
        hist.append(m)
    fig = epochs_figure({"history": hist, "epochs_to_zero_error": 20})
    axes = fig.axes
    assert [a.get_ylabel() for a in axes] == ["error", "train loss", "sharpness", "log P(f)"]
    for ax in axes:
        vlines = {(ln.get_xdata()[0], ln.get_color(), ln.get_linestyle()) for ln in ax.lines
                  if len(set(ln.get_xdata())) == 1}
        assert (20, "grey", ":") in vlines and (35, "red", "--") in vlines
    sharp = axes[2].lines[0]
    assert list(sharp.get_xdata()) == [0, 10, 20, 30, 35, 40, 50, 60]
    assert max(sharp.get_ydata()) == 5.0
    assert to_png(fig)[:4] == b"\x89PNG"


def test_boolean_figure():
    t = pd.DataFrame({"function": ["a", "b", "c"], "sgd_count": [10, 5, 1],
                      "log_prior": [-5.0, -8.0, -20.0], "log_p_sampled": [-4.0, -7.0, np.nan],
                      "sharpness": [0.1, 0.2, 0.5], "spectral_norm": [1.0, 2.0, 3.0]})
    fig = boolean_figure(t)
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert len(axes) == 4
    assert {a.get_xlabel() for a in axes} == {"log P(f)", "log P(f) (sampled)"}
    xy, c = scatter_data(axes[0])
    assert np.allclose(xy[:, 0], [-5, -8, -20]) and np.allclose(c, np.log10([10, 5, 1]))
