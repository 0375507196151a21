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


@pytest.fixture(scope="session")
def gradcon_cells():
    """The GradCon notebook's model, loss, training and first-iterations replay cells (tagged
    ``model``, ``loss``, ``train``, ``probe``), executed in a fresh namespace:
    ``gradcon_cells(seed, epochs, **params)``."""
    import nbformat
    import torch
    from tqdm.auto import trange

    notebook = Path(__file__).resolve().parent.parent / "notebooks" / "gradcon.ipynb"
    nb = nbformat.read(notebook, as_version=4)

    def load(seed: int, epochs: int, **params) -> dict:
        ns = {"variant": "cae_grad", "in_channels": 1, "dev": torch.device("cpu"), "seed": seed,
              "epochs": epochs, "batch_size": 64, "lr": 1e-3, "alpha": 0.03, "save_every": 0,
              "trange": trange, **params}
        exec("import copy\nimport time\nimport numpy as np\nimport torch\n"
             "import pandas as pd\nimport torch.nn.functional as F\nfrom torch import nn\n"
             "from nbutils.config import save_checkpoint", ns)
        for tag in ("model", "loss", "train", "probe"):
            cells = [c.source for c in nb.cells
                     if c.cell_type == "code" and tag in c.metadata.get("tags", [])]
            assert cells, f"no cell tagged {tag!r}"
            for source in cells:
                exec(compile(source, str(notebook), "exec"), ns)
        return ns

    return load
