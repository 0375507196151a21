"""Shared fixtures. Tests never need the network or real data sets; tests that use real MNIST
skip unless DATA_DIR holds it."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def mnist_root() -> Path:
    root = os.environ.get("DATA_DIR")
    if not root or not (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST not in DATA_DIR")
    return Path(root)
