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

Faults: records are written atomically (a killed run leaves no record, never half of one), so
a sweep killed at any moment (even with SIGKILL) resumes with exactly the missing runs; the
pool's workers and their kernels die with the pipeline. A run set's ``timeout_s`` (or
``--timeout``) stops a run that hangs: its kernel is killed and the run is reported as a
timeout failure.

Where the runs execute: a local process pool (``--jobs``; with ``gpu: true`` run sets it
defaults to one run per visible GPU, each pinned with ``CUDA_VISIBLE_DEVICES``), or a Dask
distributed cluster (``--scheduler tcp://host:8786``, or ``--scheduler local:N`` to start N
local workers): one run per worker, a GPU run asks for the worker resource ``GPU=1``, and a
run whose worker dies is retried on another. Workers must see the same project and runs
folder (shared storage): executed notebooks and records land in the same tree either way.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
    timeout_s: float | None = None  # the run set's limit on one run's wall time
    gpu: bool = False  # the run asks for one GPU (a pinned device, or Dask's GPU=1 resource)

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
        unknown = set(sweep) - {"notebook", "tag", "classes", "seeds", "parameters", "note",
                                "timeout_s", "gpu"}
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
                                {**params, "normal_class": cls, "seed": seed, "profile": name},
                                timeout_s=sweep.get("timeout_s"), gpu=bool(sweep.get("gpu"))))
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
    their progress-bar redraws collapsed (:func:`join_streams`), its PNG figures stored with a
    256-colour palette (:func:`shrink_figures`), and every absolute path of this machine made
    relative to the project or the data root (:func:`nbutils.records.portable_notebook`)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    join_streams(nb)
    shrink_figures(nb)
    nbformat.write(nbformat.from_dict(portable_notebook(nb, roots)), path)


def palette_png(data: bytes, colours: int = 256) -> bytes:
    """The PNG ``data`` with at most ``colours`` colours (an indexed palette), or ``data``
    itself when that is not smaller. Matplotlib's antialiased figures hold tens of thousands
    of nearly equal colours; a palette stores them in about half the bytes and looks the same
    at the resolution a page shows them."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (UnidentifiedImageError, OSError):  # not a PNG after all: leave it as it is
        return data
    if image.mode in ("P", "L", "1"):
        return data
    rgba = image.convert("RGBA")
    if rgba.getextrema()[3][0] == 255:  # opaque: median cut on RGB keeps gradients best
        small = rgba.convert("RGB").quantize(colours)
    else:
        small = rgba.quantize(colours, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue() if out.tell() < len(data) else data


def shrink_figures(nb) -> None:
    """In place: every PNG output of the notebook re-encoded by :func:`palette_png`."""
    import base64

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if not png:
                continue
            raw = base64.b64decode(png if isinstance(png, str) else "".join(png))
            small = palette_png(raw)
            if small is not raw:
                out["data"]["image/png"] = base64.b64encode(small).decode("ascii")


def join_streams(nb) -> None:
    """In place, as Jupyter shows them: each code cell's adjacent stream outputs of one name are
    joined, and their progress-bar redraws collapsed (:func:`collapse_redraws`)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.outputs:
            previous = outputs[-1] if outputs else None
            if (out.output_type == "stream" and previous is not None
                    and previous.output_type == "stream" and previous.name == out.name):
                previous.text += out.text
            else:
                outputs.append(out)
        for out in outputs:
            if out.output_type == "stream":
                out.text = collapse_redraws(out.text)
        cell.outputs = outputs


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


def _kill_kernels(managers: list) -> None:
    """SIGKILL the kernels (and their children: a kernel leads its own process group)."""
    for km in managers:
        provisioner = getattr(km, "provisioner", None)
        pid = getattr(provisioner, "pid", None)
        pgid = getattr(provisioner, "pgid", None)
        try:
            if pgid and os.name == "posix":
                os.killpg(pgid, signal.SIGKILL)
            elif pid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def execute(job: Job, threads: int | None = None, timeout_s: float | None = None,
            skip_done: bool = False) -> Outcome:
    """Run one notebook with papermill; succeed only if it wrote a complete record. The page
    is tidied (:func:`tidy_page`), failed or not, and flagged when over ``PAGE_LIMIT_KB``.

    ``timeout_s`` (default: the job's run set's) bounds the run's wall time: past it the kernel
    is killed and the run fails as a timeout. ``skip_done`` returns at once when the record
    exists (a run retried by Dask after its first worker died having finished it)."""
    import papermill as pm

    if skip_done and job.is_done():
        return Outcome(job, True, 0.0, "already done")
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    os.environ["NBUTILS_SOURCE_NOTEBOOK"] = str(job.source)  # the kernel hashes it (code_sha)
    os.environ.pop("MPLBACKEND", None)  # a headless setting would hide the pages' figures
    job.output.parent.mkdir(parents=True, exist_ok=True)
    job.record.unlink(missing_ok=True)  # a stale record must not pass for this run's
    for tmp in job.record.parent.glob(f".{job.record.name}.*.tmp"):  # left by a killed writer
        tmp.unlink(missing_ok=True)
    timeout_s = timeout_s if timeout_s is not None else job.timeout_s
    started: list = []  # this run's kernel managers, for the watchdog

    class RunKernelManager(page_kernel_manager()):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            started.append(self)

    timed_out = threading.Event()

    def stop_run() -> None:
        timed_out.set()
        _kill_kernels(started)

    watchdog = threading.Timer(timeout_s, stop_run) if timeout_s else None
    start = time.perf_counter()
    try:
        if watchdog:
            watchdog.daemon = True
            watchdog.start()
        pm.execute_notebook(str(job.source), str(job.output),
                            parameters={**job.parameters,
                                        "record_path": _project_relative(job.record)},
                            kernel_name=KERNEL, progress_bar=False, cwd=str(PROJECT_ROOT),
                            kernel_manager_class=RunKernelManager)
    except Exception as err:  # the executed notebook is kept, with the error in it
        message = str(err).strip().splitlines()
        message = (message[-1] if message else type(err).__name__)[:300]
        if timed_out.is_set():
            message = f"timeout: stopped after {timeout_s:g} s (timeout_s), kernel killed"
        if job.output.exists():
            tidy_page(job.output)
        return Outcome(job, False, time.perf_counter() - start, message)
    finally:
        if watchdog:
            watchdog.cancel()
    tidy_page(job.output)
    if timed_out.is_set():  # killed as the last cell ended: the record may be missing
        job.record.unlink(missing_ok=True)
        return Outcome(job, False, time.perf_counter() - start,
                       f"timeout: stopped after {timeout_s:g} s (timeout_s), kernel killed")
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


def visible_gpus() -> list[str]:
    """The GPUs this machine shows (``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``),
    as the ids to put in ``CUDA_VISIBLE_DEVICES``; no torch import."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        return [] if not ids or ids[0].startswith("-") else ids
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, _ in enumerate(x for x in out.splitlines() if x.startswith("GPU "))]


def _pool_worker_init(gpu_ids) -> None:
    """Each pool worker dies with the pipeline (Linux: SIGKILL when its parent dies; its
    kernel then exits by itself, ipykernel watching its parent) and, with GPUs, takes one."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if gpu_ids is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids.get()


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


def _limit(job: Job, timeout_s: float | None) -> float | None:
    """A run's time limit: ``timeout_s`` if given (0: none), else its run set's."""
    return job.timeout_s if timeout_s is None else (timeout_s or None)


def _report(outcome: Outcome, bar) -> None:
    state = "ok" if outcome.ok else f"FAILED: {outcome.message}"
    bar.write(f"{outcome.job.name}: {state} ({outcome.seconds:.0f} s)")
    bar.update()


def _lost(job: Job, err: BaseException, start: float) -> Outcome:
    """A run whose process died under it (killed, out of memory) or that Dask gave up on."""
    text = (str(err).strip().splitlines() or [""])[-1]
    return Outcome(job, False, time.perf_counter() - start,
                   f"its worker died or failed: {type(err).__name__}: {text}"[:300])


def run(jobs: list[Job], n_jobs: int | None = 1, force: bool = False,
        scheduler: str | None = None, timeout_s: float | None = None,
        retries: int = 2) -> list[Outcome]:
    """Execute the jobs that are not done yet (all with ``force``), ``n_jobs`` at a time in a
    local process pool, or on a Dask cluster (``scheduler``: ``tcp://host:port`` or
    ``local:N``). ``n_jobs=None``: one per visible GPU when a run asks for a GPU, else 1.
    ``timeout_s`` overrides the run sets' limits (0: none)."""
    from tqdm.auto import tqdm

    todo = [j for j in jobs if force or not j.is_done()]
    skipped = len(jobs) - len(todo)
    if skipped:
        print(f"{skipped} of {len(jobs)} runs already have records: skipped (--force reruns)")
    if not todo:
        return []
    outcomes: list[Outcome] = []
    bar = tqdm(total=len(todo), desc="runs", unit="run")
    start, interrupted = time.perf_counter(), False
    try:
        if scheduler:
            _run_dask(todo, scheduler, force, timeout_s, retries, outcomes, bar)
        else:
            _run_pool(todo, n_jobs, timeout_s, outcomes, bar)
    except KeyboardInterrupt:
        interrupted = True
        bar.write("interrupted: finished runs keep their records; rerun to do the rest")
        raise
    finally:
        bar.close()
        log_sweep(outcomes, time.perf_counter() - start, skipped,
                  f"dask {scheduler}" if scheduler else f"pool of {n_jobs or 'auto'}", interrupted)
    return outcomes


SWEEP_LOG = "sweeps.jsonl"  # <runs-dir>/<profile>/sweeps.jsonl: one line per sweep


def log_sweep(outcomes: list[Outcome], wall_s: float, skipped: int, where: str,
              interrupted: bool = False) -> list[Path]:
    """Append the sweep's wall time and each run's time and state to the profile's
    ``sweeps.jsonl`` (beside the chapters' folders; not a record, the book skips it): what a
    reproduction costs, with the pipeline's overhead (kernel start, tidying) included."""
    import datetime as dt
    import json
    import platform

    by_profile: dict[Path, list[Outcome]] = {}
    for outcome in outcomes:  # <runs>/<profile>/<notebook>/<run set>/<run>.ipynb
        by_profile.setdefault(outcome.job.output.parents[2], []).append(outcome)
    written = []
    for folder, done in by_profile.items():
        line = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "host": platform.node(), "where": where, "gpus": visible_gpus(),
                "wall_s": round(wall_s, 1), "skipped": skipped, "interrupted": interrupted,
                "runs": [{"run": o.job.name, "ok": o.ok, "seconds": round(o.seconds, 1),
                          **({"message": portable_paths(o.message)} if o.message else {})}
                         for o in done]}
        try:
            with open(folder / SWEEP_LOG, "a") as log:
                log.write(json.dumps(line) + "\n")
            written.append(folder / SWEEP_LOG)
        except OSError:
            pass
    return written


def _run_pool(todo: list[Job], n_jobs: int | None, timeout_s, outcomes, bar) -> None:
    gpus = visible_gpus() if any(j.gpu for j in todo) else []
    if n_jobs is None:
        n_jobs = max(1, len(gpus))
    if warning := busy_cpu_warning(n_jobs):
        print(warning, file=sys.stderr)
    threads = max(1, (os.cpu_count() or 1) // max(1, n_jobs))
    gpu_ids = None
    if gpus:  # one GPU per worker (round robin when there are more workers than GPUs)
        if n_jobs > len(gpus):
            bar.write(f"warning: {n_jobs} jobs share {len(gpus)} GPU(s)")
        gpu_ids = multiprocessing.Queue()
        for i in range(n_jobs):
            gpu_ids.put(gpus[i % len(gpus)])
        bar.write(f"{n_jobs} job(s), pinned to GPU(s) {', '.join(gpus[:n_jobs])}")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, n_jobs), initializer=_pool_worker_init,
                             initargs=(gpu_ids,)) as pool:
        futures = {pool.submit(execute, job, threads, _limit(job, timeout_s)): job
                   for job in todo}
        try:
            for future in as_completed(futures):
                try:
                    outcome = future.result()
                except Exception as err:  # a worker killed under its run breaks the pool
                    outcome = _lost(futures[future], err, start)
                outcomes.append(outcome)
                _report(outcome, bar)
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            raise


def dask_local_cluster(n_workers: int, threads: int | None = None):
    """``n_workers`` local Dask workers (each its own process under a nanny, one run at a
    time, no memory limit); with GPUs, each worker has one (``CUDA_VISIBLE_DEVICES``) and
    offers the resource ``GPU=1``."""
    import logging

    # the workers are started with this environment: only their warnings and errors are shown
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    from distributed import Nanny, Scheduler, SpecCluster

    gpus = visible_gpus()
    workers = {}
    for i in range(n_workers):
        env = {var: str(threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if threads}
        options = {"nthreads": 1, "memory_limit": 0, "env": env}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            options["resources"] = {"GPU": 1}
        workers[f"run-worker-{i}"] = {"cls": Nanny, "options": options}
    return SpecCluster(workers=workers, silence_logs=logging.WARNING,
                       scheduler={"cls": Scheduler,
                                  "options": {"host": "127.0.0.1", "port": 0,
                                              "dashboard": False, "dashboard_address": ":0"}})


def _run_dask(todo: list[Job], scheduler: str, force: bool, timeout_s, retries: int,
              outcomes, bar) -> None:
    """Hand the runs to a Dask cluster: one future per run, never merged with an identical
    one (``pure=False``), a GPU run asking for ``GPU=1``; a run whose worker dies is
    rescheduled by Dask on another worker (``distributed.scheduler.allowed-failures``), an
    error raised outside the notebook is retried ``retries`` times."""
    try:
        from distributed import Client
        from distributed import as_completed as dask_completed
    except ImportError as err:
        raise PipelineError("--scheduler needs Dask: pip install 'distributed'") from err
    cluster = None
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError as err:
            raise PipelineError(f"--scheduler local:N takes a number, not {scheduler!r}") from err
        cluster = dask_local_cluster(n, max(1, (os.cpu_count() or 1) // max(1, n)))
        client = Client(cluster)
        client.wait_for_workers(n, timeout=300)
    else:
        try:
            client = Client(scheduler, timeout=60)
        except (OSError, TimeoutError, ValueError) as err:
            raise PipelineError(f"cannot reach the Dask scheduler at {scheduler!r}: {err}") from err
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        has_gpu = any((w.get("resources") or {}).get("GPU") for w in workers.values())
        if any(j.gpu for j in todo) and not has_gpu:
            bar.write("warning: no Dask worker offers the resource GPU; GPU runs go to any worker "
                      "(start workers with --resources GPU=1)")
        bar.write(f"Dask scheduler {client.scheduler.address}: {len(workers)} worker(s)")
        start = time.perf_counter()
        futures = {}
        for job in todo:
            future = client.submit(execute, job, None, _limit(job, timeout_s), not force,
                                   pure=False, retries=retries, key=f"run-{job.name}-{os.urandom(4).hex()}",
                                   resources={"GPU": 1} if job.gpu and has_gpu else None)
            futures[future] = job
        try:
            for future in dask_completed(list(futures)):
                try:
                    outcome = future.result()
                except Exception as err:  # KilledWorker: its workers kept dying
                    outcome = _lost(futures[future], err, start)
                outcomes.append(outcome)
                _report(outcome, bar)
        except KeyboardInterrupt:
            client.cancel(list(futures))
            raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def summarise(outcomes: list[Outcome]) -> str:
    failed = [o for o in outcomes if not o.ok]
    lines = [f"{len(outcomes) - len(failed)} succeeded, {len(failed)} failed"
             + (f" (run times in {outcomes[0].job.output.parents[2] / SWEEP_LOG})"
                if outcomes else "")]
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
    parser.add_argument("--jobs", type=int, default=None,
                        help="notebooks executed at once, each with (CPU cores / jobs) threads "
                             "(default 1; with GPU runs, one per visible GPU, each pinned); "
                             "run parallel work from one pipeline: two pipelines on the same "
                             "cores oversubscribe them and can train many times slower")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run on a Dask cluster instead of a local pool: tcp://host:8786 "
                             "(workers started with --nthreads 1 [--resources GPU=1]) or "
                             "local:N (N local workers); needs shared storage for the runs")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a run after this many seconds (overrides the run sets' "
                             "timeout_s; 0: no limit)")
    parser.add_argument("--gpu", action="store_true",
                        help="every run asks for one GPU (as a run set's 'gpu: true' does)")
    parser.add_argument("--retries", type=int, default=2, help=argparse.SUPPRESS)
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
    if args.gpu:
        for job in jobs:
            job.gpu = True
    if args.timeout is not None:
        for job in jobs:
            job.timeout_s = args.timeout or None
    if args.list:
        for job in jobs:
            print(f"{'done' if job.is_done() else 'todo'}  {job.name}  -> {job.output}")
        return 0
    if args.scheduler and args.jobs:
        print("error: --jobs is for the local pool; a Dask cluster runs one run per worker",
              file=sys.stderr)
        return 2
    try:
        outcomes = run(jobs, args.jobs, args.force, args.scheduler, retries=args.retries)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summarise(outcomes))
    return 1 if any(not o.ok for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
