"""Bounded, validated reading of binary data files (no pickle, no unbounded allocation)."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

from flatprior.errors import FlatpriorError

MAX_DECOMPRESSED = 1 << 30  # 1 GiB: far above any real file we read, stops a gzip bomb


def read_bytes(path: Path, *, limit: int = MAX_DECOMPRESSED) -> bytes:
    """Read a raw or ``.gz`` file, refusing more than ``limit`` bytes after decompression."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read(limit + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib: corrupt deflate
        raise FlatpriorError(
            f"cannot read {path}: {exc.__class__.__name__}: {exc}; the file is corrupted or "
            "truncated, replace it"
        ) from None
    if len(data) > limit:
        raise FlatpriorError(f"{path} decompresses to more than {limit} bytes; not a data file")
    return data


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
