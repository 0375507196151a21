"""Every chapter executes through papermill (smoke profile) and the book builds with -W; the
table of contents, the run-set pages and the results pages follow the chapter manifest."""

import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml
from pages import output_text

from nbutils import book, pipeline
from nbutils.chapters import load_manifest
from nbutils.config import PROJECT_ROOT
from nbutils.records import make_record, read_record, write_record

NOTEBOOKS = sorted(p for p in (PROJECT_ROOT / "notebooks").glob("*.ipynb"))
MANIFEST = load_manifest()
CHAPTERS = [c.notebook for c in MANIFEST.present()]
RESULTS = [*book.BOOK_RESULTS] + [c.results for c in MANIFEST.present() if c.results]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_source_notebook_is_clean_and_parameterised(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit without outputs"
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


def test_every_notebook_is_a_chapter_or_a_results_page_of_the_manifest():
    assert {p.stem for p in NOTEBOOKS} == set(CHAPTERS) | set(RESULTS)
    for chapter in MANIFEST.present():
        assert (PROJECT_ROOT / f"{chapter.page}.md").exists(), chapter.page


def test_manifest_reference_keys_name_published_numbers():
    from nbutils.reference import load_reference

    published = {(r["method"], r["metric"]) for r in load_reference()["results"]}
    for chapter in MANIFEST.chapters:
        if chapter.reference:
            assert chapter.reference in {m for m, _ in published}, chapter.notebook
        for metric in chapter.metrics:
            if metric.reference:
                assert (chapter.reference, metric.reference) in published, (chapter.notebook,
                                                                             metric.key)


# --- the book's structure from a manifest, without Sphinx ------------------------------------

TINY_MANIFEST = """
profiles:
  quick: quick runs
chapters:
  - notebook: baselines
    title: Tiny baselines
    metrics:
      auroc.knn: k-NN distance
      au_pro: AU-PRO, defect regions
    runs:
      quick:
        - tag: t
          note: two classes, two seeds
          classes: [0, 1]
          seeds: [0, 1]
          parameters: {dataset: digits}
  - notebook: not_written_yet
    title: A chapter without a notebook
    runs:
      quick:
        - classes: [0]
          parameters: {dataset: digits}
"""


def _fake_run(runs_dir: Path, notebook: str, run_set: str, cls: int, seed: int,
              metrics: dict, dataset: str = "digits", profile: str = "quick",
              params: dict | None = None, extra: dict | None = None,
              data: dict | None = None, timings: dict | None = None,
              device: str = "cpu: test") -> Path:
    folder = runs_dir / profile / notebook / run_set
    record = make_record(method=notebook, variant="v", dataset=dataset, normal_class=cls,
                         protocol="full", seed=seed, profile=profile,
                         params=params or {"epochs": 3}, metrics=metrics, timings=timings or {"s": 1.0},
                         device=device,
                         data=data or {"source": "digits: /home/someone/data/digits"},
                         extra=extra)
    write_record(record, folder / f"class{cls}_seed{seed}.json")
    page = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# Run {cls} {seed}")])
    nbformat.write(page, folder / f"class{cls}_seed{seed}.ipynb")
    return folder / f"class{cls}_seed{seed}.ipynb"


def test_toc_and_run_set_pages_come_from_the_manifest(tmp_path):
    manifest_path = tmp_path / "chapters.yml"
    manifest_path.write_text(TINY_MANIFEST)
    manifest = load_manifest(manifest_path)
    runs = tmp_path / "book" / "runs"
    pages = [_fake_run(runs, "baselines", "digits-t", c, s, {"auroc": 0.5, "auroc.knn": 0.6 + c / 10,
                                                               "au_pro": 0.7})
             for c in (0, 1) for s in (0, 1)]
    _fake_run(runs, "not_written_yet", "digits", 0, 0, {"auroc": 0.9})
    (runs / "quick" / "baselines" / "digits-t" / "class1_seed1.json").write_text('{"half')  # failed

    published = book.write_run_set_pages(tmp_path, runs, PROJECT_ROOT / "notebooks", manifest)
    with pytest.raises(book.BookError, match="its page book/chapters/baselines.md does not"):
        book.build_toc(tmp_path, runs, PROJECT_ROOT / "notebooks", manifest)
    (tmp_path / "book" / "chapters").mkdir()
    (tmp_path / "book" / "chapters" / "baselines.md").write_text("# Tiny baselines\n")
    toc = book.build_toc(tmp_path, runs, PROJECT_ROOT / "notebooks", manifest)
    methods = next(p for p in toc["parts"] if p["caption"] == "Methods")["chapters"]
    # only the chapter whose notebook exists; its run set, the runs below it (not the failed one)
    assert [c["file"] for c in methods] == ["book/chapters/baselines"]
    [run_set] = methods[0]["sections"]
    assert run_set["file"] == "book/generated/runs/quick/baselines/digits-t"
    assert [s["file"] for s in run_set["sections"]] == [
        p.relative_to(tmp_path).with_suffix("").as_posix() for p in pages[:3]]
    assert list(published) == ["baselines"]

    text = (tmp_path / "book/generated/runs/quick/baselines/digits-t.md").read_text()
    assert text.startswith("# Tiny baselines — run set `digits-t`\n\nTwo classes, two seeds.")
    assert "k-NN distance" in text and "AU-PRO, defect regions" in text  # labels, not keys
    assert "auroc.knn" not in text
    for page in pages[:3]:  # every number links to its executed page
        assert f"</{page.relative_to(tmp_path).with_suffix('').as_posix()}>`" in text
    assert "3 of 4 planned" in text and "$DATA_DIR/digits" in text
    assert "/home/someone" not in text and str(tmp_path) not in text


# --- the smoke runs and the tiny book ---------------------------------------------------------


@pytest.mark.slow
def test_every_chapter_executes_with_tiny_parameters(smoke_book):
    _, jobs, outcomes = smoke_book
    assert {j.notebook for j in jobs} == set(CHAPTERS)
    failures = [f"{o.job.name}: {o.message}" for o in outcomes if not o.ok]
    assert not failures, failures
    for job in jobs:
        record = read_record(job.record)
        headline = MANIFEST.chapter(job.notebook).metrics[0].key  # a score or a share
        assert record["profile"] == "smoke" and 0 <= record["metrics"][headline] <= 1
        figures = [o for c in nbformat.read(job.output, as_version=4).cells
                   for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert figures, f"{job.name}: the executed page has no figures"


@pytest.mark.slow
def test_book_builds_without_warnings(smoke_book):
    root, jobs, _ = smoke_book
    runs = root / "book" / "runs"
    book.write_run_set_pages(root, runs, PROJECT_ROOT / "notebooks")
    toc = yaml.safe_load(book.write_toc(root, runs, PROJECT_ROOT / "notebooks").read_text())
    methods = next(p for p in toc["parts"] if p["caption"] == "Methods")["chapters"]
    assert [c["file"].removeprefix("book/chapters/") for c in methods] == CHAPTERS
    for name in book.results_notebooks(PROJECT_ROOT / "notebooks"):
        book.execute_results(root, runs, PROJECT_ROOT / "notebooks", name)
    index = book.build_html(root, jobs=2)
    html = root / "_build" / "html"
    results = (html / "book" / "generated" / "results.html").read_text()
    assert index.exists() and "Per-class tables" in results and "smoke" in results
    assert "<img" in results and "runs_dir" not in results
    assert "GradCon: the run sets side by side" in (html / "book/generated/gradcon_results.html").read_text()

    # each executed page is built and linked from its run set's page
    for job in jobs:
        page = job.output.relative_to(root).with_suffix(".html")
        assert (html / page).exists(), page
        run_set = (html / "book/generated/runs/smoke" / job.notebook /
                   f"{job.output.parent.name}.html").read_text()
        assert f'href="../../../../runs/smoke/{job.notebook}/{job.output.parent.name}/' \
               f'{job.output.stem}.html"' in run_set
    pages = list(html.rglob("*.html"))
    for path in pages:
        text = path.read_text()
        # the sidebar lists chapters and run sets (levels 1 and 2), never the executed pages
        assert "toctree-l3" not in text, path
        # math renders offline: no script comes from a CDN (MathJax is served from _static)
        assert not re.findall(r'<script[^>]*src="(?:https?:)?//', text), path
    assert (html / "_static" / "mathjax" / "tex-chtml.js").exists()
    assert 'src="../_static/mathjax/tex-chtml.js' in (html / "book" / "intro.html").read_text()
    # the generated pages name folders of the project, not of the machine that built them
    for path in [*html.glob("book/generated/**/*.html")]:
        assert str(root) not in path.read_text(), path


def test_source_notebooks_pass_ruff():
    import subprocess
    import sys

    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", str(PROJECT_ROOT)], capture_output=True,
                            text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_results_page_leaves_a_run_set_under_way_out_of_the_means(smoke_book, tmp_path):
    """One record of a run set whose profile plans ten classes: the results pages must say the
    seed is under way and give no mean, instead of passing one class off as the run set."""
    _, jobs, _ = smoke_book
    source = next(j for j in jobs if j.notebook == "gradcon").record
    quick = next(j for j in pipeline.plan("quick", tmp_path / "runs") if j.notebook == "gradcon")
    record = json.loads(source.read_text())
    record.update(profile="quick", normal_class=quick.parameters["normal_class"],
                  seed=quick.parameters["seed"])
    quick.record.parent.mkdir(parents=True)
    quick.record.write_text(json.dumps(record))
    out = book.execute_results(tmp_path / "page", tmp_path / "runs", PROJECT_ROOT / "notebooks")
    assert f"Seed {record['seed']} has 1 of 10 classes so far" in output_text(out)
    out = book.execute_results(tmp_path / "page", tmp_path / "runs", PROJECT_ROOT / "notebooks",
                               "gradcon_results")
    assert "1 of 10" in output_text(out)  # the side-by-side table's class count


@pytest.mark.slow
def test_results_page_shows_any_declared_metric_beside_its_reference(tmp_path):
    """A chapter that declares AU-PRO and pixel AUROC (EfficientAD's metrics): the results
    page tabulates them under their labels, beside the published numbers of that metric."""
    manifest = tmp_path / "chapters.yml"
    manifest.write_text("""
profiles:
  quick: quick runs
chapters:
  - notebook: baselines
    title: A segmentation chapter
    reference: efficientad
    metrics:
      auroc: {label: image-level score, reference: auroc}
      auroc.pixel: pixel-level AUROC
      au_pro: {label: AU-PRO up to 30% false positives, reference: au_pro}
""")
    runs = tmp_path / "page" / "book" / "runs"
    for seed in (0, 1):
        _fake_run(runs, "baselines", "mvtec", 0, seed, dataset="mvtec",
                  metrics={"auroc": 0.9, "auroc.pixel": 0.95 + seed / 100, "au_pro": 0.812})
    out = book.execute_results(tmp_path / "page", runs, PROJECT_ROOT / "notebooks",
                               manifest=manifest)
    text = output_text(out)
    assert "AU-PRO up to 30% false positives" in text and "0.812" in text
    assert "pixel-level AUROC" in text and "0.955 ± 0.007" in text
    assert "this book: AU-PRO up to 30% false positives" in text
    assert "EfficientAD paper (Batzner et al., WACV 2024) (EfficientAD-M)" in text
    assert "0.935" in text  # its published AU-PRO
    assert str(tmp_path) not in text and "/home/someone" not in text


def test_the_book_shows_streams_as_jupyter_does():
    """Executed pages are read with their progress bars in their last state (the page on disk
    keeps every update)."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("run()", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="train:  0%|\rtrain: 50%|"),
        nbformat.v4.new_output("stream", name="stderr", text="\rtrain: 100%|\n"),
        nbformat.v4.new_output("stream", name="stdout", text="done\n"),
        nbformat.v4.new_output("stream", name="stderr", text="warning\n")])])
    shown = book.read_notebook(nbformat.writes(nb)).cells[0].outputs
    assert [(o.name, o.text) for o in shown] == [
        ("stderr", "train: 100%|\n"), ("stdout", "done\n"), ("stderr", "warning\n")]


@pytest.mark.slow
def test_efficientad_results_page_computes_its_comparisons(tmp_path):
    """The EfficientAD results page: the differences from pretrained features alone over the
    seeds both have, and the latency sentences, computed from records and a benchmark file."""
    runs = tmp_path / "page" / "book" / "runs"
    for seed, auroc in ((0, 0.95), (1, 0.97)):
        end = {0: 0.15, 1: 0.195}[seed]  # from 0.2 at step 800: a fall of 25% and of 2.5%
        curve = [{"step": k * 100, "val_st": 1.0 / k if k < 8 else 0.2 + (end - 0.2) * (k - 8) / 2}
                 for k in range(1, 11)]
        teacher = {"distill_steps": 500, "distill_seconds_per_step": 2.83}
        _fake_run(runs, "efficientad", "mvtec-cpu", 0, seed, dataset="mvtec", profile="paper",
                  metrics={"auroc": auroc, "auroc.pixel": 0.9, "au_pro": 0.8},
                  params={"model_size": "small", "image_size": 128, "train_steps": 1000},
                  timings={"train_per_step": 0.4 + 0.2 * seed, "train_seconds": 400.0 + 200 * seed,
                           "score_per_image": 0.1},
                  extra={"curve": curve, "teacher": teacher})
    # -M on the same recipe (seeds 0, 1; 0.98 against 0.96, 1.5 against 0.5 s a step), on
    # another image size (never set beside -S's 128 px runs) and on the same recipe on another
    # machine (its step times never compared).
    for run_set, px, seed, auroc in (("mvtec-cpu-medium", 128, 0, 0.97), ("mvtec-cpu-medium", 128, 1, 0.99),
                                     ("mvtec-m256", 256, 0, 0.99), ("mvtec-elsewhere", 128, 1, 0.99)):
        _fake_run(runs, "efficientad", run_set, 0, seed, dataset="mvtec", profile="paper",
                  device="cpu: other" if run_set == "mvtec-elsewhere" else "cpu: test",
                  metrics={"auroc": auroc, "auroc.pixel": 0.9, "au_pro": 0.8},
                  params={"model_size": "medium", "image_size": px, "train_steps": 1000},
                  timings={"train_per_step": 1.2 + 0.6 * seed, "train_seconds": 1200.0,
                           "score_per_image": 0.3},
                  extra={"teacher": {"distill_steps": 500, "distill_seconds_per_step": 8.0}})
    for seed in (0, 1, 2):
        _fake_run(runs, "patchcore", "mvtec-lite0", 0, seed, dataset="mvtec", profile="paper",
                  metrics={"auroc": 1.0, "auroc.pixel": 0.99, "au_pro": 0.97})
    rows = [{"model": "small", "batch": 1, "variant": v, "median_ms": ms, "p10_ms": ms,
             "p90_ms": ms, "n": 3, "per_image_ms": ms}
            for v, ms in (("reference", 100.0), ("fast", 40.0), ("fast+jit", 60.0),
                          ("anomalib", 120.0))]
    (runs / "bench").mkdir(parents=True)
    (runs / "bench" / "efficientad_latency_cpu.json").write_text(json.dumps({
        "benchmark": "efficientad_latency", "device": "CPU: test", "threads": 2,
        "precision": "float32", "torch": "2.x", "anomalib": "2.7.0", "date": "today",
        "git_commit": "abc", "command": "python benchmarks/efficientad_latency.py x.json",
        "rows": rows, "max_map_difference": {"small/1/fast": 1e-6},
        "parts_ms": {"small": {"teacher": 30.0, "student": 50.0, "autoencoder": 15.0,
                               "maps": 5.0}}}))
    out = book.execute_results(tmp_path / "page", runs, PROJECT_ROOT / "notebooks",
                               "efficientad_results")
    text = output_text(out)
    assert ("`mvtec-cpu` against `mvtec-lite0` (0, seeds 0, 1): image AUROC 0.960 against "
            "1.000, a difference of -0.040 (lower on every seed)") in text
    assert "0.960 ± 0.014" in text
    assert ("the fastest of this book's paths is `fast`, 40.0 ms per call (40.00 ms per image); "
            "anomalib's model takes 120.0 ms, 3.00 times as long") in text
    assert "teacher 30%, student 50%, autoencoder 15%, maps 5%" in text
    assert ("`mvtec-cpu`: the student-teacher validation distance fell by 2.5% to 25.0% over the "
            "last 20% of the 1000 steps; 1 of 2 runs had levelled off (training was still "
            "improving") in text
    assert ("`mvtec-cpu` (128 px, 1,000 steps): 0.40 to 0.60 s per step, 7 to 10 min of training a "
            "seed; at its fastest pace the paper's 70,000 steps at this image size would take about 8 "
            "hours a seed; the teacher's 500 distillation steps took 2.83 s each.") in text
    assert ("`mvtec-cpu-medium` against `mvtec-cpu` (0, seeds 0, 1): image AUROC 0.980 against 0.960 "
            "(+0.020, higher on every seed); pixel AUROC 0.900 against 0.900 (+0.000, equal on every "
            "seed)") in text
    assert "A training step of -M took 3.0 times as long as one of -S (the seeds' mean" in text
    assert "`mvtec-m256` against `mvtec-cpu`" not in text
    assert ("`mvtec-elsewhere` against `mvtec-cpu` (0, seeds 1): image AUROC 0.990 against 0.970 (+0.020, "
            "higher on every seed)") in text
    assert "`mvtec-m256` (256 px, 1,000 steps): 1.20 s per step, 20 min of training a seed;" in text
    assert ("Their step times are not set side by side: -M ran on cpu: other and -S on cpu: test") in text


def test_fisher_kernel_results_page_computes_its_comparisons(tmp_path):
    """The Fisher-kernel results page: each score against another, class by class, from records."""
    runs = tmp_path / "page" / "book" / "runs"
    for cls, (cos, recon) in enumerate([(0.6, 0.9), (0.95, 0.9), (0.7, 0.8)]):
        _fake_run(runs, "fisher_kernel", "mnist", cls, 0, dataset="mnist", profile="paper",
                  metrics={"auroc": cos, "auroc.cos_per_layer": cos - 0.1,
                           "auroc.cos_diag_fisher": cos + 0.01, "auroc.grad_norm": 0.85,
                           "auroc.recon": recon})
    out = book.execute_results(tmp_path / "page", runs, PROJECT_ROOT / "notebooks",
                               "fisher_kernel_results")
    text = output_text(out)
    assert ("cosine, F = I against reconstruction error: mean AUROC 0.750 (0.600 to 0.950 per "
            "class) against 0.867 (0.800 to 0.900); cosine, F = I is higher in 1 of 3 classes (1).") in text
    assert "cosine, diagonal Fisher is higher in every class" in text
    assert "cosine per layer (GradCon) is higher in no class" in text
    assert "Highest mean AUROC: reconstruction error (0.867)." in text


def test_flow_results_page_computes_its_statements(tmp_path):
    """The flow results page: which sets the class model prefers, the general models' fit, the
    outlier loss against its control, and two run sets class by class, all from records."""
    runs = tmp_path / "page" / "book" / "runs"
    for run_set, general, control in (("mnist-old", "patches+all", None), ("mnist-new", "patches", 0.5)):
        for cls in (0, 1):
            metrics = {"auroc": 0.9, "auroc.ratio": 0.9 + cls / 20, "auroc.raw": 0.6,
                       "auroc.outlier_loss": 0.93, "bits_per_dim.test": 4.0,
                       "bits_per_dim.general.test": 3.0 + (run_set == "mnist-new") * (1.5 - cls),
                       "auroc.ood.blurred.raw": 0.3, "auroc.ood.blurred.ratio": 0.05 * (cls + 1),
                       "auroc.ood.constant.raw": 0.9, "auroc.ood.constant.ratio": 0.9}
            if control is not None:
                metrics.update({"auroc.outlier_control": control + cls / 2,
                                "auroc.ood.blurred.outlier_control": 0.2})
            extra = {"general_data": general, "history": {"in": [4.5, 4.2 - cls / 10]},
                     "bits_per_dim_by_set": {"test, normal": 4.0, "OOD: constant": 6.0,
                                             "OOD: blurred": 3.5 + cls}}
            _fake_run(runs, "flow_llr", run_set, cls, 0, dataset="mnist", profile="paper",
                      metrics=metrics, params={"dataset": "mnist", "general_data": general},
                      extra=extra)
    out = book.execute_results(tmp_path / "page", runs, PROJECT_ROOT / "notebooks", "flow_llr_results")
    text = output_text(out)
    assert ("**blurred**: 3.50-4.50 (mean 4.00) bits/dim; the class model gives them fewer bits than "
            "the normal test images (it prefers them) in 1 of 2 runs.") in text
    assert "ratio 0.050-0.100 (mean 0.075)" in text
    assert ("the class model's training bits/dim fell in its last epoch in every run "
            "(`extra.history.in`), by up to 0.400: it was still improving") in text
    assert "The ratio beats the raw likelihood in no run." in text
    assert "**constant**: 6.00-6.00 (mean 6.00) bits/dim; more bits than the normal test images in every run" in text
    assert "(ties within 0.0005 in every run)" in text
    assert "the general model fits the normal test images better in every run" in text
    assert "the general model fits the normal test images better in 1 of 2 runs" in text
    assert ("**outlier loss against outlier control**: mean AUROC 0.930 against 0.750 (difference "
            "+0.180, -0.070 to +0.430 per class); outlier loss is higher in 1 of 2 classes.") in text
    assert "they differ in `general_data` (patches / patches+all)" in text
    assert "nan" not in text.replace("Nan", "")  # a score one run set lacks is left out, not NaN
    assert "- bits/dim, general model: 4.000 against 3.000 (difference +1.000, +0.500 to +1.500; higher in 2 of 2)." in text


@pytest.mark.slow
def test_cpc_ad_results_page_sets_runs_beside_the_seed_and_the_validation_choice(tmp_path):
    """The CPC-AD results page: this book's AUROC by epoch beside the seed's table, the
    training curves' lowest validation epoch and relapses, and the best_val runs against the
    last-epoch runs of the same training, all computed from records."""
    runs = tmp_path / "page" / "book" / "runs"
    recipe = {"encoder": "resnet18", "norm": "layer", "shared_encoder": True, "image_size": 256,
              "patch_size": 64, "patch_stride": 32, "prediction_steps": 5, "skip_rows": 1,
              "directions": "down,up,left,right", "n_negatives": 16, "epochs": 30,
              "batch_size": 16, "lr": 2e-4}
    data = {"source": "mvtec", "normal_class_name": "bottle"}
    # seed 0 relapses at epoch 5 (0.9 > 2 x 0.4) and is lowest at epoch 20; seed 1 at epoch 30
    val = {0: [2.0, 1.0, 0.6, 0.4, 0.9, *[0.3] * 14, 0.2, *[0.25] * 10],
           1: [2.0 - e / 20 for e in range(30)]}
    for seed, (a10, a20, a30) in ((0, (0.90, 0.70, 0.60)), (1, (0.80, 0.75, 0.50))):
        # seed 0: epochs of 40 s, one of 120 s (a loaded machine); seed 1: 30 s every epoch
        seconds = {0: [40.0] * 29 + [120.0], 1: [30.0] * 30}[seed]
        history = [{"epoch": e + 1, "train_loss": v, "val_loss": v, "epoch_seconds": t,
                    "seconds_per_image": t / 150} for e, (v, t) in enumerate(zip(val[seed], seconds))]
        timings = {"score_per_image": 0.2 + 0.1 * seed, "batch.encode (forward)": 0.9,
                   "batch.InfoNCE losses": 0.1, "batch.backward": 3.0}
        _fake_run(runs, "cpc_ad", "mvtec-cpu", 0, seed, dataset="mvtec", profile="paper", data=data,
                  timings=timings,
                  params={**recipe, "checkpoint_rule": "last"}, extra={"used_epoch": 30, "history": history},
                  metrics={"auroc": a30, "auroc.ep10": a10, "auroc.ep20": a20, "auroc.ep30": a30})
        chosen = int(min(history, key=lambda h: h["val_loss"])["epoch"])
        _fake_run(runs, "cpc_ad", "mvtec-cpu-best-val", 0, seed, dataset="mvtec", profile="paper",
                  data=data, params={**recipe, "checkpoint_rule": "best_val"},
                  extra={"used_epoch": chosen, "history": history},
                  metrics={"auroc": {20: a20, 30: a30}[chosen], "auroc.ep10": a10, "auroc.ep20": a20})
    # DenseNet-121, seed 0: its epoch 10 has the lowest validation loss of the seed's candidates
    dense = [{"epoch": e, "train_loss": 0.5, "val_loss": 0.1 if e == 10 else 0.5, "epoch_seconds": 90.0,
              "seconds_per_image": 0.6} for e in range(1, 31)]
    _fake_run(runs, "cpc_ad", "mvtec-cpu-densenet121", 0, 0, dataset="mvtec", profile="paper", data=data,
              timings={"score_per_image": 0.5, "batch.encode (forward)": 1.0, "batch.backward": 3.0},
              params={**recipe, "encoder": "densenet121", "checkpoint_rule": "last"},
              extra={"used_epoch": 30, "history": dense},
              metrics={"auroc": 0.95, "auroc.ep10": 0.80, "auroc.ep20": 0.85, "auroc.ep30": 0.95})
    # a best_val run of seed 0 trained apart (another curve): not paired with the cpu run
    other = [{"epoch": e + 1, "train_loss": 1.0, "val_loss": 1.0 - e / 100} for e in range(30)]
    _fake_run(runs, "cpc_ad", "mvtec-cpu-best-val-elsewhere", 0, 0, dataset="mvtec", profile="paper",
              data=data, params={**recipe, "checkpoint_rule": "best_val"},
              extra={"used_epoch": 30, "history": other}, metrics={"auroc": 0.99})
    out = book.execute_results(tmp_path / "page", runs, PROJECT_ROOT / "notebooks", "cpc_ad_results")
    text = output_text(out)
    assert ("ResNet18, bottle, 30 epochs: this book 0.550 over seeds 0, 1, from 0.500 to 0.600, "
            "against the seed's 0.558: higher on 1 of 2 seeds.") in text
    assert "0.850 ± 0.071" in text  # epoch 10, no published number beside it
    assert ("`mvtec-cpu-best-val` against `mvtec-cpu` (ResNet18, 30 epochs, seeds 0, 1; chosen epochs "
            "20, 30): image AUROC 0.600 against 0.550, +0.050 (no consistent sign); the chosen epoch "
            "scores above the seed's 0.558 on 1 of 2 seeds.") in text
    assert ("`mvtec-cpu`, resnet18, seed 0: the lowest validation loss, 0.2000, is at epoch 20 of "
            "30 (0.2500 at the last); relapses: at epochs 5.") in text
    assert "`mvtec-cpu`, resnet18, seed 1: the lowest validation loss, 0.5500, is at epoch 30" in text
    assert "seed 1: " in text and "relapses: none." in text
    assert ("- `mvtec-cpu-best-val-elsewhere` seed 0: its training curve differs from `mvtec-cpu`'s, "
            "so the two runs are different trainings and are not compared.") in text
    assert "0.990" not in text and "0.99 " not in text
    assert ("- ResNet18 (2 runs): the fastest epoch took 30 s (0.20 s per training image), so 30 epochs at that pace take "
            "about 15 minutes; the slowest epoch took 3.0 times the fastest. "
            "Scoring: 0.25 s per test image. In a training batch, `backward` takes 75% of the time.") in text
    assert ("- bottle, seed 0: among 6 candidates (ResNet18 at epochs 10, 20, 30; DenseNet at epochs 10, "
            "20, 30), the lowest validation InfoNCE, 0.1000, is DenseNet at epoch 10: image AUROC 0.800; "
            "the test set would have picked DenseNet at epoch 30 (0.950, +0.150). The seed's best number "
            "at up to 30 epochs is 0.790 (DenseNet, 30 epochs): the choice scores higher.") in text
    assert "seed 1: among" not in text  # one encoder only: nothing to choose between
