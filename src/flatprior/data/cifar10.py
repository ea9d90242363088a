"""CIFAR-10 from the official binary format (no pickle): automobile (0) vs cat (1).

Each record is 1 label byte followed by 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each
a 32x32 image in row-major order). Files: ``data_batch_1.bin`` … ``data_batch_5.bin`` and
``test_batch.bin``, usually in ``cifar-10-batches-bin/``; :func:`download_cifar10` fetches the
official archive (``cifar-10-binary.tar.gz``, md5-checked) and extracts exactly these files.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np

from flatprior.data._files import fetch_verified, read_bytes
from flatprior.errors import FlatpriorError

RECORD = 1 + 3 * 32 * 32
AUTOMOBILE, CAT = 1, 3
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
FOLDER = "cifar-10-batches-bin"
#: the binary version on the authors' page (https://www.cs.toronto.edu/~kriz/cifar.html)
ARCHIVE, ARCHIVE_MD5 = "cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"
MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)


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
        f"({', '.join(TRAIN_FILES)}, {TEST_FILE}) there, or run `flatprior download cifar10 "
        f"--data-root {root}` where the network is available"
    )


def download_cifar10(root: Path, mirrors: tuple[str, ...] | None = None) -> list[Path]:
    """Download the official binary archive into ``root`` and extract the six batch files.

    The archive (162 MB) is checked against :data:`ARCHIVE_MD5`, then only the members
    ``cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin`` are read from it (regular files,
    whole CIFAR-10 records) and written to ``root/cifar-10-batches-bin/``, each through a
    temporary file: no other member, link or path of the archive reaches the disk. The
    archive is removed afterwards; files already there are kept.

    Args:
        root: the data folder (created if missing).
        mirrors: base URLs tried in order (default: ``$FLATPRIOR_CIFAR10_MIRROR`` if set, else
            :data:`MIRRORS`); the archive is fetched as ``mirror + "cifar-10-binary.tar.gz"``.

    Returns:
        The batch files written now.
    """
    if mirrors is None:
        env = os.environ.get("FLATPRIOR_CIFAR10_MIRROR")
        mirrors = (env,) if env else MIRRORS
    mirrors = tuple(m if m.endswith("/") else m + "/" for m in mirrors)
    dest = root / FOLDER
    todo = [f for f in (*TRAIN_FILES, TEST_FILE) if not (dest / f).is_file()]
    if not todo:
        return []
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlatpriorError(f"cannot create {dest} ({exc.strerror}); choose another folder"
                             ) from None
    archive = root / ARCHIVE
    try:
        fetch_verified([m + ARCHIVE for m in mirrors], archive, ARCHIVE_MD5)
    except OSError as exc:
        raise FlatpriorError(f"could not download {ARCHIVE} ({exc}); put the CIFAR-10 binary "
                             f"files in {dest}") from None
    try:
        return _extract(archive, todo, dest)
    finally:
        archive.unlink(missing_ok=True)


def _extract(archive: Path, names: list[str], dest: Path) -> list[Path]:
    """Write the archive's ``cifar-10-batches-bin/<name>`` files to ``dest`` (checked records)."""
    written = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name in names:
                member = tar.getmember(f"{FOLDER}/{name}")
                fh = tar.extractfile(member) if member.isfile() else None
                if fh is None:
                    raise KeyError(name)
                data = fh.read()
                # whole records with labels 0..9, before anything is written
                parse_cifar_records(data, source=f"{ARCHIVE}:{FOLDER}/{name}")
                written.append(_write_atomically(dest / name, data))
    except KeyError as exc:
        raise FlatpriorError(f"{ARCHIVE} has no regular file {FOLDER}/{exc.args[0]}; is it the "
                             "CIFAR-10 binary version?") from None
    except (OSError, EOFError, tarfile.TarError, zlib.error) as exc:
        raise FlatpriorError(f"cannot read {archive} ({exc}); delete it and download again"
                             ) from None
    return written


def _write_atomically(path: Path, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
