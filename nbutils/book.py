"""Assemble and build the Jupyter Book from the chapter manifest and the executed runs.

    python -m nbutils.book            # run-set pages, results pages, table of contents, HTML

Everything comes from ``nbutils/chapters.yml`` (which chapters, in which order, with which
metrics) and the run records in ``book/runs``. Per chapter, the book shows the run sets of the
``paper`` profile where any exist and of the ``quick`` profile otherwise. Each run set gets a
page (``book/generated/runs/<profile>/<notebook>/<run set>.md``): what it is, and a table of
class x seed whose numbers link to the executed notebooks. The sidebar lists chapters and run
sets; the executed notebooks sit below their run set in the table of contents, deeper than the
sidebar shows. Only runs with a complete record are published (a failed run's notebook is kept
on disk but not built). The results pages are notebooks executed by papermill from the records,
so no number is typed by hand.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nbutils.chapters import Chapter, Manifest, load_manifest, run_set_name
from nbutils.config import PROJECT_ROOT
from nbutils.pipeline import join_streams, page_kernel_manager, shrink_figures
from nbutils.records import is_complete_record, read_record

PROFILE_PREFERENCE = ("paper", "quick", "smoke")
# Results pages of the whole book (notebooks/<name>.ipynb), not of one chapter, in the order of
# the table of contents; chapters' own results pages come from the manifest.
BOOK_RESULTS = ("results", "reproduction_cost")


class BookError(ValueError):
    """The book cannot be assembled (a chapter without its page, ...)."""

GENERATED = Path("book") / "generated"
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"


# ---------------------------------------------------------------------------------------------
# Run sets: what the book publishes


@dataclass
class Run:
    normal_class: int
    seed: int
    record: dict
    page: Path  # the executed notebook


@dataclass
class RunSet:
    chapter: Chapter
    profile: str
    name: str           # its folder: <dataset>[-<tag>]
    folder: Path
    runs: list[Run] = field(default_factory=list)

    @property
    def sweep(self) -> dict | None:
        return self.chapter.sweep_for(self.profile, self.name)

    def docname(self) -> str:
        return (GENERATED / "runs" / self.profile / self.chapter.notebook / self.name).as_posix()


def _published(folder: Path) -> list[Run]:
    runs = []
    for page in folder.glob("class*_seed*.ipynb"):
        record_path = page.with_suffix(".json")
        if not is_complete_record(record_path):
            continue
        record = read_record(record_path)
        runs.append(Run(int(record["normal_class"]), int(record["seed"]), record, page))
    return sorted(runs, key=lambda r: (r.normal_class, r.seed))


def published_run_sets(chapter: Chapter, runs_dir: Path) -> tuple[str | None, list[RunSet]]:
    """A chapter's run sets with published runs, of the first profile that has any: the
    manifest's run sets in its order, then any other folder with records (an older sweep)."""
    for profile in PROFILE_PREFERENCE:
        base = runs_dir / profile / chapter.notebook
        if not base.is_dir():
            continue
        declared = [run_set_name(s) for s in chapter.runs.get(profile, [])]
        others = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in declared)
        sets = []
        for name in declared + others:
            runs = _published(base / name)
            if runs:
                sets.append(RunSet(chapter, profile, name, base / name, runs))
        if sets:
            return profile, sets
    return None, []


# ---------------------------------------------------------------------------------------------
# Run-set pages (Markdown, written by this module)


def _data_source(text: str) -> str:
    """A data source without the absolute folders of the machine that ran it:
    ``.../data/MNIST`` -> ``$DATA_DIR/MNIST``."""
    def relative(match: re.Match) -> str:
        parts = Path(match.group(0)).parts
        if "data" in parts:
            return "$DATA_DIR/" + "/".join(parts[len(parts) - parts[::-1].index("data"):])
        return "…/" + parts[-1]
    return re.sub(r"(?<![\w.])/[^\s,;:()]+", relative, text)


def _fmt(value) -> str:
    return "–" if value is None or value != value else f"{value:.3f}"


def _doc_link(text: str, page: Path, root: Path) -> str:
    """A MyST cross-reference to a source page, from any page (paths from the book's root)."""
    return f"{{doc}}`{text} </{page.relative_to(root).with_suffix('').as_posix()}>`"


def _classes(dataset: str, spec) -> list[int] | None:
    from nbutils.data import DataError, dataset_info, resolve_class

    try:
        if spec in (None, "all"):
            return list(range(len(dataset_info(dataset).class_names)))
        return [resolve_class(dataset, c) for c in (spec if isinstance(spec, list) else [spec])]
    except (DataError, KeyError, ValueError):
        return None


def _class_name(dataset: str, index: int) -> str:
    from nbutils.data import DATASETS

    names = DATASETS[dataset].class_names if dataset in DATASETS else None
    return str(names[index]) if names and 0 <= index < len(names) else str(index)


def _code(value) -> str:
    return f"`{value}`"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":--" if i == 0 else "--:"
                                                            for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


MAX_COLUMNS = 6  # numeric columns per table, so that a table fits the page


def run_set_markdown(rs: RunSet, root: Path, manifest: Manifest) -> str:
    """The page of one run set: what it is, and class x seed tables linking to the runs."""
    chapter, records = rs.chapter, [r.record for r in rs.runs]
    sweep = rs.sweep
    dataset = records[0]["dataset"]
    seeds = sorted({r.seed for r in rs.runs})
    planned = _classes(dataset, (sweep or {}).get("classes", "all")) if sweep else None
    planned = planned or sorted({r.normal_class for r in rs.runs})
    planned_seeds = sorted(set((sweep or {}).get("seeds", [0])) | set(seeds)) if sweep else seeds
    by_key = {(r.normal_class, r.seed): r for r in rs.runs}

    def unique(values) -> list[str]:
        return sorted({str(v) for v in values})

    data = records[0].get("data", {})
    params = (sweep or {}).get("parameters") or {}
    epochs = unique(r["params"]["epochs"] for r in records if "epochs" in r.get("params", {}))
    variants = [v for v in unique(r["variant"] for r in records) if v]
    commits = sorted({(r["git_commit"], r.get("code_sha", "?")) for r in records})
    dates = sorted(r["date"][:10] for r in records)
    lines = [f"# {chapter.title} — run set `{rs.name}`", ""]
    if sweep and sweep.get("note"):
        lines += [sweep["note"][0].upper() + sweep["note"][1:] + ".", ""]
    lines += [
        f"- **Chapter**: {_doc_link(chapter.title, root / (chapter.page + '.md'), root)}",
        f"- **Profile**: `{rs.profile}`: {manifest.profiles.get(rs.profile, 'not in the manifest')}",
        f"- **Data**: `{dataset}`, protocol `{records[0]['protocol']}`"
        + (f"; {_data_source(str(data['source']))}" if data.get("source") else ""),
        "- " + "; ".join(([f"**Variant**: {', '.join(_code(v) for v in variants)}"] if variants else [])
                         + ([f"**Epochs**: {', '.join(epochs)}"] if epochs else [])
                         or ["**Variant**: one"]),
        ("- **Parameters** (the manifest's run set): "
         + ", ".join(f"`{k}={v}`" for k, v in params.items())) if sweep else
        "- **Parameters**: this run set is not in the manifest's "
        f"`{rs.profile}` run sets (an earlier sweep); its records hold its parameters",
        f"- **Runs**: {len(rs.runs)} of {len(planned) * len(planned_seeds)} planned "
        f"({len(planned)} classes × seed{'s' if len(planned_seeds) > 1 else ''} "
        f"{', '.join(map(str, planned_seeds))}); "
        f"run {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""),
        f"- **Device**: {'; '.join(unique(r['device'] for r in records))}",
        "- **Code**: " + "; ".join(f"commit `{c}` (code `{s}`)" for c, s in commits),
    ]
    if sweep:
        tag = f" --tag {sweep['tag']}" if sweep.get("tag") else ""
        lines.append(f"- **Rerun**: `python -m nbutils.pipeline --profile {rs.profile} "
                     f"--notebook {chapter.notebook}{tag}`")
    results = ([_doc_link("its own results page", root / GENERATED / f"{chapter.results}.ipynb",
                          root)] if chapter.results else [])
    lines += ["", "Each number links to the executed notebook of its run. The "
              + _doc_link("results page", root / GENERATED / "results.ipynb", root)
              + " sets these runs beside the published numbers"
              + (f"; the chapter has {results[0]}" if results else "") + ".", ""]

    metrics = [m for m in chapter.metrics
               if any(isinstance(r.record["metrics"].get(m.key), (int, float)) for r in rs.runs)]
    if not metrics:  # a chapter that declares no metric: its headline score
        from nbutils.chapters import Metric
        metrics = [Metric("auroc", "AUROC")]

    def cell(cls: int, seed: int, key: str) -> str:
        run = by_key.get((cls, seed))
        value = run.record["metrics"].get(key) if run else None
        if not isinstance(value, (int, float)):
            return "–"
        return _doc_link(_fmt(value), run.page, root)

    def mean_row(seed_list: list[int], key: str) -> str:
        values = [by_key[(c, s)].record["metrics"].get(key) for s in seed_list for c in planned
                  if (c, s) in by_key]
        values = [v for v in values if isinstance(v, (int, float))]
        complete = all((c, s) in by_key for s in seed_list for c in planned)
        if not values:
            return "–"
        mean = sum(values) / len(values)
        return f"**{mean:.3f}**" if complete else f"{mean:.3f} ({len(values)} runs)"

    head = metrics[0]
    if len(seeds) > 1:
        lines += [f"## {head.label[0].upper() + head.label[1:]}: class × seed", ""]
        rows = [[_class_name(dataset, c)] + [cell(c, s, head.key) for s in seeds]
                for c in planned]
        rows.append(["mean"] + [mean_row([s], head.key) for s in seeds])
        lines += [_table(["class"] + [f"seed {s}" for s in seeds], rows), ""]
    for seed in seeds:
        for start in range(0, len(metrics), MAX_COLUMNS):
            chunk = metrics[start:start + MAX_COLUMNS]
            title = "Every metric" if len(seeds) == 1 else f"Seed {seed}: every metric"
            if start == 0:
                lines += [f"## {title}", ""]
            rows = [[_class_name(dataset, c)] + [cell(c, seed, m.key) for m in chunk]
                    for c in planned]
            rows.append(["mean"] + [mean_row([seed], m.key) for m in chunk])
            lines += [_table(["class"] + [m.label for m in chunk], rows), ""]
    lines += ["A mean in bold is over every planned class; otherwise it is over the runs so far.",
              ""]
    return "\n".join(lines)


def write_run_set_pages(root: Path, runs_dir: Path, notebook_dir: Path = NOTEBOOK_DIR,
                        manifest: Manifest | None = None) -> dict[str, list[RunSet]]:
    """Write one page per published run set; returns each present chapter's run sets."""
    manifest = manifest or load_manifest()
    out_dir = root / GENERATED / "runs"
    if out_dir.exists():  # pages of run sets that are gone must not linger
        for old in out_dir.rglob("*.md"):
            old.unlink()
    published = {}
    for chapter in manifest.present(notebook_dir):
        _, sets = published_run_sets(chapter, runs_dir)
        for rs in sets:
            path = root / (rs.docname() + ".md")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(run_set_markdown(rs, root, manifest))
        published[chapter.notebook] = sets
    return published


# ---------------------------------------------------------------------------------------------
# Table of contents


def build_toc(root: Path, runs_dir: Path, notebook_dir: Path = NOTEBOOK_DIR,
              manifest: Manifest | None = None) -> dict:
    """Chapters in the manifest's order (those whose notebook exists), each with its run-set
    pages (under which sit the executed notebooks) and its own results page, if any."""
    manifest = manifest or load_manifest()

    def rel(path: Path) -> str:
        return path.relative_to(root).with_suffix("").as_posix()

    chapters = []
    for chapter in manifest.present(notebook_dir):
        if not (root / f"{chapter.page}.md").exists():
            raise BookError(f"chapter {chapter.notebook!r}: its notebook exists but its page "
                            f"{chapter.page}.md does not (nbutils/chapters.yml, 'page')")
        entry: dict = {"file": chapter.page}
        sections = []
        for rs in published_run_sets(chapter, runs_dir)[1]:
            sections.append({"file": rs.docname(), "title": rs.name,
                             "sections": [{"file": rel(r.page)} for r in rs.runs]})
        if chapter.results and (notebook_dir / f"{chapter.results}.ipynb").exists():
            sections.append({"file": (GENERATED / chapter.results).as_posix()})
        if sections:
            entry["sections"] = sections
        chapters.append(entry)
    parts = [
        {"caption": "Foundations", "chapters": [{"file": "book/protocol"}]},
        {"caption": "Methods", "chapters": chapters},
        {"caption": "Results", "chapters": [
            *({"file": (GENERATED / name).as_posix()} for name in BOOK_RESULTS
              if name == "results" or (notebook_dir / f"{name}.ipynb").exists()),
            {"file": "book/bibliography"}]},
    ]
    return {"format": "jb-book", "root": "book/intro", "parts": parts}


def write_toc(root: Path = PROJECT_ROOT, runs_dir: Path | None = None,
              notebook_dir: Path | None = None, manifest: Manifest | None = None) -> Path:
    runs_dir = runs_dir or root / "book" / "runs"
    toc = build_toc(root, runs_dir, notebook_dir or NOTEBOOK_DIR, manifest)
    path = root / "_toc.yml"
    header = ("# Written by `python -m nbutils.book` from nbutils/chapters.yml and the runs in "
              "book/runs; do not edit.\n")
    path.write_text(header + yaml.safe_dump(toc, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Results pages (notebooks executed on the records)


def results_notebooks(notebook_dir: Path = NOTEBOOK_DIR,
                      manifest: Manifest | None = None) -> list[str]:
    """The book's results notebooks (:data:`BOOK_RESULTS`) and each present chapter's own."""
    manifest = manifest or load_manifest()
    names = [*BOOK_RESULTS] + [c.results for c in manifest.present(notebook_dir) if c.results]
    return [n for n in names if (notebook_dir / f"{n}.ipynb").exists()]


def execute_results(root: Path = PROJECT_ROOT, runs_dir: Path | None = None,
                    notebook_dir: Path | None = None, name: str = "results",
                    manifest: Path | None = None) -> Path:
    """Execute a results notebook on the records (papermill), into book/generated/.

    The notebook runs in ``root`` and gets the records' folder relative to it where it can
    (the page names folders of the project, not of the machine that built it)."""
    import nbformat
    import papermill as pm

    notebook_dir = notebook_dir or NOTEBOOK_DIR
    runs_dir = Path(runs_dir or root / "book" / "runs").resolve()
    try:
        shown = runs_dir.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        shown = str(runs_dir)
    output = root / GENERATED / f"{name}.ipynb"
    output.parent.mkdir(parents=True, exist_ok=True)
    os.environ.pop("MPLBACKEND", None)  # the kernel must draw inline figures
    parameters = {"runs_dir": shown, "manifest": str(manifest or "")}
    pm.execute_notebook(str(notebook_dir / f"{name}.ipynb"), str(output), parameters=parameters,
                        kernel_name="python3", progress_bar=False, cwd=str(root),
                        kernel_manager_class=page_kernel_manager())  # a quiet kernel, as runs
    nb = nbformat.read(output, as_version=4)
    for cell in nb.cells:  # readers need the tables, not the runs_dir plumbing
        tags = cell.metadata.get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
    shrink_figures(nb)
    nbformat.write(nb, output)
    return output


class Plans:
    """What each run set's profile plans (from the manifest), so that the results pages can
    tell a seed that ran every class from one still under way. ``group`` is a slice of
    :func:`nbutils.records.records_table` holding one run set."""

    def __init__(self, profiles, runs_dir, manifest: Path | str | None = None):
        from nbutils.data import DataError
        from nbutils.pipeline import PipelineError, plan

        self.planned: dict[tuple, set[int]] = {}
        for profile in profiles:
            try:
                jobs = plan(profile, Path(runs_dir), manifest=Path(manifest) if manifest else None)
            except (PipelineError, DataError, OSError):  # a profile this checkout does not know
                continue
            for job in jobs:
                key = (profile, job.notebook, job.output.parent.name)
                self.planned.setdefault(key, set()).add(job.parameters["normal_class"])

    def classes(self, group) -> set:
        """The classes the profile plans for this run set, or, for a run set the profile does
        not list, the classes that have records."""
        key = tuple(group[k].iloc[0] for k in ("profile", "notebook", "run_set"))
        return self.planned.get(key) or set(group["normal_class"])

    def complete_seeds(self, group) -> list[int]:
        """Seeds that ran every planned class of the run set; a sweep still under way has others."""
        classes = self.classes(group)
        return sorted(int(s) for s, g in group.groupby("seed") if set(g["normal_class"]) >= classes)


def fmt(mean, std, n) -> str:
    """``mean ± std`` over ``n`` seeds (the mean alone for one seed)."""
    import pandas as pd

    if pd.isna(mean):
        return ""
    return f"{mean:.3f} ± {std:.3f}" if n > 1 and not pd.isna(std) else f"{mean:.3f}"


def class_names(dataset: str) -> list[str] | None:
    """The data set's class names, or None when this checkout does not know them."""
    from nbutils.data import DATASETS

    try:
        return [str(c) for c in DATASETS[dataset].class_names]
    except Exception:  # an unknown data set, or one whose classes are found on disk
        return None


def run_set_page(root: Path, profile: str, notebook: str, run_set: str) -> str | None:
    """The run-set page's HTML address relative to a page in book/generated, if the page was
    written (a notebook's Markdown output is not cross-referenced by Sphinx: the link names
    the HTML file)."""
    page = GENERATED / "runs" / profile / notebook / f"{run_set}.md"
    return (Path(*page.parts[2:]).with_suffix(".html").as_posix()
            if (Path(root) / page).exists() else None)


# ---------------------------------------------------------------------------------------------
# HTML


def build_html(root: Path = PROJECT_ROOT, jobs: int | None = None) -> Path:
    """Render with Jupyter Book (Sphinx), ``jobs`` processes at once (default: the CPU cores);
    any Sphinx warning fails the build."""
    from jupyter_book.sphinx import build_sphinx

    jobs = jobs or os.cpu_count() or 1
    root = Path(root).resolve()
    html = root / "_build" / "html"
    # what `jupyter-book build --all --warningiserror --keep-going` does, with `jobs`
    result = build_sphinx(root, html, use_external_toc=True, noconfig=True,
                          path_config=str(root / "_config.yml"), builder="html",
                          confoverrides={"external_toc_path": "_toc.yml",
                                         "latex_individualpages": False},
                          warningiserror=True, keep_going=True, freshenv=True, jobs=jobs)
    if result:  # a non-zero status or the exception that stopped Sphinx
        raise subprocess.CalledProcessError(1 if isinstance(result, Exception) else result,
                                            "jupyter-book build")
    return html / "index.html"


def _search_one_run_per_notebook(app, doctree) -> None:
    """Leave all but one executed page per profile and notebook out of the search index.

    Their prose is the chapter notebook's, the same on every run's page: indexed 330 times it
    fills search results with copies and costs most of the index, which Sphinx builds in one
    process. The first page (in name order) keeps it searchable; run-set pages, chapter and
    results pages are all indexed. Sphinx's ``nosearch`` metadata does the rest."""
    doc = app.env.docname
    parts = doc.split("/")
    if parts[:2] != ["book", "runs"] or len(parts) < 5:
        return
    prefix = "/".join(parts[:4]) + "/"
    if doc != min(d for d in app.env.found_docs if d.startswith(prefix)):
        app.env.metadata[doc]["nosearch"] = True


def read_notebook(text: str):
    """How the book reads a notebook (``_config.yml``: myst-nb's reader for ``.ipynb``): as
    nbformat does, with each cell's adjacent stream outputs joined and their carriage-return
    redraws collapsed, as Jupyter shows them. A progress bar then shows its last state, not
    each update: pages executed before the bars were lean hold thousands of updates, and
    highlighting them line by line was most of the book's build time. Only the rendering
    changes; the executed notebooks on disk stay as they are."""
    import nbformat

    nb = nbformat.reads(text, as_version=4)
    join_streams(nb)
    return nb


def setup(app):
    """A Sphinx extension (``_config.yml``: ``extra_extensions``): MathJax served from the
    book itself (PyPI's sphinx-mathjax-offline), so that equations render without a network;
    one executed page per notebook in the search index (:func:`_search_one_run_per_notebook`).

    Sphinx builds in parallel only if every extension says it may. This one and
    sphinx-mathjax-offline only copy files when the build ends; sphinx-multitoc-numbering
    (loaded by sphinx-external-toc) numbers sections in the main process. Neither says so."""
    import importlib

    importlib.import_module("sphinx-mathjax-offline").setup(app)
    app.connect("doctree-read", _search_one_run_per_notebook)
    app.setup_extension("sphinx_multitoc_numbering")
    extension = app.extensions["sphinx_multitoc_numbering"]
    if extension.parallel_read_safe is None:
        extension.parallel_read_safe = extension.parallel_write_safe = True
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbutils.book", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT)
    parser.add_argument("--runs-dir", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=None,
                        help="Sphinx processes (default: the CPU cores)")
    parser.add_argument("--no-html", action="store_true", help="only the pages, not the HTML")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    runs_dir = (args.runs_dir or root / "book" / "runs").resolve()
    start = time.perf_counter()
    try:
        toc = write_toc(root, runs_dir, NOTEBOOK_DIR)
    except BookError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    published = write_run_set_pages(root, runs_dir, NOTEBOOK_DIR)
    print(f"run-set pages: {sum(len(v) for v in published.values())} in {GENERATED}/runs")
    print(f"table of contents: {toc.relative_to(root)}")
    for name in results_notebooks(NOTEBOOK_DIR):
        page = execute_results(root, runs_dir, NOTEBOOK_DIR, name)
        print(f"results page: {page.relative_to(root)}")
    if not args.no_html:
        try:
            index = build_html(root, args.jobs)
        except subprocess.CalledProcessError:
            print("book build failed (warnings count as errors); see the messages above",
                  file=sys.stderr)
            return 1
        print(f"\nThe book is at {index.relative_to(root)} "
              f"({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
