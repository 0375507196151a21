"""Execute chapter notebooks once per class and seed with papermill, resumably.

    python -m nbutils.pipeline --profile quick                  # every chapter, every class
    python -m nbutils.pipeline --profile paper --notebook gradcon --classes 4 --seeds 0 1 2
    python -m nbutils.pipeline --profile quick --list           # what would run, what is done

A profile is a name declared in the chapter manifest (``nbutils/chapters.yml``: each chapter's
run sets per profile) or a path to a YAML file of your own with a ``sweeps`` list; a sweep
names a notebook, its parameters, the classes and the seeds. Each run writes an executed
notebook and its run record to
``<runs-dir>/<profile>/<notebook>/<dataset>[-<tag>]/class<k>_seed<s>.{ipynb,json}``, so
profiles never mix. A run whose record exists is skipped (``--force`` reruns it); a failed
run keeps its executed notebook for inspection, the others go on, and the command exits 1.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nbutils.chapters import ManifestError, load_manifest
from nbutils.config import PROJECT_ROOT, portable_paths
from nbutils.data import dataset_info, resolve_class
from nbutils.records import is_complete_record, portable_notebook, read_record

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
DEFAULT_RUNS_DIR = PROJECT_ROOT / "book" / "runs"
KERNEL = "python3"  # ipykernel's own kernel: the Python that runs the pipeline
PAGE_LIMIT_KB = 400  # a newly executed page larger than this is flagged in the summary


class PipelineError(ValueError):
    """A bad profile, notebook or option."""


@dataclass
class Job:
    notebook: str
    source: Path
    output: Path
    record: Path
    parameters: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.notebook}/{self.output.parent.name}/{self.output.stem}"

    def is_done(self) -> bool:
        return is_complete_record(self.record)


@dataclass
class Outcome:
    job: Job
    ok: bool
    seconds: float
    message: str = ""
    warnings: list[str] = field(default_factory=list)


def available_profiles(manifest: Path | None = None) -> list[str]:
    """The profiles the chapter manifest declares (smoke, quick, paper)."""
    return list(load_manifest(manifest).profiles)


def load_profile(profile: str, manifest: Path | None = None) -> tuple[str, dict]:
    """A profile by name (``quick``, ``paper``, ...: the manifest's run sets of every chapter)
    or by path to a YAML file with a ``sweeps`` list. A manifest profile's spec has
    ``from_manifest: True``: its sweeps of chapters without a notebook are not planned."""
    path = Path(profile)
    if not (path.suffix in (".yml", ".yaml") and path.exists()):
        try:
            chapters = load_manifest(manifest)
        except ManifestError as err:
            raise PipelineError(str(err)) from err
        if profile not in chapters.profiles:
            raise PipelineError(f"unknown profile {profile!r}; known: "
                                f"{', '.join(chapters.profiles)} (or a path to a .yml file)")
        return profile, {"description": chapters.profiles[profile], "from_manifest": True,
                         "sweeps": chapters.profile_sweeps(profile)}
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec.get("sweeps"), list):
        raise PipelineError(f"profile {path} has no 'sweeps' list")
    for sweep in spec["sweeps"]:
        unknown = set(sweep) - {"notebook", "tag", "classes", "seeds", "parameters", "note"}
        if unknown or "notebook" not in sweep:
            raise PipelineError(f"profile {path}: bad sweep {sweep} (unknown keys {unknown})")
    return path.stem, spec


def _notebook_source(name: str, notebook_dir: Path) -> Path:
    source = notebook_dir / f"{name}.ipynb"
    if not source.exists():
        known = ", ".join(sorted(p.stem for p in notebook_dir.glob("*.ipynb")))
        raise PipelineError(f"unknown notebook {name!r}; known: {known}")
    return source


def _classes(spec, dataset: str) -> list[int]:
    if spec in (None, "all"):
        return list(range(len(dataset_info(dataset).class_names)))
    return [resolve_class(dataset, c) for c in (spec if isinstance(spec, list) else [spec])]


def plan(profile: str, runs_dir: Path = DEFAULT_RUNS_DIR, notebooks: list[str] | None = None,
         classes: list | None = None, seeds: list[int] | None = None,
         overrides: dict | None = None, notebook_dir: Path = NOTEBOOK_DIR,
         tags: list[str] | None = None, manifest: Path | None = None) -> list[Job]:
    """Expand a profile into jobs (filtered by notebook, sweep tag, class and seed). A
    manifest profile leaves out the chapters whose notebook is not in ``notebook_dir``."""
    name, spec = load_profile(profile, manifest)
    if spec.get("from_manifest"):
        spec["sweeps"] = [s for s in spec["sweeps"]
                          if (Path(notebook_dir) / f"{s['notebook']}.ipynb").exists()]
    if notebooks:
        known = {s.get("notebook") for s in spec["sweeps"]}
        for nb in notebooks:
            _notebook_source(nb, notebook_dir)  # unknown notebook: clear error
            if nb not in known:
                raise PipelineError(f"profile {name!r} has no sweep for notebook {nb!r}")
    jobs: list[Job] = []
    for sweep in spec["sweeps"]:
        nb = sweep["notebook"]
        if notebooks and nb not in notebooks or tags and sweep.get("tag", "") not in tags:
            continue
        params = {**(sweep.get("parameters") or {}), **(overrides or {})}
        dataset = params.get("dataset")
        if dataset is None:
            raise PipelineError(f"sweep for {nb} in profile {name!r} sets no 'dataset'")
        source = _notebook_source(nb, notebook_dir)
        folder = runs_dir / name / nb / (dataset + (f"-{sweep['tag']}" if sweep.get("tag") else ""))
        wanted = _classes(sweep.get("classes", "all"), dataset)
        if classes is not None:
            chosen = {resolve_class(dataset, c) for c in classes}
            wanted = [c for c in wanted if c in chosen]
        for cls in wanted:
            for seed in sweep.get("seeds", [0]):
                if seeds is not None and seed not in seeds:
                    continue
                stem = f"class{cls}_seed{seed}"
                jobs.append(Job(nb, source, folder / f"{stem}.ipynb", folder / f"{stem}.json",
                                {**params, "normal_class": cls, "seed": seed, "profile": name}))
    outputs = [j.output for j in jobs]
    if len(set(outputs)) != len(outputs):
        raise PipelineError(f"profile {name!r} maps two runs to one output; give sweeps a 'tag'")
    return jobs


def provenance_markdown(record: dict) -> str:
    """The note every executed page opens with: which run produced it."""
    data = record.get("data", {})
    seconds = sum(v for v in record["timings"].values() if isinstance(v, (int, float)))
    return (
        "```{admonition} Provenance of this page\n:class: note\n"
        f"Profile **{record['profile']}** · data **{record['dataset']}** "
        f"({portable_paths(data.get('source', 'see record'))}) · "
        f"normal class **{record['normal_class']}** · "
        f"protocol {record['protocol']} · seed **{record['seed']}** · "
        f"device **{record['device']}** · run {record['date']} · commit `{record['git_commit']}` "
        f"(code `{record.get('code_sha', '?')}`) "
        f"· timed phases {seconds:.1f} s. Executed by papermill from the source notebook; the "
        "numbers below come from that run and its record.\n```")


def add_provenance(notebook_path: Path, record: dict) -> None:
    """Name the run in the page title and insert the provenance note below it."""
    import nbformat

    nb = nbformat.read(notebook_path, as_version=4)
    suffix = (f" — {record['dataset']} class {record['normal_class']}, seed {record['seed']}"
              f" ({record['profile']})")
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("# "):
            first, _, rest = cell.source.lstrip().partition("\n")
            cell.source = first + suffix + ("\n" + rest if rest else "")
            nb.cells.insert(index + 1, nbformat.v4.new_markdown_cell(
                provenance_markdown(record), metadata={"tags": ["provenance"]}))
            break
    nbformat.write(nb, notebook_path)


def collapse_redraws(text: str) -> str:
    """A stream as a terminal leaves it: a carriage return redraws its line (a progress bar's
    updates), so only the last state of each line is kept, overlaid as JupyterLab shows it."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown)
    return "\n".join(lines)


def tidy_page(path: Path, roots: dict[str, str] | None = None) -> None:
    """Make an executed page fit to publish: adjacent stream outputs of a cell are joined and
    their progress-bar redraws collapsed (:func:`collapse_redraws`), and every absolute path of
    this machine becomes relative to the project or the data root
    (:func:`nbutils.records.portable_notebook`)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        outputs = []
        for out in cell.get("outputs", []):
            previous = outputs[-1] if outputs else None
            if (out.output_type == "stream" and previous is not None
                    and previous.output_type == "stream" and previous.name == out.name):
                previous.text += out.text
            else:
                outputs.append(out)
        for out in outputs:
            if out.output_type == "stream":
                out.text = collapse_redraws(out.text)
        if cell.cell_type == "code":
            cell.outputs = outputs
    nbformat.write(nbformat.from_dict(portable_notebook(nb, roots)), path)


@functools.cache
def page_kernel_manager():
    """The kernel manager each page's kernel is started with. It differs from jupyter_client's
    default in two ways, each removing at its source a line every run used to log:

    * the kernel listens on IPC sockets (files in a private temporary folder) instead of TCP
      ports on localhost, so ipykernel has no cause to warn "Kernel is running over TCP without
      encryption" (on Windows, which lacks them, it stays on TCP);
    * it is stopped by a shutdown request alone. jupyter_client first interrupts (SIGINT) a
      kernel it shuts down; a kernel still finishing a message (after a cell raised it aborts its
      queue) then logs "KeyboardInterrupt caught in kernel". nbclient shuts a kernel down when
      the notebook is done, and a kernel that does not stop in time is still killed; interrupts
      at other times (an execution timeout) are sent as before.
    """
    from jupyter_client.manager import AsyncKernelManager

    class PageKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._socket_dir = None
            if os.name == "posix":
                self._socket_dir = tempfile.mkdtemp(prefix="nbutils-kernel-")
                self.transport = "ipc"
                self.ip = os.path.join(self._socket_dir, "kernel")

        async def _async_interrupt_kernel(self) -> None:
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if self._socket_dir and not restart:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    return PageKernelManager


def _project_relative(path: Path) -> str:
    """A path as the kernel (started in the project root) and a published page name it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:  # a runs folder outside the project: only an absolute path finds it
        return str(path)


def execute(job: Job, threads: int | None = None) -> Outcome:
    """Run one notebook with papermill; succeed only if it wrote a complete record. The page
    is tidied (:func:`tidy_page`), failed or not, and flagged when over ``PAGE_LIMIT_KB``."""
    import papermill as pm

    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    os.environ["NBUTILS_SOURCE_NOTEBOOK"] = str(job.source)  # the kernel hashes it (code_sha)
    os.environ.pop("MPLBACKEND", None)  # a headless setting would hide the pages' figures
    job.output.parent.mkdir(parents=True, exist_ok=True)
    job.record.unlink(missing_ok=True)  # a stale record must not pass for this run's
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(job.source), str(job.output),
                            parameters={**job.parameters,
                                        "record_path": _project_relative(job.record)},
                            kernel_name=KERNEL, progress_bar=False, cwd=str(PROJECT_ROOT),
                            kernel_manager_class=page_kernel_manager())
    except Exception as err:  # the executed notebook is kept, with the error in it
        message = str(err).strip().splitlines()
        if job.output.exists():
            tidy_page(job.output)
        return Outcome(job, False, time.perf_counter() - start,
                       (message[-1] if message else type(err).__name__)[:300])
    tidy_page(job.output)
    if not is_complete_record(job.record):
        return Outcome(job, False, time.perf_counter() - start,
                       f"notebook finished but wrote no complete record at {job.record}")
    add_provenance(job.output, read_record(job.record))
    outcome = Outcome(job, True, time.perf_counter() - start)
    size_kb = job.output.stat().st_size / 1000
    if size_kb > PAGE_LIMIT_KB:
        outcome.warnings.append(
            f"page {job.name} is {size_kb:.0f} KB (over {PAGE_LIMIT_KB} KB): make its figures "
            "smaller (size, dpi) or print less; large pages make the book slow to build and read")
    return outcome


def busy_cpu_warning(n_jobs: int) -> str | None:
    """A warning when the CPU already carries about a full load before these jobs start:
    another pipeline or training would share the cores and every run would slow down."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]  # one-minute average of runnable processes
    except (AttributeError, OSError):  # not available on this platform
        return None
    if load < cores - 0.5:
        return None
    return (f"warning: the CPU is already busy (load {load:.1f} on {cores} cores) before these "
            f"{n_jobs} job(s) start; if another pipeline or training is running, every run will "
            "be slower. Run parallel work from one pipeline with --jobs.")


def run(jobs: list[Job], n_jobs: int = 1, force: bool = False) -> list[Outcome]:
    """Execute the jobs that are not done yet (all with ``force``), ``n_jobs`` at a time."""
    from tqdm.auto import tqdm

    todo = [j for j in jobs if force or not j.is_done()]
    skipped = len(jobs) - len(todo)
    if skipped:
        print(f"{skipped} of {len(jobs)} runs already have records: skipped (--force reruns)")
    if not todo:
        return []
    if warning := busy_cpu_warning(n_jobs):
        print(warning, file=sys.stderr)
    threads = max(1, (os.cpu_count() or 1) // max(1, n_jobs))
    outcomes: list[Outcome] = []
    bar = tqdm(total=len(todo), desc="runs", unit="run")
    with ProcessPoolExecutor(max_workers=max(1, n_jobs)) as pool:
        futures = {pool.submit(execute, job, threads): job for job in todo}
        try:
            for future in as_completed(futures):
                outcome = future.result()
                outcomes.append(outcome)
                state = "ok" if outcome.ok else f"FAILED: {outcome.message}"
                bar.write(f"{outcome.job.name}: {state} ({outcome.seconds:.0f} s)")
                bar.update()
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            bar.write("interrupted: finished runs keep their records; rerun to do the rest")
            raise
        finally:
            bar.close()
    return outcomes


def summarise(outcomes: list[Outcome]) -> str:
    failed = [o for o in outcomes if not o.ok]
    lines = [f"{len(outcomes) - len(failed)} succeeded, {len(failed)} failed"]
    lines += [f"  FAILED {o.job.name}: {o.message}\n    see {o.job.output}" for o in failed]
    lines += [f"  warning: {w}" for o in outcomes for w in o.warnings]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbutils.pipeline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="quick",
                        help=f"profile name ({', '.join(available_profiles())}: each chapter's "
                             "run sets in nbutils/chapters.yml) or the path of a YAML file "
                             "with your own 'sweeps'")
    parser.add_argument("--notebook", nargs="+", help="only these notebooks")
    parser.add_argument("--tag", nargs="+", help="only the sweeps with these tags")
    parser.add_argument("--classes", nargs="+", help="only these classes (index or name)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"), help="override a notebook parameter")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks executed at once, each with (CPU cores / jobs) threads; "
                             "run parallel work from one pipeline: two pipelines on the same "
                             "cores oversubscribe them and can train many times slower")
    parser.add_argument("--force", action="store_true", help="rerun runs that have records")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    parser.add_argument("--notebook-dir", type=Path, default=NOTEBOOK_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--list", action="store_true", help="show the plan and exit")
    args = parser.parse_args(argv)
    try:
        jobs = plan(args.profile, args.runs_dir, args.notebook, args.classes, args.seeds,
                    {k: yaml.safe_load(v) for k, v in args.parameter}, args.notebook_dir, args.tag,
                    args.manifest)
    except (PipelineError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        for job in jobs:
            print(f"{'done' if job.is_done() else 'todo'}  {job.name}  -> {job.output}")
        return 0
    outcomes = run(jobs, args.jobs, args.force)
    print(summarise(outcomes))
    return 1 if any(not o.ok for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
