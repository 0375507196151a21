"""Published numbers (``reference.json``) as tables, to set beside this book's results."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

REFERENCE_FILE = Path(__file__).with_name("reference.json")


@lru_cache(maxsize=1)
def load_reference() -> dict:
    return json.loads(REFERENCE_FILE.read_text())


def reference_rows(method: str, dataset: str | None = None, metric: str = "auroc") -> list[dict]:
    """Reference entries for a method (and data set), each with its source's label."""
    ref = load_reference()
    rows = []
    for entry in ref["results"]:
        if entry["method"] != method or entry["metric"] != metric:
            continue
        if dataset is not None and entry["dataset"] != dataset:
            continue
        rows.append({**entry, "source_label": ref["sources"][entry["source"]]["label"]})
    return rows


def reference_table(method: str, dataset: str, metric: str = "auroc"):
    """Per-class published numbers as a DataFrame: one row per source, classes as columns."""
    import pandas as pd

    rows = []
    for entry in reference_rows(method, dataset, metric):
        row = {"source": entry["source_label"], "variant": entry["variant"]}
        row.update(entry["per_class"])
        row["mean"] = entry["mean"]
        rows.append(row)
    return pd.DataFrame(rows)
