"""Binary tasks with an attack set: S (clean), A (flipped labels), E (test), all disjoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flatprior.errors import FlatpriorError, check_choice, check_finite_tensor
from flatprior.names import DATASETS


@dataclass
class Task:
    """A train set S, an attack set A (labels flipped) and a test set E.

    Inputs are float32 tensors ``[n, *input_shape]``; labels are float32 tensors ``[n]`` in
    ``{0, 1}``. ``y_attack`` holds the *flipped* (wrong) labels the network is trained on;
    ``y_attack_true`` the correct ones. S, A and E never share an example (``idx_*`` are indices
    into the pool they were drawn from).
    """

    dataset: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_attack: torch.Tensor
    y_attack: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    seed: int
    idx_train: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))
    idx_attack: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))
    idx_test: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))
    notes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.x_train.shape[1:])

    @property
    def sizes(self) -> dict[str, int]:
        """``n_train``, ``n_attack``, ``n_test``: the sizes of S, A and E."""
        return {
            "n_train": len(self.y_train),
            "n_attack": len(self.y_attack),
            "n_test": len(self.y_test),
        }

    @property
    def y_attack_true(self) -> torch.Tensor:
        """The attack set's true labels (``y_attack`` holds the flipped ones)."""
        return 1.0 - self.y_attack


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FlatpriorError(f"{name} must be a whole number, got {value!r}")
    if value < 0:
        raise FlatpriorError(f"{name} must be >= 0, got {value}")
    return int(value)


def split_pool(
    x: np.ndarray,
    y: np.ndarray,
    n_train: int,
    n_attack: int,
    n_test: int | None,
    seed: int,
    *,
    dataset: str,
    x_test_pool: np.ndarray | None = None,
    y_test_pool: np.ndarray | None = None,
) -> Task:
    """Draw disjoint S, A, E from a labelled pool (seeded); flip the labels of A.

    The study adds the attack set to a fixed experiment: for one ``seed``, S and E are the same
    for every ``n_attack`` and the attack sets nest (A for |A| = 50 is the first 50 of A for
    |A| = 100). One permutation of the pool is drawn from ``seed`` and cut in order::

        one pool:            [ S (n_train) | E (n_test) | attack pool: A = its first n_attack ]
        separate test pool:  [ S (n_train) | attack pool ... ]   and E from a permutation of
                             the test pool (e.g. MNIST's official train/test split)

    ``n_test=None`` takes every test example of a separate test pool; with one pool it takes all
    that is left after S and A, so E then depends on ``n_attack`` (the task's ``notes`` say so):
    give ``n_test`` to keep E fixed.
    """
    n_train = _check_size("n_train", n_train)
    n_attack = _check_size("n_attack", n_attack)
    if n_test is not None:
        n_test = _check_size("n_test", n_test)
    if n_train == 0:
        raise FlatpriorError("n_train must be >= 1: a task needs a training set")
    seed = _check_size("seed", seed)  # numpy's SeedSequence wants a non-negative int
    rng = np.random.default_rng(seed)
    n_pool = len(x)
    sep_test = x_test_pool is not None
    fixed_test = 0 if sep_test or n_test is None else n_test
    if n_train + fixed_test > n_pool:
        what = "n_train" if sep_test or n_test is None else "n_train + n_test"
        raise FlatpriorError(
            f"{dataset}: {what} = {n_train + fixed_test} but only {n_pool} examples are "
            "available; ask for fewer examples"
        )
    attack_pool = n_pool - n_train - fixed_test
    if n_attack > attack_pool:
        raise FlatpriorError(
            f"{dataset}: n_attack = {n_attack} but the attack pool left after S"
            + ("" if sep_test or n_test is None else " and E")
            + f" holds {attack_pool} examples; the largest possible n_attack is {attack_pool}"
        )
    if sep_test:
        assert y_test_pool is not None
        if n_test is not None and n_test > len(x_test_pool):
            raise FlatpriorError(
                f"{dataset}: n_test = {n_test} but the test split has only "
                f"{len(x_test_pool)} examples; ask for fewer"
            )
    perm = rng.permutation(n_pool)
    idx_train = np.sort(perm[:n_train])
    notes = []
    if sep_test:
        idx_attack = np.sort(perm[n_train : n_train + n_attack])
        tperm = rng.permutation(len(x_test_pool))
        idx_test = np.sort(tperm[: (n_test if n_test is not None else len(x_test_pool))])
        xt, yt = x_test_pool[idx_test], y_test_pool[idx_test]
    elif n_test is not None:
        idx_test = np.sort(perm[n_train : n_train + n_test])
        idx_attack = np.sort(perm[n_train + n_test : n_train + n_test + n_attack])
        xt, yt = x[idx_test], y[idx_test]
    else:
        idx_attack = np.sort(perm[n_train : n_train + n_attack])
        idx_test = np.sort(perm[n_train + n_attack :])
        xt, yt = x[idx_test], y[idx_test]
        if n_attack:
            notes.append(
                "n_test = None with one pool: E is all that is left after S and A, so it changes "
                "with n_attack; give n_test to keep E fixed across attack sizes"
            )

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)

    task = Task(
        dataset=dataset,
        x_train=t(x[idx_train]),
        y_train=t(y[idx_train]),
        x_attack=t(x[idx_attack]),
        y_attack=t(1 - y[idx_attack]),
        x_test=t(xt),
        y_test=t(yt),
        seed=seed,
        idx_train=idx_train,
        idx_attack=idx_attack,
        idx_test=idx_test,
        notes=notes,
    )
    for name in ("x_train", "x_attack", "x_test"):
        check_finite_tensor(f"{dataset} inputs ({name})", getattr(task, name))
    return task


def task_from_arrays(
    x,
    y,
    n_train: int,
    n_attack: int = 0,
    n_test: int | None = None,
    seed: int = 0,
    *,
    name: str = "custom",
) -> Task:
    """A task from your own data: inputs ``x [N, ...]`` and binary labels ``y [N]`` in {0, 1}.

    S, A (labels flipped) and E are drawn disjointly from the N examples with ``seed``, exactly
    as for the built-in data sets. Accepts numpy arrays or torch tensors.
    """
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    y = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    if x.ndim < 2 or len(x) != len(y) or y.ndim != 1:
        raise FlatpriorError(
            f"{name}: need inputs [N, ...] and labels [N], got shapes {x.shape} and {y.shape}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise FlatpriorError(f"{name}: inputs must be numeric, got dtype {x.dtype}")
    if not np.isin(y, (0, 1)).all():
        raise FlatpriorError(f"{name}: labels must be 0 or 1; binarise them first")
    return split_pool(x.astype(np.float32), y.astype(np.float32), n_train, n_attack, n_test,
                      seed, dataset=name)


def make_task(
    dataset: str,
    n_train: int,
    n_attack: int = 0,
    n_test: int | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
    *,
    target: str | object | None = None,
    download: bool = False,
    data_path: str | Path | None = None,
    label_column: str = "label",
) -> Task:
    """Build a binary task: train set S, attack set A (labels flipped), test set E.

    Args:
        dataset: one of ``boolean``, ``digits`` (embedded default, ships with scikit-learn),
            ``mnist``, ``cifar10``.
        n_train: |S|.
        n_attack: |A|.
        n_test: |E| (``None``: everything left).
        seed: draws the split (and nothing else).
        data_root: folder holding the MNIST IDX / CIFAR-10 binary files.
        target: ``boolean`` only — the target function as a 128-character 0/1 string (bit i is
            f(input i)) or a callable on the ``[128, 7]`` input array; default: majority of the
            7 bits. Input order: see
            :func:`flatprior.data.boolean.boolean_inputs`.
        download: MNIST only — fetch missing files (md5-verified) when the network allows.
        data_path: ``file`` only — your ``.npz`` / ``.csv`` file (:mod:`flatprior.data.files`).
        label_column: ``file`` only — the CSV's
            label column (:mod:`flatprior.data.files`).

    Labels: digits/MNIST 1 iff digit >= 5; CIFAR-10 cat = 1, automobile = 0.
    """
    check_choice("dataset", dataset, DATASETS)
    if dataset == "file":
        from flatprior.data.files import load_file_pool

        x, y = load_file_pool(data_path, label_column)
        return task_from_arrays(x, y, n_train, n_attack, n_test, seed, name="file")
    if dataset == "boolean":
        from flatprior.data.boolean import boolean_dataset

        x, y = boolean_dataset(target)
        return split_pool(x, y, n_train, n_attack, n_test, seed, dataset=dataset)
    if dataset == "digits":
        from flatprior.data.digits import load_digits_binary

        x, y = load_digits_binary()
        return split_pool(x, y, n_train, n_attack, n_test, seed, dataset=dataset)
    if dataset == "mnist":
        from flatprior.data.mnist import load_mnist_binary

        splits = load_mnist_binary(data_root, download=download)
        if "train" in splits:
            (x, y), (xt, yt) = splits["train"], splits["test"]
            return split_pool(
                x,
                y,
                n_train,
                n_attack,
                n_test,
                seed,
                dataset=dataset,
                x_test_pool=xt,
                y_test_pool=yt,
            )
        x, y = splits["test"]
        task = split_pool(x, y, n_train, n_attack, n_test, seed, dataset=dataset)
        task.notes.append(
            "MNIST training files absent: S, A and E were all drawn from the 10 000 test images"
        )
        return task
    from flatprior.data.cifar10 import load_cifar10_binary

    splits = load_cifar10_binary(data_root)
    (x, y), (xt, yt) = splits["train"], splits["test"]
    return split_pool(
        x, y, n_train, n_attack, n_test, seed, dataset=dataset, x_test_pool=xt, y_test_pool=yt
    )
