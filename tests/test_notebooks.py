"""Every chapter executes through papermill (smoke profile) and the book builds with -W."""

import shutil
from pathlib import Path

import nbformat
import pytest
import yaml

from nbutils import book, pipeline
from nbutils.config import PROJECT_ROOT
from nbutils.records import read_record

NOTEBOOKS = sorted(p for p in (PROJECT_ROOT / "notebooks").glob("*.ipynb"))
CHAPTERS = [p.stem for p in NOTEBOOKS if p.stem != "results"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_source_notebook_is_clean_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit without outputs"
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_every_chapter_is_in_every_profile(profile):
    _, spec = pipeline.load_profile(profile)
    assert set(CHAPTERS) <= {s["notebook"] for s in spec["sweeps"]}


def test_chapters_have_a_page_and_a_place_in_the_book():
    for name in CHAPTERS:
        assert (PROJECT_ROOT / "book" / "chapters" / f"{name}.md").exists()
        assert name in dict(book.CHAPTERS)


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    """A copy of the book's pages with the smoke runs of every chapter."""
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


@pytest.mark.slow
def test_every_chapter_executes_with_tiny_parameters(smoke_book):
    _, jobs, outcomes = smoke_book
    assert {j.notebook for j in jobs} == set(CHAPTERS)
    failures = [f"{o.job.name}: {o.message}" for o in outcomes if not o.ok]
    assert not failures, failures
    for job in jobs:
        record = read_record(job.record)
        assert record["profile"] == "smoke" and 0 <= record["metrics"]["auroc"] <= 1
        figures = [o for c in nbformat.read(job.output, as_version=4).cells
                   for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert figures, f"{job.name}: the executed page has no figures"


@pytest.mark.slow
def test_book_builds_without_warnings(smoke_book):
    root, jobs, _ = smoke_book
    toc = yaml.safe_load(book.write_toc(root, root / "book" / "runs",
                                        PROJECT_ROOT / "notebooks").read_text())
    listed = {s["file"] for part in toc["parts"] for ch in part["chapters"]
              for s in ch.get("sections", [])}
    assert {str(j.output.relative_to(root).with_suffix("")) for j in jobs} <= listed
    book.execute_results(root, root / "book" / "runs", PROJECT_ROOT / "notebooks")
    index = book.build_html(root)
    html = (root / "_build" / "html" / "book" / "generated" / "results.html").read_text()
    assert index.exists() and "Per-class tables" in html and "smoke" in html
    assert "<img" in html and "runs_dir" not in html


def test_source_notebooks_pass_ruff():
    import subprocess
    import sys

    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", str(PROJECT_ROOT)], capture_output=True,
                            text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_results_page_leaves_a_run_set_under_way_out_of_the_means(smoke_book, tmp_path):
    """One record of a run set whose profile plans ten classes: the results page must say the
    seed is under way and give no mean, instead of passing one class off as the run set."""
    import json

    import nbformat

    _, jobs, _ = smoke_book
    source = next(j for j in jobs if j.notebook == "gradcon").record
    quick = next(j for j in pipeline.plan("quick", tmp_path / "runs") if j.notebook == "gradcon")
    record = json.loads(source.read_text())
    record.update(profile="quick", normal_class=quick.parameters["normal_class"],
                  seed=quick.parameters["seed"])
    quick.record.parent.mkdir(parents=True)
    quick.record.write_text(json.dumps(record))
    out = book.execute_results(tmp_path / "page", tmp_path / "runs", PROJECT_ROOT / "notebooks")
    text = "\n".join(str(o.get("data", {}).get(kind, "")) for kind in ("text/markdown", "text/plain")
                     for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []))
    assert f"Seed {record['seed']} has 1 of 10 classes so far" in text
    assert "1 of 10" in text  # the side-by-side table's class count
