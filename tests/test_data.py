import gzip
import struct

import numpy as np
import pytest
import torch

from flatprior.data import make_task
from flatprior.data.boolean import boolean_inputs
from flatprior.data.cifar10 import RECORD
from flatprior.data.mnist import load_mnist_raw, parse_idx
from flatprior.data.tasks import split_pool
from flatprior.errors import FlatpriorError


def _disjoint(task):
    s, a, e = (set(map(int, i)) for i in (task.idx_train, task.idx_attack, task.idx_test))
    return not (s & a) and not (s & e) and not (a & e)


def test_digits_task_sizes_labels_and_disjoint():
    t = make_task("digits", 300, 100, 500, seed=3)
    assert t.sizes == {"n_train": 300, "n_attack": 100, "n_test": 500}
    assert t.x_train.dtype == torch.float32 and t.x_train.shape[1:] == (1, 8, 8)
    assert 0.0 <= float(t.x_train.min()) and float(t.x_train.max()) <= 1.0
    assert set(torch.unique(t.y_train).tolist()) == {0.0, 1.0}
    assert _disjoint(t)
    # attack labels are flipped: compare with the true digit labels of the pool
    from flatprior.data.digits import load_digits_binary

    _, y = load_digits_binary()
    assert np.array_equal(t.y_attack.numpy(), 1 - y[t.idx_attack])
    assert np.array_equal(t.y_train.numpy(), y[t.idx_train])


def test_same_seed_same_split_other_seed_other_split():
    a, b, c = (make_task("digits", 50, 10, 50, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.idx_train, b.idx_train)
    assert not np.array_equal(a.idx_train, c.idx_train)


def test_mnist_real_test_files(mnist_root):
    raw = load_mnist_raw(mnist_root)
    x, y = raw["test"]
    assert "train" not in raw
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    # the well-known class counts of the MNIST test set
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    t = make_task("mnist", 500, 100, 1000, seed=0, data_root=mnist_root)
    assert t.x_train.shape == (500, 1, 28, 28)
    assert float(t.x_train.max()) <= 1.0 and float(t.x_train.min()) >= 0.0
    assert _disjoint(t) and t.notes  # says S, A, E came from the test images
    assert int((y >= 5).sum()) == 4861


def test_mnist_missing_files_message_names_files(tmp_path):
    with pytest.raises(FlatpriorError, match="t10k-images-idx3-ubyte"):
        make_task("mnist", 10, 0, 10, data_root=tmp_path)


def _idx(arr: np.ndarray) -> bytes:
    return (
        struct.pack(">HBB", 0, 8, arr.ndim)
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.tobytes()
    )


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "too short"),
        (b"\x00\x00\x09\x03" + b"\x00" * 20, "wrong magic"),
        (_idx(np.zeros((3, 28, 28), np.uint8))[:-5], "truncated"),
        (struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 2**31, 2**31, 2**31), "truncated"),
    ],
)
def test_idx_parser_rejects_bad_bytes(data, match):
    with pytest.raises(FlatpriorError, match=match):
        parse_idx(data)


def _write_mnist(root, n=40, label_max=9, truncate=False):
    rng = np.random.default_rng(0)
    (root / "mnist").mkdir()
    img = _idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    lab = _idx((np.arange(n) % (label_max + 1)).astype(np.uint8))
    with gzip.open(root / "mnist" / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(img[:-10] if truncate else img)
    (root / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(lab)  # raw (not gz) works too


def test_mnist_reads_raw_and_gz_and_rejects_truncated(tmp_path):
    _write_mnist(tmp_path)
    t = make_task("mnist", 10, 5, 20, data_root=tmp_path)
    assert t.sizes["n_test"] == 20
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_mnist(bad, truncate=True)
    with pytest.raises(FlatpriorError, match="truncated or corrupted"):
        make_task("mnist", 10, 5, 20, data_root=bad)


def test_mnist_label_out_of_range(tmp_path):
    _write_mnist(tmp_path, label_max=11)
    with pytest.raises(FlatpriorError, match="out of range"):
        make_task("mnist", 10, 0, 10, data_root=tmp_path)


def _write_cifar(path, labels, rng):
    recs = [bytes([lab]) + rng.integers(0, 256, 3072, dtype=np.uint8).tobytes() for lab in labels]
    path.write_bytes(b"".join(recs))


def test_cifar_binary_car_vs_cat(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    _write_cifar(d / "data_batch_1.bin", [1, 3, 0, 5, 1, 3, 3, 1, 9, 1] * 3, rng)
    _write_cifar(d / "test_batch.bin", [1, 3, 2, 3, 1, 3] * 2, rng)
    t = make_task("cifar10", 10, 4, 5, seed=0, data_root=tmp_path)
    assert t.x_train.shape == (10, 3, 32, 32)
    # 21 of the 30 train records are cars/cats
    assert t.sizes == {"n_train": 10, "n_attack": 4, "n_test": 5}
    raw = (d / "data_batch_1.bin").read_bytes()
    first_car = np.frombuffer(raw[1:RECORD], np.uint8).reshape(3, 32, 32) / 255.0
    from flatprior.data.cifar10 import load_cifar10_binary

    x, y = load_cifar10_binary(tmp_path)["train"]
    assert np.allclose(x[0], first_car) and y[0] == 0 and y[1] == 1
    with pytest.raises(FlatpriorError, match="largest possible n_attack is 4"):
        make_task("cifar10", 17, 5, 1, data_root=tmp_path)
    (d / "test_batch.bin").write_bytes(raw[:-7])
    with pytest.raises(FlatpriorError, match="whole number"):
        make_task("cifar10", 10, 4, 5, data_root=tmp_path)


def test_boolean_inputs_and_targets():
    x = boolean_inputs()
    assert x.shape == (128, 7) and len({tuple(r) for r in x.tolist()}) == 128
    assert x[1].tolist() == [0, 0, 0, 0, 0, 0, 1]
    bits = "01" * 64
    t = make_task("boolean", 64, 0, None, seed=0, target=bits)
    assert t.sizes["n_train"] + t.sizes["n_test"] == 128
    expected = np.array([int(b) for b in bits], np.float32)
    assert np.array_equal(t.y_train.numpy(), expected[t.idx_train])
    t2 = make_task("boolean", 32, 0, None, target=lambda x: x[:, 0])
    assert np.array_equal(t2.y_test.numpy(), x[t2.idx_test, 0])
    with pytest.raises(FlatpriorError, match="128 characters"):
        make_task("boolean", 10, target="0101")


@pytest.mark.parametrize(
    "args, match",
    [
        (("imagenet", 10, 0, 10), "unknown dataset 'imagenet'.*digits"),
        (("digits", -1, 0, 10), "n_train must be >= 0"),
        (("digits", 10, -5, 10), "n_attack must be >= 0"),
        (("digits", 1000, 500, 500), "largest possible n_attack is 297"),
        (("digits", 1500, 0, 500), "only 1797 examples"),
        (("digits", 0, 0, 10), "n_train must be >= 1"),
        (("digits", 2.5, 0, 10), "whole number"),
    ],
)
def test_bad_task_arguments(args, match):
    with pytest.raises(FlatpriorError, match=match):
        make_task(*args)


def test_nan_inputs_rejected():
    x = np.random.default_rng(0).random((20, 3)).astype(np.float32)
    x[4, 1] = np.nan
    with pytest.raises(FlatpriorError, match="NaN/inf"):
        split_pool(x, np.zeros(20, np.float32), 5, 0, 5, 0, dataset="mine")


def test_task_from_arrays_own_data():
    from flatprior.data import task_from_arrays

    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3))
    y = (x[:, 0] > 0).astype(int)
    t = task_from_arrays(x, y, 40, 10, 30, seed=1)
    assert t.sizes == {"n_train": 40, "n_attack": 10, "n_test": 30} and _disjoint(t)
    assert t.x_train.dtype == torch.float32
    assert np.array_equal(t.y_attack.numpy(), 1 - y[t.idx_attack])
    with pytest.raises(FlatpriorError, match="labels must be 0 or 1"):
        task_from_arrays(x, y + 1, 10)
    with pytest.raises(FlatpriorError, match="shapes"):
        task_from_arrays(x, y[:50], 10)


def test_example_own_data_and_model_runs_end_to_end():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "own_data_and_model.py"
    spec = importlib.util.spec_from_file_location("own_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main()
    assert [r["n_attack"] for r in rows] == [0, 100, 200]
    assert rows[0]["status"] == "zero_error"
    for r in rows:
        assert r["log_prior"] < 0 and r["sharpness"] > 0 and r["spectral_norm"] > 0
