"""Assemble and build the Jupyter Book from the executed runs.

    python -m nbutils.book            # table of contents, results page, HTML (warnings = errors)

The table of contents lists, under each chapter, the executed notebooks of the ``paper``
profile where they exist and of the ``quick`` profile otherwise; only runs with a complete
record are listed (a failed run's notebook is kept on disk but not published). The results
page is a notebook executed by papermill from the records, so no number is typed by hand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from nbutils.config import PROJECT_ROOT
from nbutils.records import is_complete_record

# (notebook name, chapter title) in reading order; a chapter appears once its notebook exists.
CHAPTERS = [
    ("baselines", "Classic baselines"),
    ("fisher_kernel", "Gradients as representations: the Fisher kernel"),
    ("gradcon", "GradCon"),
    ("cpc_ad", "CPC-AD"),
    ("efficientad", "EfficientAD"),
    ("flow_llr", "Normalizing flows and likelihood ratios"),
]
PROFILE_PREFERENCE = ("paper", "quick", "smoke")


def published_runs(runs_dir: Path, notebook: str) -> tuple[str | None, list[Path]]:
    """The executed notebooks shown for a chapter: the first profile that has any."""
    for profile in PROFILE_PREFERENCE:
        folder = runs_dir / profile / notebook
        done = sorted((p for p in folder.glob("*/*.ipynb")
                       if is_complete_record(p.with_suffix(".json"))), key=_run_order)
        if done:
            return profile, done
    return None, []


def _run_order(path: Path):
    stem = path.stem  # class<k>_seed<s>
    cls, _, seed = stem.removeprefix("class").partition("_seed")
    return (path.parent.name, int(cls) if cls.isdigit() else cls, int(seed) if seed.isdigit() else 0)


def _run_title(path: Path) -> str:
    """Short sidebar label: run set, class and seed (the page's own title says more)."""
    cls, _, seed = path.stem.removeprefix("class").partition("_seed")
    return f"{path.parent.name}: class {cls}, seed {seed}"


def build_toc(root: Path, runs_dir: Path, notebook_dir: Path) -> dict:
    def rel(path: Path) -> str:
        return str(path.relative_to(root).with_suffix(""))

    chapters = []
    for name, _title in CHAPTERS:
        if not (notebook_dir / f"{name}.ipynb").exists():
            continue
        entry: dict = {"file": f"book/chapters/{name}"}
        _, runs = published_runs(runs_dir, name)
        if runs:
            entry["sections"] = [{"file": rel(p), "title": _run_title(p)} for p in runs]
        chapters.append(entry)
    parts = [
        {"caption": "Foundations", "chapters": [{"file": "book/protocol"}]},
        {"caption": "Methods", "chapters": chapters},
        {"caption": "Results", "chapters": [{"file": "book/generated/results"},
                                            {"file": "book/bibliography"}]},
    ]
    return {"format": "jb-book", "root": "book/intro", "parts": parts}


def write_toc(root: Path = PROJECT_ROOT, runs_dir: Path | None = None,
              notebook_dir: Path | None = None) -> Path:
    runs_dir = runs_dir or root / "book" / "runs"
    toc = build_toc(root, runs_dir, notebook_dir or root / "notebooks")
    path = root / "_toc.yml"
    header = "# Written by `python -m nbutils.book` from the runs in book/runs; do not edit.\n"
    path.write_text(header + yaml.safe_dump(toc, sort_keys=False))
    return path


def execute_results(root: Path = PROJECT_ROOT, runs_dir: Path | None = None,
                    notebook_dir: Path | None = None) -> Path:
    """Execute the results notebook on the records (papermill), into book/generated/."""
    import nbformat
    import papermill as pm

    output = root / "book" / "generated" / "results.ipynb"
    output.parent.mkdir(parents=True, exist_ok=True)
    os.environ.pop("MPLBACKEND", None)  # the kernel must draw inline figures
    pm.execute_notebook(str((notebook_dir or root / "notebooks") / "results.ipynb"), str(output),
                        parameters={"runs_dir": str(runs_dir or root / "book" / "runs")},
                        kernel_name="python3", progress_bar=False, cwd=str(root))
    nb = nbformat.read(output, as_version=4)
    for cell in nb.cells:  # readers need the tables, not the runs_dir plumbing
        tags = cell.metadata.get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
    nbformat.write(nb, output)
    return output


def build_html(root: Path = PROJECT_ROOT) -> Path:
    """Render with Jupyter Book; any Sphinx warning fails the build."""
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jupyter_book), "build", str(root), "--warningiserror",
           "--keep-going", "--all"]
    subprocess.run(cmd, check=True)
    return root / "_build" / "html" / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbutils.book", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT)
    parser.add_argument("--runs-dir", type=Path, default=None)
    parser.add_argument("--no-html", action="store_true", help="only the toc and results page")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    runs_dir = (args.runs_dir or root / "book" / "runs").resolve()
    print(f"table of contents: {write_toc(root, runs_dir, PROJECT_ROOT / 'notebooks')}")
    print(f"results page: {execute_results(root, runs_dir, PROJECT_ROOT / 'notebooks')}")
    if not args.no_html:
        try:
            index = build_html(root)
        except subprocess.CalledProcessError:
            print("book build failed (warnings count as errors); see the messages above",
                  file=sys.stderr)
            return 1
        print(f"\nThe book is at {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
