"""CIFAR-10 from the official binary format (no pickle): automobile (0) vs cat (1).

Each record is 1 label byte followed by 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each
a 32x32 image in row-major order). Files: ``data_batch_1.bin`` … ``data_batch_5.bin`` and
``test_batch.bin``, usually in ``cifar-10-batches-bin/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flatprior.data._files import read_bytes
from flatprior.errors import FlatpriorError

RECORD = 1 + 3 * 32 * 32
AUTOMOBILE, CAT = 1, 3
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"


def parse_cifar_records(
    data: bytes, *, source: str = "CIFAR-10 data"
) -> tuple[np.ndarray, np.ndarray]:
    """Parse binary records into uint8 images ``[n, 3, 32, 32]`` and labels ``[n]``."""
    if len(data) == 0 or len(data) % RECORD:
        raise FlatpriorError(
            f"{source}: {len(data)} bytes is not a whole number of {RECORD}-byte CIFAR-10 "
            "records; the file is truncated or not CIFAR-10 binary"
        )
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    labels = rec[:, 0]
    if labels.max() > 9:
        raise FlatpriorError(f"{source}: label byte {int(labels.max())} out of range 0..9")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def _root(data_root: str | Path | None) -> Path:
    if data_root is None:
        data_root = os.environ.get("FLATPRIOR_DATA", "~/.cache/flatprior")
    root = Path(data_root).expanduser()
    for sub in ("cifar-10-batches-bin", "cifar10/cifar-10-batches-bin", "cifar10", ""):
        if (root / sub / TEST_FILE).is_file():
            return root / sub
    raise FlatpriorError(
        f"CIFAR-10 binary files not found under {root}: put cifar-10-batches-bin/ "
        f"({', '.join(TRAIN_FILES)}, {TEST_FILE}) there"
    )


def _binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    x, lab = parse_cifar_records(read_bytes(path), source=str(path))
    keep = (lab == AUTOMOBILE) | (lab == CAT)
    return (x[keep].astype(np.float32) / 255.0), (lab[keep] == CAT).astype(np.float32)


def load_cifar10_binary(data_root: str | Path | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Car/cat images ``[n, 3, 32, 32]`` float32 in [0, 1] and labels (cat = 1).

    For ``train`` (the data batches present) and ``test``; one set of constants for train and
    test: none.
    """
    root = _root(data_root)
    parts = [_binary(root / f) for f in TRAIN_FILES if (root / f).is_file()]
    test = _binary(root / TEST_FILE)
    if not parts:
        raise FlatpriorError(f"no CIFAR-10 training batches (data_batch_*.bin) in {root}")
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return {"train": train, "test": test}
