"""The reproduction-cost page (notebooks/reproduction_cost.ipynb), executed on a tiny fake runs
folder: planned and done runs from the manifest, measured seconds per device, estimates for the
rest (same run set, or scaled by epochs from a sibling run set), totals and the sweep log."""

import json
from pathlib import Path

import nbformat
import pytest
from pages import output_text

from nbutils import book
from nbutils.config import PROJECT_ROOT
from nbutils.records import make_record, write_record

MANIFEST = """
profiles:
  paper: paper runs
chapters:
  - notebook: baselines
    title: Tiny baselines
    runs:
      paper:
        - classes: [0, 1]
          seeds: [0, 1]
          parameters: {dataset: digits}
  - notebook: gradcon
    title: Tiny GradCon
    runs:
      paper:
        - tag: long
          classes: [0]
          seeds: [0, 1]
          parameters: {dataset: digits, epochs: 100}
        - tag: short
          classes: [0]
          seeds: [0, 1]
          parameters: {dataset: digits, epochs: 10}
"""

CPU = "cpu: AMD EPYC (2 cores, 1 threads)"
H200 = "cuda: NVIDIA H200"


def _record(runs: Path, notebook: str, run_set: str, cls: int, seed: int, timings: dict,
            device: str = CPU, extra: dict | None = None) -> None:
    record = make_record(method=notebook, variant="v", dataset="digits", normal_class=cls,
                         protocol="full", seed=seed, profile="paper", params={},
                         metrics={"auroc": 0.5}, timings=timings, device=device, extra=extra)
    write_record(record, runs / "paper" / notebook / run_set / f"class{cls}_seed{seed}.json")


def _row(text: str, chapter: str, run_set: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {chapter} | `{run_set}` |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.slow
def test_cost_page_tabulates_measured_and_estimated_seconds(tmp_path):
    manifest = tmp_path / "chapters.yml"
    manifest.write_text(MANIFEST)
    runs = tmp_path / "page" / "book" / "runs"
    for seed, cls, seconds in ((0, 0, 10.0), (0, 1, 20.0), (1, 0, 30.0)):  # class1_seed1 left
        _record(runs, "baselines", "digits", cls, seed, {"knn_seconds": seconds})
    # the long run set: one model trained by the many-models trainer (2 models in 100 s on the
    # H200: 50 s each) and scored on the H200; the other run is not done
    _record(runs, "gradcon", "digits-long", 0, 0, {"data": 1.0, "score": 4.0, "train": 0.0},
            device=H200, extra={"train_seconds_in_checkpoint": 100.0, "trainer": {
                "models_together": 2, "wall_seconds_all_models": 100.0, "device": H200}})
    # the short run set: both done on the CPU, trained in this execution (30 s) and scored (5 s)
    for seed in (0, 1):
        _record(runs, "gradcon", "digits-short", 0, seed, {"score": 5.0, "train": 30.0},
                extra={"train_seconds_in_checkpoint": 30.0})
    (runs / "paper" / "sweeps.jsonl").write_text(json.dumps({
        "date": "2026-12-01T00:00:00+00:00", "where": "pool of 2", "gpus": [], "wall_s": 90.0,
        "skipped": 0, "interrupted": False,
        "runs": [{"run": "baselines/digits/class0_seed0", "ok": True, "seconds": 12.0},
                 {"run": "baselines/digits/class1_seed1", "ok": False, "seconds": 3.0}]}) + "\n")

    out = book.execute_results(tmp_path / "page", runs, PROJECT_ROOT / "notebooks",
                               "reproduction_cost", manifest=manifest)
    text = output_text(out)

    # planned, done, runs by device, measured total, CPU and H200 for the whole run set
    assert _row(text, "Tiny baselines", "digits") == [
        "Tiny baselines", "`digits`", "4", "3", "CPU: 3 x 20 s", "1.0 min",
        "1.3 min (3 measured + 1 estimate)", "no H200 record"]
    assert _row(text, "Tiny GradCon", "digits-long") == [
        "Tiny GradCon", "`digits-long`", "2", "1", "H200: 1 x 55 s", "55 s",
        "10.2 min (estimate, scaled by epochs from `digits-short`)",  # 2 x (30 s x 10 + 5 s)
        "1.8 min (1 measured + 1 estimate)"]
    assert _row(text, "Tiny GradCon", "digits-short") == [
        "Tiny GradCon", "`digits-short`", "2", "2", "CPU: 2 x 35 s", "1.2 min",
        "1.2 min (measured)",
        "20 s (estimate, scaled by epochs from `digits-long`)"]  # 2 x (50 s / 10 + 5 s)
    total = next(x for x in text.splitlines() if x.startswith("| **Total**"))
    # CPU 60 + 20 + 610 + 70 s, of which 630 s estimated; H200 55 + 55 + 20 s, 75 s estimated
    assert "| **8** | **6** |" in total
    assert "**12.7 min** (10.5 min estimate; 0 run sets without a record)" in total
    assert "**2.2 min** (1.2 min estimate; 1 run sets without a record)" in total
    assert "**12.7 min** (0.0 days) for the 8 runs whose cost is known" in text
    assert "The other 1 run sets (4 runs) have no H200 record" in text
    # the sweep log: one sweep of two runs, one failed, 90 s
    assert "| 2026-12-01T00:00:00+00:00 | pool of 2 | 0 | 2 | 1 | 0 | 1.5 min |" in text
    # the source notebook has one parameters cell and no outputs
    source = nbformat.read(PROJECT_ROOT / "notebooks" / "reproduction_cost.ipynb", as_version=4)
    code = [c for c in source.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_toc_lists_the_cost_page_under_results(tmp_path):
    from nbutils.chapters import load_manifest

    (tmp_path / "chapters.yml").write_text(MANIFEST)
    (tmp_path / "book" / "chapters").mkdir(parents=True)
    for chapter in ("baselines", "gradcon"):
        (tmp_path / "book" / "chapters" / f"{chapter}.md").write_text(f"# {chapter}\n")
    toc = book.build_toc(tmp_path, tmp_path / "runs", PROJECT_ROOT / "notebooks",
                         load_manifest(tmp_path / "chapters.yml"))
    results = next(p for p in toc["parts"] if p["caption"] == "Results")["chapters"]
    assert [c["file"] for c in results] == ["book/generated/results",
                                            "book/generated/reproduction_cost",
                                            "book/bibliography"]
    assert "reproduction_cost" in book.results_notebooks(PROJECT_ROOT / "notebooks")
