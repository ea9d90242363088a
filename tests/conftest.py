from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
MNIST_ROOT = SHARED / "data"


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores are shared by the whole suite; keep torch from oversubscribing.
    torch.set_num_threads(2)
    yield


@pytest.fixture
def mnist_root() -> Path:
    if not (MNIST_ROOT / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("../shared/data/mnist not present")
    return MNIST_ROOT
