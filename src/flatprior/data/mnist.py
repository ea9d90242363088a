"""MNIST from the standard IDX files (raw or gzipped), with md5-verified download.

IDX format (LeCun et al.): a 4-byte big-endian magic ``0x00 0x00 <type> <ndim>`` (type 0x08 =
unsigned byte), then ``ndim`` big-endian uint32 dimensions, then the data in C order.
"""

from __future__ import annotations

import math
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np

from flatprior.data._files import fetch_verified, read_bytes
from flatprior.errors import FlatpriorError

FILES = {
    "train-images": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test-images": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
    "test-labels": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
SUBDIRS = ("", "mnist", "MNIST", "MNIST/raw", "mnist/raw")


def parse_idx(data: bytes, *, source: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes into a uint8 array; raise FlatpriorError on any inconsistency.

    The header's dimensions are checked against the actual payload length before anything is
    allocated, so a forged header cannot request unbounded memory.
    """
    if len(data) < 4:
        raise FlatpriorError(f"{source}: file is {len(data)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise FlatpriorError(
            f"{source}: wrong magic {data[:4].hex()} (expected 000008 + ndim 1..4 for unsigned "
            "bytes); is this an MNIST IDX file?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FlatpriorError(f"{source}: truncated header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)  # Python ints: a forged header cannot overflow
    if expected == 0:
        # also stops shapes like (0, 2^32-1, 2^32-1) that numpy refuses ("array is too big")
        raise FlatpriorError(f"{source}: header says {dims}: the file holds no data; replace it")
    if expected != len(data) - header:
        raise FlatpriorError(
            f"{source}: header says {dims} = {expected} bytes of data but the file holds "
            f"{len(data) - header}; the file is truncated or corrupted, replace it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for sub in SUBDIRS:
        for name in (stem + ".gz", stem):
            p = root / sub / name
            if p.is_file():
                return p
    return None


def download_mnist(
    root: Path, parts=("train", "test"), mirrors: tuple[str, ...] | None = None
) -> list[Path]:
    """Download the standard gzipped IDX files into ``root`` and verify each md5.

    Written to a temporary file first and renamed only after the checksum matched. Files
    already under ``root`` are kept.

    Args:
        root: the data folder (created if missing).
        parts: ``"train"`` and/or ``"test"`` (the ``t10k`` files).
        mirrors: base URLs tried in order (default: ``$FLATPRIOR_MNIST_MIRROR`` if set, else
            :data:`MIRRORS`); each file is fetched as ``mirror + name + ".gz"``.

    Returns:
        The files downloaded now.
    """
    if mirrors is None:
        env = os.environ.get("FLATPRIOR_MNIST_MIRROR")
        mirrors = (env,) if env else MIRRORS
    mirrors = tuple(m if m.endswith("/") else m + "/" for m in mirrors)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlatpriorError(
            f"cannot create {root} ({exc.strerror}); choose another folder"
        ) from None
    fetched: list[Path] = []
    for key, (stem, md5) in FILES.items():
        if key.split("-")[0] not in parts or _find(root, stem):
            continue
        try:
            fetch_verified([m + stem + ".gz" for m in mirrors], root / (stem + ".gz"), md5)
        except OSError as exc:
            raise FlatpriorError(
                f"could not download {stem}.gz ({exc}); put the MNIST IDX files in {root}"
            ) from None
        fetched.append(root / (stem + ".gz"))
    return fetched


def _load_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x = parse_idx(read_bytes(images), source=str(images))
    y = parse_idx(read_bytes(labels), source=str(labels))
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise FlatpriorError(f"{images}: expected images of shape [n, 28, 28], got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise FlatpriorError(
            f"{labels}: {y.shape} labels for {len(x)} images; the two files do not belong together"
        )
    if y.max(initial=0) > 9:
        raise FlatpriorError(f"{labels}: label {int(y.max())} out of range 0..9; file corrupted")
    return x, y


@lru_cache(maxsize=4)
def _load_pair_cached(images: str, _mtime_i: int, labels: str, _mtime_l: int):
    """Parsed files, cached per process (a sweep re-reads them for every run otherwise).

    The modification times are part of the key so a replaced file is read again.
    """
    x, y = _load_pair(Path(images), Path(labels))
    x.flags.writeable = False  # shared between calls: nobody may modify it in place
    y.flags.writeable = False
    return x, y


def load_mnist_raw(
    data_root: str | Path | None, *, download: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Uint8 images ``[n, 28, 28]`` and digit labels for each split whose files are present."""
    if data_root is None:
        data_root = os.environ.get("FLATPRIOR_DATA", "~/.cache/flatprior")
    root = Path(data_root).expanduser()
    if download:
        download_mnist(root)
    out = {}
    for split in ("train", "test"):
        img = _find(root, FILES[f"{split}-images"][0])
        lab = _find(root, FILES[f"{split}-labels"][0])
        if img and lab:
            out[split] = _load_pair_cached(str(img), img.stat().st_mtime_ns, str(lab),
                                           lab.stat().st_mtime_ns)
    if "test" not in out:
        names = ", ".join(stem + "[.gz]" for stem, _ in FILES.values())
        raise FlatpriorError(
            f"MNIST files not found under {root}: put {names} there (the two t10k files suffice), "
            f"or run `flatprior download mnist --data-root {root}` where the network is available"
        )
    return out


def load_mnist_binary(
    data_root: str | Path | None, *, download: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images ``[n, 1, 28, 28]`` float32 in [0, 1] and labels 1 iff digit >= 5, per split."""
    return {
        split: ((x.astype(np.float32) / 255.0)[:, None], (y >= 5).astype(np.float32))
        for split, (x, y) in load_mnist_raw(data_root, download=download).items()
    }
