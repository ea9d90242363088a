import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import _fake_runs
from flatprior.analysis.report import write_report
from flatprior.experiments.runner import run_sweep
from flatprior.experiments.specs import resolve
from flatprior.experiments.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


def epochs_run(cfg):
    rec = _fake_runs.fake_record(cfg)
    hist = []
    for e in range(0, 41):
        m = {"epoch": e, "train_acc": min(1.0, 0.6 + e / 25), "test_acc": 0.9,
             "train_loss": 1 / (1 + e)}
        if e % 5 == 0 or e == 27:
            m.update(sharpness=4.0 if e == 27 else 0.2, log_prior=-60.0)
        if e == 27:
            m["alpha_scaled"] = True
        hist.append(m)
    rec.update(history=hist, epochs_to_zero_error=16)
    return rec


def boolean_run(cfg):
    rec = _fake_runs.fake_record(cfg)
    k = cfg["seed"] % 4  # 4 functions, found 8, 4, 4, 4 times... by seed
    k = 0 if cfg["seed"] % 3 == 0 else k
    rec["function"] = format(k, "b").zfill(7) * 18 + "01"  # 128 characters
    rec["log_prior"] = -20.0 - 5 * k
    rec["sharpness"] = 0.1 * (1 + k)
    rec["spectral_norm"] = 1.0 + k
    return rec


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("rep") / "r.db"
    with Store(path) as st:
        r = resolve("fig4", "quick", None, {"n_attack": [0, 50, 100, 150], "seed": [0, 1]})
        run_sweep(r.configs, st, r.label, info=r.info(), run_fn=_fake_runs.flaky_run, workers=1,
                  progress=False)
        r = resolve("fig5", "quick", None, {"alpha": 5.0})  # one run: one set of curves
        run_sweep(r.configs, st, r.label, info=r.info(), run_fn=epochs_run, workers=1,
                  progress=False)
        r = resolve("fig2-boolean", "quick", None, {"seed": {"__sweep__": list(range(24))}})
        run_sweep(r.configs, st, r.label, info=r.info(), run_fn=boolean_run, workers=1,
                  progress=False)
    return path


@pytest.fixture(scope="module")
def report(db):
    # no sampled prior (the fig2 quick preset would draw 200 000 networks; test_psgd_report
    # covers that)
    out, sections = write_report(db, db.parent / "report.html", n_boot=200, boolean_samples=0)
    return out, out.read_text(), sections


def test_report_content(report, db):
    out, page, sections = report
    assert [s.label for s in sections] == ["fig4@quick", "fig5@quick",
                                                 "fig2-boolean/sampleable@quick"]
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    # fig4 sweeps optimizer x |A|: its Psi figure is the 4th image
    assert len(imgs) == 4 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page)  # self-contained
    # correlation table of fig4: per optimizer, numbers equal to the analysis
    att = sections[0].correlations
    assert set(att["optimizer"]) == {"sgd", "adam", "entropy-sgd"}
    assert set(att["n"]) == {4}  # odd seeds failed in flaky_run
    # granulated Kendall over the two swept axes beside the pooled tau
    gr = sections[0].granulated
    assert {"tau_optimizer", "tau_n_attack"} <= set(gr.columns) and set(gr["n"]) == {12}
    assert set(sections[0].pooled["n"]) == {12}
    assert "Granulated Kendall Ψ beside the pooled τ" in page
    assert sections[1].granulated.empty and sections[2].granulated.empty
    # the config of every run, the failures with their error text, the versions
    with Store(db, readonly=True) as st:
        for rec in st.records():
            assert rec["key"] in page
    assert "synthetic failure for seed 1" in page and "Failed runs" in page
    assert "Versions" in page and "&quot;flatprior&quot;: &quot;test&quot;" in page
    # boolean section: per-function table and flatness-vs-prior correlations
    bt = dict(sections[2].extra_tables)
    (table,) = [t for cap, t in bt.items() if "found most often" in cap]
    assert table["sgd_count"].tolist() == [12, 4, 4, 4]
    bc = sections[2].correlations
    k = bc[(bc.measure == "sharpness") & (bc.method == "kendall")]["estimate"].item()
    assert k == pytest.approx(-1.0)
    assert np.isfinite(att["estimate"]).any()
    # per-epoch section: the key moments around the alpha-scaling, no correlation table
    assert sections[1].correlations.empty
    (summary,) = dict(sections[1].extra_tables).values()
    assert summary["epoch"].tolist() == [20, 25, 27, 30, 40]
    assert "measures around zero error and the α-scaling" in page


def call_main(args, cli):
    r = cli(*args)
    return r.returncode, r.stdout, r.stderr


def test_report_cli_and_errors(db, tmp_path, cli):
    out = tmp_path / "cli.html"
    code, so, se = call_main(["report", str(db), "--out", str(out), "--n-boot", "50",
                              "--export", str(tmp_path / "runs.csv")], cli)
    assert code == 0, se
    assert "correlation with generalization" in so and out.stat().st_size > 10_000
    import pandas as pd

    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == 24 + 1 + 24 and runs["key"].is_unique
    for args, match in [([str(tmp_path / "none.db")], "no results database"),
                        ([str(db), "--out", str(tmp_path / "no" / "x.html")], "folder")]:
        code, _, se = call_main(["report", *args], cli)
        lines = [ln for ln in se.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and match in lines[0], se


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed "
                    "(apt-get install -y chromium) - cannot check the page renders")
def test_report_renders_in_headless_chromium(report, tmp_path):
    out, _, _ = report
    flags = [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    p = subprocess.run([CHROMIUM, *flags, "--dump-dom", out.as_uri()], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    dom = p.stdout
    assert "fig4@quick: Attack-set sweep with Adam and Entropy-SGD" in dom
    assert dom.count("<img") == 4 and "<table" in dom and "kendall" in dom
    shot = tmp_path / "shot.png"
    p = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600",
                        out.as_uri()], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and shot.exists(), p.stderr[-2000:]
    from matplotlib.image import imread

    px = imread(shot)[..., :3]
    assert px.shape[:2] == (1600, 1200)
    # the figures are drawn: many distinct colours (a page of text alone has few)
    colours = np.unique((px.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 200
    assert Path(shot).stat().st_size > 20_000


def test_execution_note_counts_the_paths_and_warns_when_mixed():
    import pandas as pd

    from flatprior.analysis.report import execution_note

    df = pd.DataFrame({"status": ["zero_error", "did_not_reach_zero_error", "zero_error",
                                  "zero_error", "failed"],
                       "executed_as": ["ensemble", "ensemble", "single", None, None]})
    note = execution_note(df)
    assert note.startswith("Finished runs executed: 2 as ensemble members (--ensemble auto), "
                           "1 one per run, 1 not recorded")
    assert "Both paths in one store" in note
    only = execution_note(pd.DataFrame({"status": ["zero_error"], "executed_as": ["single"]}))
    assert only == "Finished runs executed: 1 one per run."
    # records stored before the field existed
    old = execution_note(pd.DataFrame({"status": ["zero_error"]}))
    assert old == "Finished runs executed: 1 not recorded (stored before December 2026)."
