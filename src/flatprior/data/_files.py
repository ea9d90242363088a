"""Bounded, validated reading of binary data files (no pickle, no unbounded allocation)."""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
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


def fetch_verified(urls: Sequence[str], dest: Path, md5: str) -> None:
    """Download the first of ``urls`` that answers into ``dest``, checked against ``md5``.

    Each try writes a temporary file beside ``dest`` and renames it only after the checksum
    matched, so ``dest`` is never half-written and a failed try leaves nothing behind.

    Raises:
        OSError: every URL failed (the last error; an md5 mismatch is one).
    """
    last_error: OSError = OSError(f"no URL to fetch {dest.name} from")
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
        os.close(fd)
        try:
            urllib.request.urlretrieve(url, tmp)  # noqa: S310 (the mirrors are https)
            got = md5sum(Path(tmp))
            if got != md5:
                raise OSError(f"md5 mismatch for {dest.name}: got {got}, expected {md5}")
            os.replace(tmp, dest)
            return
        except OSError as exc:
            last_error = exc
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise last_error
