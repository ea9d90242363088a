"""No code execution from files, no writes outside the output folder, atomic checkpoints.

* A malicious pickle (its ``__reduce__`` creates a marker file) placed where flatprior reads
  data or checkpoints is never executed: the marker never appears. The same payload *does*
  create the marker under a plain ``pickle.load``, which proves the payload is live.
* The source tree never calls ``pickle.load``/``pickle.loads``, ``torch.load`` without
  ``weights_only=True``, or ``np.load`` without ``allow_pickle=False`` (AST scan).
* Checkpoints round-trip bit-exactly, are written atomically (a failing write leaves the old
  file intact and no temporary file), and report a read-only folder or a full disk.
* Output names from configs cannot escape the output directory.
"""

from __future__ import annotations

import ast
import errno
import gzip
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flatprior.errors import FlatpriorError

SRC = Path(__file__).resolve().parents[1] / "src" / "flatprior"


class Evil:
    """Unpickling this creates ``path`` (a stand-in for running arbitrary code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps({"state_dict": Evil(marker)}, protocol=protocol)


def evil_torch_file(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": "flatprior-checkpoint", "payload": Evil(marker)}, buf)
    return buf.getvalue()


def test_payload_is_live_under_plain_pickle(tmp_path):
    """Control: the payload really executes when unpickled without restrictions."""
    marker = tmp_path / "pwned"
    pickle.loads(evil_pickle(marker))  # noqa: S301 - on purpose, our own bytes
    assert marker.exists()


@pytest.mark.parametrize("kind", ["raw-pickle", "torch-zip", "pickle-protocol-5"])
def test_malicious_checkpoint_is_not_executed(tmp_path, kind):
    from flatprior.checkpoint import load_checkpoint, read_checkpoint_metadata
    from flatprior.models import make_model

    marker = tmp_path / "pwned"
    data = {
        "raw-pickle": lambda: evil_pickle(marker),
        "torch-zip": lambda: evil_torch_file(marker),
        "pickle-protocol-5": lambda: evil_pickle(marker, protocol=5),
    }[kind]()
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(data)
    with pytest.raises(FlatpriorError, match="checkpoint"):
        load_checkpoint(ckpt, lambda cfg: make_model("fcn", (4,), hidden=(3,)))
    with pytest.raises(FlatpriorError):
        read_checkpoint_metadata(ckpt)
    assert not marker.exists()


MNIST_NAMES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.mark.parametrize("layout", ["mnist-raw", "mnist-gz", "cifar-bin", "cifar-python"])
def test_malicious_pickle_in_data_root_is_not_executed(tmp_path, layout):
    """Pickles named like the data files (incl. CIFAR's *python* pickle batches) are inert."""
    from flatprior.data import make_task

    marker = tmp_path / "pwned"
    root = tmp_path / "data"
    payload = evil_pickle(marker)
    if layout.startswith("mnist"):
        (root / "mnist").mkdir(parents=True)
        for name in MNIST_NAMES:
            if layout == "mnist-gz":
                (root / "mnist" / (name + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (root / "mnist" / name).write_bytes(payload)
        dataset = "mnist"
    else:
        sub = "cifar-10-batches-bin" if layout == "cifar-bin" else "cifar-10-batches-py"
        (root / sub).mkdir(parents=True)
        names = ("test_batch.bin", "data_batch_1.bin")
        if layout == "cifar-python":
            names = ("test_batch", "data_batch_1", "batches.meta")
        for name in names:
            (root / sub / name).write_bytes(payload)
        dataset = "cifar10"
    with pytest.raises(FlatpriorError):
        make_task(dataset, 2, 0, 2, data_root=root)
    assert not marker.exists()


def test_malicious_npz_boolean_prior_is_not_executed(tmp_path):
    """An .npz whose member is a pickled object array (and a bare pickle named .npz)."""
    from flatprior.prior import BooleanPrior

    marker = tmp_path / "pwned"
    p = tmp_path / "prior.npz"
    arr = np.empty(1, dtype=object)
    arr[0] = Evil(marker)
    np.savez(p, keys=arr, counts=np.zeros(1), meta=np.array("{}"))
    with pytest.raises(FlatpriorError):
        BooleanPrior.load(p)
    p.write_bytes(evil_pickle(marker))
    with pytest.raises(FlatpriorError):
        BooleanPrior.load(p)
    assert not marker.exists()


# --------------------------------------------------------------------------- source scan
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and hasattr(f.value, "id") else ""
            yield owner, name, {k.arg: k.value for k in node.keywords}, node


def test_source_never_unpickles_user_files():
    bad = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for owner, name, kw, node in _calls(tree):
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            if owner in ("pickle", "cPickle", "dill", "joblib") and name in ("load", "loads"):
                bad.append(f"{where} {owner}.{name}")
            if owner == "torch" and name == "load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad.append(f"{where} torch.load without weights_only=True")
            if owner == "np" and name == "load":
                v = kw.get("allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    bad.append(f"{where} np.load without allow_pickle=False")
            if owner == "pd" and name == "read_pickle":
                bad.append(f"{where} pd.read_pickle")
    assert not bad, bad


# --------------------------------------------------------------------------- checkpoints
def _model(seed=0):
    from flatprior.models import make_model

    return make_model("fcn", (6,), hidden=(5, 4), seed=seed)


def _build(cfg):
    from flatprior.models import make_model

    return make_model(cfg["model"], tuple(cfg["input_shape"]), hidden=tuple(cfg["hidden"]))


CFG = {"model": "fcn", "input_shape": [6], "hidden": [5, 4], "seed": 0}


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    from flatprior.checkpoint import load_checkpoint, save_checkpoint

    m = _model(seed=3)
    p = save_checkpoint(m, tmp_path / "m.pt", config=CFG)
    m2, meta = load_checkpoint(p, _build)
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(7, 6)
    assert torch.equal(m.eval()(x), m2(x))
    assert meta["config"] == CFG and meta["versions"]["torch"] == torch.__version__
    assert meta["shapes"]["1.weight"] == [5, 6]
    # the file is a zip of plain tensors + strings: loadable by weights_only=True by anyone
    assert zipfile.is_zipfile(p)
    raw = torch.load(p, weights_only=True)
    assert set(raw) == {"format", "version", "metadata", "state_dict"}
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_refuses_nan_weights(tmp_path):
    from flatprior.checkpoint import save_checkpoint

    m = _model()
    with torch.no_grad():
        m[1].weight[0, 0] = float("nan")
    with pytest.raises(FlatpriorError, match="NaN/inf"):
        save_checkpoint(m, tmp_path / "m.pt", config=CFG)
    assert not list(tmp_path.iterdir())


def test_checkpoint_write_failure_keeps_old_file(tmp_path, monkeypatch):
    """Disk full in the middle of a write: the old checkpoint survives, no temp file remains."""
    from flatprior import checkpoint

    p = checkpoint.save_checkpoint(_model(seed=1), tmp_path / "m.pt", config=CFG)
    before = p.read_bytes()
    real_save = torch.save

    def full_disk(obj, fh, *a, **k):
        real_save(obj, io.BytesIO())
        fh.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(FlatpriorError, match="No space left on device"):
        checkpoint.save_checkpoint(_model(seed=2), p, config=CFG)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.pt"]


def test_checkpoint_to_read_only_folder_is_reported():
    from flatprior.checkpoint import save_checkpoint

    ro = Path("/sys")  # read-only even for root in containers
    if os.access(ro, os.W_OK) and not ro.is_dir():
        pytest.skip("no read-only folder available")
    with pytest.raises(FlatpriorError, match="cannot write checkpoint"):
        save_checkpoint(_model(), ro / "m.pt", config=CFG)


def test_checkpoint_into_missing_folder_is_reported(tmp_path):
    from flatprior.checkpoint import save_checkpoint

    with pytest.raises(FlatpriorError, match="does not exist"):
        save_checkpoint(_model(), tmp_path / "no" / "m.pt", config=CFG)


@pytest.mark.parametrize(
    "name",
    ["../escape.pt", "a/../../escape.pt", "/tmp/escape.pt", "", ".", "link/escape.pt"],
)
def test_output_names_cannot_escape_the_output_dir(tmp_path, name):
    from flatprior.checkpoint import safe_output_path, save_checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)  # a symlink inside out/ pointing outside
    with pytest.raises(FlatpriorError, match="output name"):
        safe_output_path(out, name)
    with pytest.raises(FlatpriorError, match="output name"):
        save_checkpoint(_model(), name, config=CFG, out_dir=out)
    assert not (tmp_path / "escape.pt").exists()


def test_output_names_inside_the_output_dir_are_allowed(tmp_path):
    from flatprior.checkpoint import safe_output_path, save_checkpoint

    (tmp_path / "runs").mkdir()
    assert safe_output_path(tmp_path, "runs/abc.pt") == (tmp_path / "runs" / "abc.pt").resolve()
    p = save_checkpoint(_model(), "runs/abc.pt", config=CFG, out_dir=tmp_path)
    assert p.is_file() and p.parent == (tmp_path / "runs").resolve()
