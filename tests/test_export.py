"""The method modules are what the chapter notebooks export (nbdev), never edited by hand."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat

from nbutils import export
from nbutils.config import PROJECT_ROOT


def _chapter(tmp_path: Path, body: str) -> tuple[Path, Path]:
    notebooks, lib = tmp_path / "notebooks", tmp_path / "nbutils"
    notebooks.mkdir()
    lib.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter"),
                nbformat.v4.new_code_cell("#| default_exp methods.toy"),
                nbformat.v4.new_code_cell(f"#| export\n{body}"),
                nbformat.v4.new_code_cell("print(double(2))  # not exported")]
    nbformat.write(nb, notebooks / "toy.ipynb")
    return notebooks, lib


def test_export_writes_marked_cells_only_and_detects_staleness(tmp_path):
    notebooks, lib = _chapter(tmp_path, "def double(x: int) -> int:\n    return 2 * x")
    assert export.export(notebooks, lib) == ["methods/toy.py"]
    text = (lib / "methods" / "toy.py").read_text()
    assert text.startswith(export.GENERATED_MARK) and "../../notebooks/toy.ipynb" in text
    assert "def double" in text and "print(double(2))" not in text
    assert export.stale_modules(notebooks, lib) == []
    # the notebook changes: the module is stale until exported again
    nb = json.loads((notebooks / "toy.ipynb").read_text())
    nb["cells"][2]["source"] = "#| export\ndef double(x: int) -> int:\n    return x + x"
    (notebooks / "toy.ipynb").write_text(json.dumps(nb))
    assert export.stale_modules(notebooks, lib) == ["methods/toy.py"]
    export.export(notebooks, lib)
    assert export.stale_modules(notebooks, lib) == []
    # a hand edit of the module is stale too
    (lib / "methods" / "toy.py").write_text(text + "x = 1\n")
    assert export.stale_modules(notebooks, lib) == ["methods/toy.py"]


def test_the_projects_method_modules_are_fresh():
    stale = export.stale_modules()
    assert not stale, f"run `make export`: {stale} differ from their notebooks"
    assert export.exporting_notebooks(), "no chapter exports a module"


def test_generated_modules_use_no_notebook_globals():
    """ruff's undefined-name check (F821) on the generated modules: an exported function that
    reads a notebook global (``seed``, ``lr``, ``variant``...) fails here."""
    ruff = Path(sys.executable).with_name("ruff")
    modules = [str(PROJECT_ROOT / "nbutils" / m) for m in export.generated_modules()]
    assert modules
    result = subprocess.run([str(ruff), "check", "--select", "F821,F822,F823", "--no-cache",
                             *modules], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
