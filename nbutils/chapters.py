"""The chapter manifest (``nbutils/chapters.yml``): which chapters the book has and how they run.

The pipeline's profiles, the table of contents, the run-set pages and the results pages are
derived from it. A chapter is *present* when its notebook exists; an absent one appears nowhere.

    from nbutils.chapters import load_manifest
    manifest = load_manifest()
    [c.notebook for c in manifest.present()]          # the chapters the book has
    manifest.profile_sweeps("quick")                  # what `--profile quick` runs
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nbutils.config import PROJECT_ROOT

MANIFEST_FILE = Path(__file__).with_name("chapters.yml")
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
CHAPTER_KEYS = {"notebook", "title", "page", "reference", "results", "metrics", "runs"}
SWEEP_KEYS = {"tag", "classes", "seeds", "parameters", "note", "timeout_s", "gpu"}


class ManifestError(ValueError):
    """A malformed chapter manifest."""


@dataclass(frozen=True)
class Metric:
    key: str                 # the name in the run records' ``metrics``
    label: str               # what the pages call it, in words
    reference: str | None = None  # the metric of nbutils/reference.json set beside it


@dataclass
class Chapter:
    notebook: str
    title: str
    page: str
    reference: str | None = None
    results: str | None = None
    metrics: list[Metric] = field(default_factory=list)
    runs: dict[str, list[dict]] = field(default_factory=dict)

    def exists(self, notebook_dir: Path = NOTEBOOK_DIR) -> bool:
        return (Path(notebook_dir) / f"{self.notebook}.ipynb").exists()

    def label(self, metric: str) -> str:
        """A metric's label in words; an undeclared metric keeps its record name."""
        return next((m.label for m in self.metrics if m.key == metric), metric)

    def sweep_for(self, profile: str, run_set: str) -> dict | None:
        """The manifest's sweep that writes the run set ``run_set`` of ``profile``."""
        return next((s for s in self.runs.get(profile, []) if run_set_name(s) == run_set), None)


@dataclass
class Manifest:
    path: Path
    profiles: dict[str, str]
    chapters: list[Chapter]

    def present(self, notebook_dir: Path = NOTEBOOK_DIR) -> list[Chapter]:
        """The chapters whose notebook exists, in reading order."""
        return [c for c in self.chapters if c.exists(notebook_dir)]

    def chapter(self, notebook: str) -> Chapter | None:
        return next((c for c in self.chapters if c.notebook == notebook), None)

    def profile_sweeps(self, profile: str) -> list[dict]:
        """Every chapter's run sets for ``profile``, each as a sweep naming its notebook."""
        return [{"notebook": c.notebook, **sweep}
                for c in self.chapters for sweep in c.runs.get(profile, [])]


def run_set_name(sweep: dict) -> str:
    """A run set's folder: ``<dataset>`` or ``<dataset>-<tag>``."""
    dataset = (sweep.get("parameters") or {}).get("dataset", "")
    return dataset + (f"-{sweep['tag']}" if sweep.get("tag") else "")


def _metric(key: str, spec, where: str) -> Metric:
    if isinstance(spec, str):
        return Metric(key, spec)
    if isinstance(spec, dict) and set(spec) <= {"label", "reference"} and "label" in spec:
        return Metric(key, str(spec["label"]), spec.get("reference"))
    raise ManifestError(f"{where}: metric {key!r} needs a label (a string, or "
                        "{label: ..., reference: ...})")


def _chapter(entry: dict, profiles: dict, where: str) -> Chapter:
    if not isinstance(entry, dict) or "notebook" not in entry:
        raise ManifestError(f"{where}: every chapter needs a 'notebook'")
    name = entry["notebook"]
    where = f"{where}, chapter {name!r}"
    unknown = set(entry) - CHAPTER_KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(CHAPTER_KEYS)}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ManifestError(f"{where}: a notebook name is letters, digits and '_'")
    runs = entry.get("runs") or {}
    for profile, sweeps in runs.items():
        if profile not in profiles:
            raise ManifestError(f"{where}: run sets for undeclared profile {profile!r} "
                                f"(declared: {', '.join(profiles)})")
        if not isinstance(sweeps, list):
            raise ManifestError(f"{where}: runs.{profile} must be a list of run sets")
        for sweep in sweeps:
            bad = set(sweep) - SWEEP_KEYS if isinstance(sweep, dict) else {"<not a mapping>"}
            if bad:
                raise ManifestError(f"{where}: bad run set {sweep} (unknown keys {sorted(bad)})")
        names = [run_set_name(s) for s in sweeps]
        if len(set(names)) != len(names):
            raise ManifestError(f"{where}: two run sets of profile {profile!r} share a folder; "
                                "give them distinct tags")
    metrics = entry.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ManifestError(f"{where}: 'metrics' maps record metric names to labels")
    return Chapter(notebook=name, title=str(entry.get("title") or name),
                   page=entry.get("page") or f"book/chapters/{name}",
                   reference=entry.get("reference"), results=entry.get("results"),
                   metrics=[_metric(k, v, where) for k, v in metrics.items()], runs=runs)


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Read and check the manifest (``nbutils/chapters.yml`` unless ``path`` is given)."""
    path = Path(path) if path else MANIFEST_FILE
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ManifestError(f"cannot read the chapter manifest {path}: {err}") from err
    profiles = spec.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ManifestError(f"{path}: 'profiles' maps each profile name to a description")
    chapters = [_chapter(entry, profiles, str(path)) for entry in spec.get("chapters") or []]
    names = [c.notebook for c in chapters]
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: a notebook is declared twice")
    return Manifest(path, {k: str(v) for k, v in profiles.items()}, chapters)
