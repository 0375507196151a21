"""Progress bars that suit where the code runs.

    from nbutils.progress import tqdm, trange

* in a terminal (scripts, the pipeline): tqdm's text bars, as usual;
* in Jupyter with ipywidgets installed: tqdm's widget bars (``tqdm.auto``);
* in a kernel without widgets, which is how papermill executes the book's pages: plain text bars
  on stdout that redraw at most once every ``PAGE_MININTERVAL`` seconds, so an executed page keeps
  a few lines of progress instead of thousands, and shows no "IProgress not found" warning.
"""

from __future__ import annotations

import functools
import importlib.util
import sys

PAGE_MININTERVAL = 30.0  # seconds between redraws of a bar inside an executed page


def _in_kernel() -> bool:
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _choose():
    if not _in_kernel():
        from tqdm.std import tqdm as bar
        return bar
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as bar
        return bar
    from tqdm.std import tqdm as text_bar
    return functools.partial(text_bar, file=sys.stdout, mininterval=PAGE_MININTERVAL,
                             ncols=100, ascii=True)


def tqdm(*args, **kwargs):
    """``tqdm.tqdm`` for this environment (see the module's docstring)."""
    return _choose()(*args, **kwargs)


def trange(*range_args, **kwargs):
    """``tqdm(range(*range_args), **kwargs)`` for this environment."""
    return tqdm(range(*range_args), **kwargs)
