"""Shared fixtures. Tests never need the network or real data sets; tests that use real MNIST
skip unless DATA_DIR holds it."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (bit-exact comparisons of trainings), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data_root_holding(relative: str, what: str) -> Path:
    """DATA_DIR when it holds ``relative``; otherwise the test is skipped."""
    root = os.environ.get("DATA_DIR")
    if not root or not (Path(root) / relative).exists():
        pytest.skip(f"{what} not in DATA_DIR")
    return Path(root)


@pytest.fixture
def mnist_root() -> Path:
    return _data_root_holding("MNIST/raw/train-images-idx3-ubyte.gz", "real MNIST")


@pytest.fixture
def mvtec_bottle() -> Path:
    return _data_root_holding("mvtec/bottle/ground_truth", "real MVTec AD bottle")


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """A copy of the book's pages with the smoke runs of every chapter, trained from scratch.
    Executed once per test session: the notebook, book-build and determinism tests share it."""
    import shutil

    from nbutils import pipeline
    from nbutils.config import PROJECT_ROOT

    root = tmp_path_factory.mktemp("book")
    shutil.copy(PROJECT_ROOT / "_config.yml", root)
    shutil.copytree(PROJECT_ROOT / "book", root / "book",
                    ignore=shutil.ignore_patterns("runs", "generated"))
    jobs = pipeline.plan("smoke", root / "book" / "runs")
    # train from scratch: checkpoints lying in the developer's tree must not stand in
    mp = pytest.MonkeyPatch()
    mp.setenv("CHECKPOINT_DIR", str(root / "checkpoints"))
    try:
        outcomes = pipeline.run(jobs, n_jobs=2)
    finally:
        mp.undo()
    return root, jobs, outcomes
