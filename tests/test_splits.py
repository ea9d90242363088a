"""S and E are fixed across attack sizes, attack sets nest, all drawn disjointly — every source.

The study adds an attack set A to a fixed experiment (S, E): for one data seed S and E must be
byte-identical for every |A|, A for a smaller |A| a subset of A for a larger one, and A drawn from
a pool disjoint from S and E. Checked for digits, MNIST (t10k files only, and with train files),
CIFAR-10, ``task_from_arrays`` and the Boolean cube.
"""

import gzip
import struct

import numpy as np
import pytest

from flatprior.data import make_task, task_from_arrays
from flatprior.errors import FlatpriorError

ATTACKS = (0, 5, 20, 40)


def _check_nested(tasks):
    """``tasks`` ordered by increasing |A|, same seed."""
    base = tasks[0]
    prev_attack: set[int] = set()
    for t in tasks:
        assert t.x_train.numpy().tobytes() == base.x_train.numpy().tobytes()
        assert t.y_train.numpy().tobytes() == base.y_train.numpy().tobytes()
        assert t.x_test.numpy().tobytes() == base.x_test.numpy().tobytes()
        assert t.y_test.numpy().tobytes() == base.y_test.numpy().tobytes()
        assert np.array_equal(t.idx_train, base.idx_train)
        assert np.array_equal(t.idx_test, base.idx_test)
        attack = set(map(int, t.idx_attack))
        assert prev_attack <= attack, "attack sets must nest"
        prev_attack = attack
        assert not attack & set(map(int, t.idx_train))
        if not t.dataset.endswith("sep"):  # separate test pool: indices live in another pool
            assert not attack & set(map(int, t.idx_test))
        # A's labels are the flipped true labels
        assert len(t.y_attack) == len(t.idx_attack)


def test_digits_fixed_s_e_nested_a():
    _check_nested([make_task("digits", 100, n, 200, seed=4) for n in ATTACKS])
    # other seed, other split
    assert not np.array_equal(make_task("digits", 100, 0, 200, seed=5).idx_train,
                              make_task("digits", 100, 0, 200, seed=4).idx_train)


def test_digits_attack_zero_split_unchanged_by_the_attack_rule():
    """|A| = 0 draws S then E from the front of the seed's permutation (as before the fix)."""
    t = make_task("digits", 100, 0, 200, seed=4)
    perm = np.random.default_rng(4).permutation(1797)
    assert np.array_equal(t.idx_train, np.sort(perm[:100]))
    assert np.array_equal(t.idx_test, np.sort(perm[100:300]))
    t40 = make_task("digits", 100, 40, 200, seed=4)
    assert np.array_equal(t40.idx_attack, np.sort(perm[300:340]))


def test_mnist_t10k_only_fixed_s_e_nested_a(mnist_root):
    tasks = [make_task("mnist", 200, n, 300, seed=0, data_root=mnist_root) for n in ATTACKS]
    _check_nested(tasks)
    assert tasks[-1].notes  # says S, A and E came from the test images


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_with_train_files_fixed_s_e_nested_a(tmp_path):
    rng = np.random.default_rng(0)
    for stem, n in (("train", 300), ("t10k", 120)):
        _write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    tasks = [make_task("mnist", 100, n, 100, seed=2, data_root=tmp_path) for n in ATTACKS]
    for t in tasks:
        t.dataset = "mnist-sep"
    _check_nested(tasks)
    with pytest.raises(FlatpriorError, match="largest possible n_attack is 200"):
        make_task("mnist", 100, 201, 100, seed=2, data_root=tmp_path)


def test_cifar_fixed_s_e_nested_a(tmp_path):
    from flatprior.data.cifar10 import RECORD

    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    for name, n in (("data_batch_1.bin", 200), ("test_batch.bin", 60)):
        labels = rng.choice([1, 3, 0], size=n)
        recs = [bytes([int(lab)]) + rng.integers(0, 256, RECORD - 1, dtype=np.uint8).tobytes()
                for lab in labels]
        (d / name).write_bytes(b"".join(recs))
    tasks = [make_task("cifar10", 50, n, 30, seed=3, data_root=tmp_path) for n in ATTACKS]
    for t in tasks:
        t.dataset = "cifar-sep"
    _check_nested(tasks)


def test_task_from_arrays_fixed_s_e_nested_a():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = (x[:, 0] > 0).astype(int)
    _check_nested([task_from_arrays(x, y, 60, n, 100, seed=7) for n in ATTACKS])
    with pytest.raises(FlatpriorError, match="largest possible n_attack is 140"):
        task_from_arrays(x, y, 60, 141, 100, seed=7)


def test_boolean_fixed_s_e_nested_a():
    tasks = [make_task("boolean", 32, n, 64, seed=0) for n in (0, 8, 16, 32)]
    _check_nested(tasks)
    with pytest.raises(FlatpriorError, match="largest possible n_attack is 32"):
        make_task("boolean", 32, 33, 64, seed=0)


def test_n_test_none_with_one_pool_says_e_moves():
    t = make_task("boolean", 32, 8, None, seed=0)
    assert len(t.idx_test) == 128 - 40
    assert any("n_test" in n for n in t.notes)
