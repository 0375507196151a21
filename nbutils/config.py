"""Paths, seeding and device selection."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """Data root: the explicit argument, else ``$DATA_DIR``, else ``<project>/data``.

    Relative paths are taken from the current directory, so ``DATA_DIR=../shared/data``
    works from the project root.
    """
    chosen = override or os.environ.get("DATA_DIR") or PROJECT_ROOT / "data"
    return Path(chosen).expanduser().resolve()


def checkpoint_dir() -> Path:
    """Where notebooks keep trained weights (``$CHECKPOINT_DIR`` or ``<project>/checkpoints``)."""
    return Path(os.environ.get("CHECKPOINT_DIR") or PROJECT_ROOT / "checkpoints").resolve()


def path_roots(data_root: str | os.PathLike | None = None) -> dict[str, str]:
    """This machine's absolute folders and how published text names them: the data root as
    ``$DATA_DIR``, the project root as nothing (paths become project-relative), the home
    folder as ``~``. Both the given and the resolved form of each folder are listed."""
    named = ((data_dir(data_root), "$DATA_DIR"), (PROJECT_ROOT, ""), (Path.home(), "~"))
    roots: dict[str, str] = {}
    for folder, name in named:
        for form in (os.path.abspath(folder), os.path.realpath(folder)):
            if len(Path(form).parts) > 1:  # never "/" itself
                roots.setdefault(form.rstrip("/"), name)
    return roots


def portable_paths(text: str, roots: dict[str, str] | None = None) -> str:
    """Rewrite absolute paths under known folders (default :func:`path_roots`) so that a
    published page or record names no folder of the machine that ran it::

        /work/main/book/runs/x.json  ->  book/runs/x.json
        /data/MNIST                  ->  $DATA_DIR/MNIST      (with DATA_DIR=/data)

    Only whole path components match (``/work/main2`` is not under ``/work/main``); the
    longest folder wins, so a data root inside the project still reads ``$DATA_DIR``.
    """
    roots = path_roots() if roots is None else roots
    if not roots or not isinstance(text, str):
        return text
    ordered = sorted(roots, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w.$~/-])(" + "|".join(map(re.escape, ordered))
                         + r")(/|(?![\w.-]))")

    def replace(match: re.Match) -> str:
        name, slash = roots[match.group(1)], match.group(2)
        if name:
            return name + slash
        return "" if slash else "."
    return pattern.sub(replace, text)


def portable(value, roots: dict[str, str] | None = None):
    """:func:`portable_paths` applied to every string inside dicts and lists."""
    roots = path_roots() if roots is None else roots
    if isinstance(value, str):
        return portable_paths(value, roots)
    if isinstance(value, Path):
        return portable_paths(str(value), roots)
    if isinstance(value, dict):
        return {k: portable(v, roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, roots) for v in value]
    return value


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch; return a NumPy generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
    except ImportError:  # pragma: no cover - torch is a dependency, but keep data code usable
        pass
    return np.random.default_rng(seed)


def get_device(device: str = "auto"):
    """``"auto"`` picks CUDA, then Apple MPS, then CPU; anything else is passed to torch."""
    import torch

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device) -> str:
    """A human-readable device name for run records (GPU model or CPU model)."""
    import platform

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{device.type}: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def save_checkpoint(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically: an interrupted or concurrent run never leaves half a file
    where the next run would load it (runs of different classes can share a checkpoint)."""
    import tempfile

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
