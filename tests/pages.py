"""Helpers for tests that execute a results page and read what it printed."""
from pathlib import Path

import nbformat


def output_text(notebook: Path) -> str:
    """Every output of an executed notebook as one text: its Markdown, plain text, HTML and
    streams, so an assertion finds a sentence whichever way the page displayed it."""
    return "\n".join(str(o.get("data", {}).get(kind, "")) + str(o.get("text", ""))
                     for kind in ("text/markdown", "text/plain", "text/html")
                     for c in nbformat.read(notebook, as_version=4).cells
                     for o in c.get("outputs", []))
