"""``flatprior download cifar10``: the official binary archive from a mirror, md5-checked,
extracting exactly the six batch files (a local HTTP server stands in for the mirror)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from flatprior.data import cifar10
from flatprior.data._files import md5sum
from flatprior.errors import FlatpriorError

NAMES = (*cifar10.TRAIN_FILES, cifar10.TEST_FILE)


def _records(n: int, seed: int) -> bytes:
    """``n`` CIFAR-10 binary records with labels 1 (automobile) and 3 (cat) alternating."""
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, 256, (n, cifar10.RECORD), dtype=np.uint8)
    rec[:, 0] = np.where(np.arange(n) % 2, 3, 1)
    return rec.tobytes()


def _archive(path, *, extra: bool = True) -> None:
    """A cifar-10-binary.tar.gz with the six batches, plus hostile members unless not ``extra``."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data, kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = len(data), kind, link
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for i, name in enumerate(NAMES):
            add(f"{cifar10.FOLDER}/{name}", _records(6, i))
        if extra:  # nothing of these may reach the disk
            add("../escaped.bin", b"x" * 10)
            add("/tmp/absolute.bin", b"x" * 10)
            add(f"{cifar10.FOLDER}/batches.meta.txt", b"airplane\n")
            add(f"{cifar10.FOLDER}/link.bin", b"", tarfile.SYMTYPE, "/etc/passwd")


def test_download_extracts_exactly_the_six_batches_and_they_load(http_root, tmp_path,
                                                                  monkeypatch):
    www, url = http_root
    _archive(www / cifar10.ARCHIVE)
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5sum(www / cifar10.ARCHIVE))
    dest = tmp_path / "data"
    got = cifar10.download_cifar10(dest, mirrors=(url + "missing/", url))  # first mirror 404s
    assert got == [dest / cifar10.FOLDER / n for n in NAMES]
    assert sorted(p.name for p in (dest / cifar10.FOLDER).iterdir()) == sorted(NAMES)
    assert sorted(p.name for p in dest.iterdir()) == [cifar10.FOLDER]  # archive and .part gone
    assert not (tmp_path / "escaped.bin").exists()
    for i, n in enumerate(NAMES):
        assert (dest / cifar10.FOLDER / n).read_bytes() == _records(6, i)
    splits = cifar10.load_cifar10_binary(dest)
    assert splits["train"][0].shape == (30, 3, 32, 32) and splits["test"][0].shape == (6, 3, 32, 32)
    assert splits["train"][1].tolist() == [0.0, 1.0] * 15  # automobile 0, cat 1
    # again: every file present, nothing fetched (the mirror has nothing now)
    (www / cifar10.ARCHIVE).unlink()
    assert cifar10.download_cifar10(dest, mirrors=(url,)) == []


def test_download_refuses_an_archive_with_the_wrong_md5(http_root, tmp_path):
    www, url = http_root
    _archive(www / cifar10.ARCHIVE, extra=False)  # not the official bytes
    dest = tmp_path / "data"
    with pytest.raises(FlatpriorError) as info:
        cifar10.download_cifar10(dest, mirrors=(url,))
    msg = str(info.value)
    assert "\n" not in msg and f"md5 mismatch for {cifar10.ARCHIVE}" in msg
    assert cifar10.ARCHIVE_MD5 == "c32a1d4ab5d03f1284b67883e8d87530"  # the authors' published md5
    assert list((dest / cifar10.FOLDER).iterdir()) == [] and not (dest / cifar10.ARCHIVE).exists()


def test_an_archive_without_the_batches_is_refused_and_removed(http_root, tmp_path, monkeypatch):
    www, url = http_root
    with tarfile.open(www / cifar10.ARCHIVE, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")  # the pickled version
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5sum(www / cifar10.ARCHIVE))
    with pytest.raises(FlatpriorError, match="is it the CIFAR-10 binary version"):
        cifar10.download_cifar10(tmp_path, mirrors=(url,))
    assert not (tmp_path / cifar10.ARCHIVE).exists()


def test_cli_download_cifar10_and_the_missing_files_message(cli, http_root, tmp_path,
                                                            monkeypatch):
    dest = tmp_path / "data"
    with pytest.raises(FlatpriorError) as info:
        cifar10.load_cifar10_binary(dest)
    assert f"flatprior download cifar10 --data-root {dest}" in str(info.value)
    www, url = http_root
    _archive(www / cifar10.ARCHIVE)
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5sum(www / cifar10.ARCHIVE))
    r = cli("download", "cifar10", "--data-root", dest, "--mirror", url)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stderr.split())
    assert f"extracted {dest / cifar10.FOLDER / 'test_batch.bin'} from the md5-checked" in text
    assert f"CIFAR-10 (binary version) ready in {dest}" in text
    r = cli("download", "cifar10", "--data-root", dest, "--mirror", url + "gone/")
    assert r.returncode == 0 and "already present" in r.stderr
    r = cli("download", "imagenet")
    assert r.returncode == 2 and "mnist" in r.stderr and "cifar10" in r.stderr
