import functools
import http.server
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
MNIST_ROOT = SHARED / "data"


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """One intra-op thread: the test networks are tiny, and on a shared 2-core machine two
    threads thrash (10-20x slower). BLAS threads (numpy/scipy, e.g. EP) are not affected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def mnist_root() -> Path:
    if not (MNIST_ROOT / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("../shared/data/mnist not present")
    return MNIST_ROOT


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``flatprior ARGS...`` in-process through the real entry point; returns
    ``(returncode, stdout, stderr)`` as a namespace."""
    from flatprior.cli import main

    def call(*args):
        monkeypatch.setattr(sys, "argv", ["flatprior", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code
        o = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=o.out, stderr=o.err)

    return call


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving ``tmp_path / 'www'``; yields (folder, url).

    Stands in for a data set's mirror in the download tests (no network in CI).
    """
    www = tmp_path / "www"
    www.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
