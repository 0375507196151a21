"""Run records: one JSON file per run, written atomically, read back into tables.

A record says what ran (method, variant, data, class, protocol, seed, profile, parameters),
what came out (metrics), how long it took, where (device) and with what code (git commit,
library versions). Results tables and plots in the book are built from these files only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nbutils.config import PROJECT_ROOT, path_roots, portable

SCHEMA = 1
REQUIRED = ("schema", "method", "variant", "dataset", "normal_class", "protocol", "seed",
            "profile", "params", "metrics", "timings", "device", "versions", "git_commit", "date")


def _code_paths() -> list[str]:
    """What a run executes: nbutils and its own source notebook (named by the pipeline)."""
    notebook = os.environ.get("NBUTILS_SOURCE_NOTEBOOK")
    return ["nbutils", notebook] if notebook else ["nbutils", "notebooks"]


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """The current commit, with ``-dirty`` when the code a run executes (nbutils and the
    source notebook, committed or new) differs from it; edits elsewhere do not count."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    if os.environ.get("NBUTILS_GIT_COMMIT"):
        # a copy of the tree whose .git is missing or stale (the GPU machine's copy carries
        # the session's first commit): whoever made the copy names its commit, and code_sha
        # still tells whether the code that ran is that commit's
        return os.environ["NBUTILS_GIT_COMMIT"]
    if not (root / ".git").exists():
        return "unknown"
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--", *_code_paths())
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("-dirty" if dirty else "")


def code_sha(notebook: str | os.PathLike | None = None) -> str:
    """A hash of the code that ran: nbutils' sources and the source notebook (the pipeline
    names it in ``$NBUTILS_SOURCE_NOTEBOOK``). Equal hashes mean the same code."""
    digest = hashlib.sha256()
    notebook = notebook or os.environ.get("NBUTILS_SOURCE_NOTEBOOK")
    files = sorted((PROJECT_ROOT / "nbutils").glob("*.py"))
    files += [Path(notebook)] if notebook and Path(notebook).exists() else []
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "scikit-learn", "scikit-image", "papermill"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    torch = sys.modules.get("torch")  # a run on a GPU also names its CUDA and cuDNN
    if torch is not None and torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def _jsonable(value: Any) -> Any:
    """Turn numpy/torch scalars and paths into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def make_record(*, method: str, variant: str, dataset: str, normal_class: int, protocol: str,
                seed: int, profile: str, params: dict, metrics: dict, timings: dict,
                device: str, data: dict | None = None, extra: dict | None = None) -> dict:
    """Assemble a complete record; versions, commit and date are filled in here. Paths in
    ``params``, ``data`` and ``extra`` are written relative to the project or the data root
    (:func:`nbutils.config.portable_paths`): a record names no folder of its machine."""
    return _jsonable({
        "schema": SCHEMA, "method": method, "variant": variant, "dataset": dataset,
        "normal_class": int(normal_class), "protocol": protocol, "seed": int(seed),
        "profile": profile, "params": portable(_jsonable(params)), "metrics": metrics,
        "timings": timings, "device": device, "data": portable(_jsonable(data or {})),
        "versions": library_versions(), "git_commit": git_commit(), "code_sha": code_sha(),
        "host": platform.node(), "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "extra": portable(_jsonable(extra or {})),
    })


def write_record(record: dict, path: str | os.PathLike) -> Path:
    """Write atomically: a reader sees the old file or the whole new one, never half of it."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"record lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(record), f, indent=1, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(path: str | os.PathLike) -> dict:
    """Read one record; raise ``ValueError`` if it is not a complete record."""
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"{path} is not a complete run record (lacks {missing})")
    return record


def is_complete_record(path: str | os.PathLike) -> bool:
    try:
        read_record(path)
        return True
    except (OSError, ValueError):
        return False


def find_records(root: str | os.PathLike) -> list[Path]:
    """Every complete record below ``root`` (temporary and broken files are skipped)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*.json")
                  if not p.name.startswith(".") and is_complete_record(p))


def records_table(root: str | os.PathLike, with_record: bool = False):
    """All records below ``root`` as a pandas DataFrame, metrics flattened to columns.

    ``with_record=True`` adds a ``record`` column holding each whole record (its ``params``,
    ``data`` and ``extra``), for pages that need more than the flat numbers without reading
    every file a second time."""
    import pandas as pd

    rows = []
    for path in find_records(root):
        r = read_record(path)
        row = {k: r[k] for k in ("method", "variant", "dataset", "normal_class", "protocol",
                                 "seed", "profile", "device", "git_commit", "date")}
        row.update({f"metric.{k}": v for k, v in r["metrics"].items()
                    if isinstance(v, (int, float))})
        row.update({f"time.{k}": v for k, v in r["timings"].items()
                    if isinstance(v, (int, float))})
        # <runs>/<profile>/<notebook>/<run set>/class<k>_seed<s>.json; manual runs lack these
        row["notebook"] = path.parent.parent.name
        row["run_set"] = path.parent.name
        row["path"] = str(path)
        if with_record:
            row["record"] = r
        rows.append(row)
    return pd.DataFrame(rows)


# Output data that is base64, not text: left alone when paths are rewritten.
BINARY_MIME = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp",
               "application/pdf")


def portable_notebook(nb: dict, roots: dict[str, str] | None = None) -> dict:
    """A notebook (dict or ``NotebookNode``) with :func:`nbutils.config.portable_paths`
    applied to every text in it (sources, outputs, tracebacks, metadata such as papermill's
    ``input_path`` and parameters); base64 images are left as they are."""
    roots = path_roots() if roots is None else roots

    def walk(value):
        if isinstance(value, dict):
            return {k: v if k in BINARY_MIME else walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return portable(value, roots)
    return walk(dict(nb))


def absolute_paths(text: str, roots: dict[str, str] | None = None) -> list[str]:
    """The absolute folders of this machine (:func:`nbutils.config.path_roots`, and any
    ``/home/<user>``, ``/Users/<user>``, ``/root`` or ``/work/<folder>``) that ``text`` names."""
    import re

    roots = path_roots() if roots is None else roots
    found = {r for r in roots if r in text}
    found |= set(re.findall(r"(?<![\w.$~/-])(?:/home/[\w.-]+|/Users/[\w.-]+|/root|/work/[\w.-]+)"
                            r"(?=/|(?![\w.-]))", text))
    return sorted(found)


def _page_text(nb: dict) -> str:
    """Every text of a notebook, base64 images left out (they are not text)."""
    def walk(value):
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in BINARY_MIME:
                    yield from walk(v)
        elif isinstance(value, list):
            for v in value:
                yield from walk(v)
        elif isinstance(value, str):
            yield value
    return "\n".join(walk(nb))


def published_text(path: str | os.PathLike) -> str:
    """The text of a record (``.json``) or an executed page (``.ipynb``, images left out)."""
    raw = Path(path).read_text(encoding="utf-8")
    return _page_text(json.loads(raw)) if str(path).endswith(".ipynb") else raw


def _json_format(raw: str) -> dict:
    """How a JSON file was written, so that a rewrite changes only what it must."""
    data = json.loads(raw)
    for kw in ({"indent": 1, "ensure_ascii": False}, {"indent": 1},
               {"indent": 1, "sort_keys": True, "ensure_ascii": False},
               {"indent": 1, "sort_keys": True}, {"indent": 2}):
        text = json.dumps(data, **kw)
        if raw in (text, text + "\n"):
            return {**kw, "newline": raw.endswith("\n")}
    raise ValueError("written in an unknown JSON format")


def make_portable(path: str | os.PathLike, roots: dict[str, str] | None = None) -> bool:
    """Rewrite the absolute paths in one record or executed page in place (see
    :func:`nbutils.config.portable_paths`); every other byte stays as it was. Return whether
    the file changed."""
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    fmt = _json_format(raw)
    newline = fmt.pop("newline")
    data = json.loads(raw)
    data = portable_notebook(data, roots) if path.suffix == ".ipynb" else portable(data, roots)
    text = json.dumps(data, **fmt) + ("\n" if newline else "")
    if text == raw:
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def default_record_path(method: str, dataset: str, normal_class: int, seed: int,
                        variant: str = "") -> Path:
    """Where a notebook run by hand writes its record: ``runs/manual/`` (git-ignored)."""
    name = f"{method}{'-' + variant if variant else ''}_{dataset}_class{normal_class}_seed{seed}"
    return PROJECT_ROOT / "runs" / "manual" / f"{name}.json"


class Timer:
    """Collects named wall-clock durations: ``with timer("train"): ...``; ``timer.seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
