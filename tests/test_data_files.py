"""dataset = "file": the user's .npz / .csv through make_task, specs and the CLI; bad files give
one line each."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from flatprior.data import make_task, task_from_arrays
from flatprior.data.digits import load_digits_binary
from flatprior.data.files import load_file_pool
from flatprior.errors import FlatpriorError
from flatprior.pipeline import make_config


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_binary()
    return x[:300].reshape(300, -1), y[:300]  # [N, 64] pixel features


def _csv(path, x, y, label="label", values=None):
    df = pd.DataFrame(x, columns=[f"px{i}" for i in range(x.shape[1])])
    df.insert(3, label, y if values is None else np.where(y == 1, values[1], values[0]))
    df.to_csv(path, index=False)
    return path


def test_npz_and_csv_give_the_same_split_as_task_from_arrays(digits, tmp_path):
    x, y = digits
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ref = task_from_arrays(x, y, 100, 20, 50, seed=3)
    a = make_task("file", 100, 20, 50, seed=3, data_path=tmp_path / "d.npz")
    # label column in the middle, named differently, labels -1/+1 -> 0/1
    b = make_task("file", 100, 20, 50, seed=3, label_column="digit_ge_5",
                  data_path=_csv(tmp_path / "d.csv", x, y, "digit_ge_5", values=(-1, 1)))
    for t in (a, b):
        assert t.dataset == "file"
        for f in ("x_train", "y_train", "x_attack", "y_attack", "x_test", "y_test"):
            assert torch.equal(getattr(t, f), getattr(ref, f)), f
    assert a.y_attack.tolist() == (1 - ref.y_attack_true).tolist()


def test_image_shaped_npz_keeps_its_shape(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "img.npz", x=x, y=(rng.random((40, 1)) > 0.5).astype(np.int64))
    t = make_task("file", 20, 0, 10, data_path=tmp_path / "img.npz")
    assert t.input_shape == (1, 8, 8) and set(t.y_train.tolist()) <= {0.0, 1.0}


def _bad_files(tmp, x, y):
    np.savez(tmp / "noy.npz", x=x)
    np.savez(tmp / "shape.npz", x=x, y=y[:-1])
    np.savez(tmp / "flat.npz", x=x[:, 0], y=y)
    xn = x.copy()
    xn[5, 2] = np.nan
    np.savez(tmp / "nan.npz", x=xn, y=y)
    np.savez(tmp / "one.npz", x=x, y=np.ones_like(y))
    np.savez(tmp / "three.npz", x=x, y=np.arange(len(y)) % 3)
    np.savez(tmp / "obj.npz", x=np.array([[1, "a"]] * len(y), dtype=object), y=y)
    (tmp / "junk.npz").write_bytes(b"not a zip file")
    _csv(tmp / "nolabel.csv", x, y, "target")
    df = pd.read_csv(_csv(tmp / "text.csv", x, y))
    df["px1"] = df["px1"].astype(object)
    df.loc[7, "px1"] = "dark"
    df.to_csv(tmp / "text.csv", index=False)
    df = pd.read_csv(_csv(tmp / "nancsv.csv", x, y))
    df.loc[4, "px0"] = np.nan
    df.to_csv(tmp / "nancsv.csv", index=False)
    (tmp / "d.txt").write_text("1,2\n")
    return {
        "noy.npz": "no array 'y'",
        "shape.npz": "need x [N, features...] and y [N]",
        "flat.npz": "need x [N, features...] and y [N]",
        "nan.npz": "x has 1 NaN/inf value(s) (first in example 5)",
        "one.npz": "one class",
        "three.npz": "3 label values",
        "obj.npz": "not a readable .npz",
        "junk.npz": "not a readable .npz",
        "nolabel.csv": "no label column 'label'",
        "text.csv": "column 'px1' is not numeric (row 9 holds 'dark')",
        "nancsv.csv": "x has 1 NaN/inf value(s) (first in example 4)",
        "d.txt": "use a .npz (arrays x, y) or a .csv file",
        "missing.csv": "does not exist",
    }


def test_bad_files_one_line_each(digits, tmp_path):
    x, y = digits
    for name, match in _bad_files(tmp_path, x[:30], y[:30]).items():
        with pytest.raises(FlatpriorError, match=re.escape(match)) as e:
            load_file_pool(tmp_path / name)
        assert "\n" not in str(e.value), name


def test_config_needs_data_path_with_file():
    with pytest.raises(FlatpriorError, match="dataset 'file' needs data_path"):
        make_config(dataset="file")
    with pytest.raises(FlatpriorError, match="only read with dataset='file'"):
        make_config(dataset="digits", data_path="x.csv")
    assert make_config(dataset="file", data_path="a.csv").key() != make_config(
        dataset="file", data_path="b.csv").key()


def test_csv_through_train_run_and_report(cli, digits, tmp_path):
    x, y = digits
    f = _csv(tmp_path / "mine.csv", x, y, "target")
    p = cli("train", "--data-path", f, "--label-column", "target", "--n-train", "60",
            "--n-test", "60", "--measures", "none", "--json")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["dataset"] == "file" and rec["config"]["data_path"] == str(f.resolve())
    assert rec["status"] == "zero_error" and rec["config"]["label_column"] == "target"
    db = tmp_path / "r.db"
    p = cli("run", "fig3", "mnist-fcn", "--data-path", f, "--label-column", "target",
            "--set", "n_attack=[0, 10, 20]", "--set", "seed=0", "--set", "n_train=60",
            "--set", "n_test=60", "--set", "measures=none", "--workers", "1", "--out", db,
            "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "3 runs, 0 already stored, 3 run now (0 failed)" in p.stderr
    p = cli("report", db, "--out", tmp_path / "rep.html", "--n-boot", "20", "--quiet")
    assert p.returncode == 0, p.stderr
    assert "mine.csv" in (tmp_path / "rep.html").read_text()
    # a bad file fails before any run, one line, exit 2
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\n1,0\n2,0\n")
    p = cli("run", "fig3", "mnist-fcn", "--data-path", bad, "--out", db, "--no-progress")
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "one class" in errors[0]
