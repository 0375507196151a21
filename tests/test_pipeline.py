"""The papermill pipeline on a tiny notebook that needs no torch: planning, resume, failures."""

import json

import nbformat
import pytest

from nbutils import pipeline
from nbutils.records import is_complete_record

SOURCE = '''
from nbutils.records import make_record, write_record
if normal_class in fail_on:
    raise RuntimeError(f"class {normal_class} is broken on purpose")
write_record(make_record(method="tiny", variant="v", dataset=dataset, normal_class=normal_class,
                         protocol="full", seed=seed, profile=profile, params={"x": x},
                         metrics={"auroc": 0.5 + normal_class / 100}, timings={"s": 0.1},
                         device="cpu: test"), record_path)
'''


@pytest.fixture
def project(tmp_path):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    params = nbformat.v4.new_code_cell(
        'normal_class = 0\ndataset = "digits"\nseed = 0\nprofile = "manual"\n'
        'record_path = ""\nfail_on = []\nx = 1', metadata={"tags": ["parameters"]})
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Tiny chapter\ntext"),
                                         params, nbformat.v4.new_code_cell(SOURCE)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nb_dir / "tiny.ipynb")
    profile = tmp_path / "demo.yml"
    profile.write_text(
        "sweeps:\n  - notebook: tiny\n    classes: [0, 1, 2]\n    seeds: [0]\n"
        "    parameters: {dataset: digits, fail_on: [1]}\n")
    return tmp_path, nb_dir, profile


def _main(project, *extra):
    root, nb_dir, profile = project
    return pipeline.main(["--profile", str(profile), "--runs-dir", str(root / "runs"),
                          "--notebook-dir", str(nb_dir), *extra])


def test_plan_paths_keep_profiles_apart(project):
    root, nb_dir, profile = project
    jobs = pipeline.plan(str(profile), root / "runs", notebook_dir=nb_dir)
    assert [j.output.relative_to(root / "runs").as_posix() for j in jobs] == [
        f"demo/tiny/digits/class{c}_seed0.ipynb" for c in range(3)]
    quick = pipeline.plan("quick", root / "runs")
    paper = pipeline.plan("paper", root / "runs")
    assert not {j.output for j in quick} & {j.output for j in paper}


def test_failure_does_not_stop_the_others_and_resume_skips_done_runs(project, capsys):
    root, _, _ = project
    out = root / "runs" / "demo" / "tiny" / "digits"
    assert _main(project, "--jobs", "2") == 1
    summary = capsys.readouterr().out
    assert "2 succeeded, 1 failed" in summary and "broken on purpose" in summary
    assert is_complete_record(out / "class0_seed0.json") and is_complete_record(out / "class2_seed0.json")
    assert not (out / "class1_seed1.json").exists()
    failed = nbformat.read(out / "class1_seed0.ipynb", as_version=4)  # kept, with the error
    assert any(o.get("ename") == "RuntimeError" for c in failed.cells for o in c.get("outputs", []))

    # the page names the run and says where it came from
    done = nbformat.read(out / "class0_seed0.ipynb", as_version=4)
    assert done.cells[0].source.startswith("# Tiny chapter — digits class 0, seed 0 (demo)")
    assert "Provenance" in done.cells[1].source and "cpu: test" in done.cells[1].source

    # a rerun with the bug fixed does only what is missing
    before = (out / "class0_seed0.json").stat().st_mtime_ns
    assert _main(project, "-p", "fail_on", "[]") == 0
    assert "2 of 3 runs already have records: skipped" in capsys.readouterr().out
    assert (out / "class0_seed0.json").stat().st_mtime_ns == before
    assert is_complete_record(out / "class1_seed0.json")

    # --force reruns everything
    assert _main(project, "-p", "fail_on", "[]", "--force", "--classes", "0") == 0
    assert (out / "class0_seed0.json").stat().st_mtime_ns != before


def test_half_written_record_is_not_taken_as_done(project, capsys):
    root, _, _ = project
    out = root / "runs" / "demo" / "tiny" / "digits"
    out.mkdir(parents=True)
    (out / "class0_seed0.json").write_text('{"method": "tiny", "metr')
    assert _main(project, "--classes", "0", "--list") == 0
    assert "todo  tiny/digits/class0_seed0" in capsys.readouterr().out
    assert _main(project, "--classes", "0") == 0
    assert json.loads((out / "class0_seed0.json").read_text())["metrics"]["auroc"] == 0.5


def test_notebook_without_record_fails(project, capsys):
    root, nb_dir, _ = project
    nb = nbformat.read(nb_dir / "tiny.ipynb", as_version=4)
    nb.cells[2].source = "print('forgot the record')"
    nbformat.write(nb, nb_dir / "tiny.ipynb")
    assert _main(project, "--classes", "0") == 1
    assert "wrote no complete record" in capsys.readouterr().out


def test_bad_options_give_clear_errors(project, capsys):
    assert _main(project, "--notebook", "nope") == 2
    assert "unknown notebook 'nope'; known: tiny" in capsys.readouterr().err
    assert pipeline.main(["--profile", "nosuch"]) == 2
    assert "unknown profile 'nosuch'; known:" in capsys.readouterr().err
    assert _main(project, "--classes", "eleven") == 2
    assert "unknown class 'eleven'" in capsys.readouterr().err


def test_busy_cpu_is_warned_about_before_jobs_start(monkeypatch):
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(pipeline.os, "getloadavg", lambda: (2.1, 1.0, 0.5))
    warning = pipeline.busy_cpu_warning(1)
    assert warning and "load 2.1 on 2 cores" in warning and "--jobs" in warning
    monkeypatch.setattr(pipeline.os, "getloadavg", lambda: (0.3, 1.0, 0.5))
    assert pipeline.busy_cpu_warning(1) is None


MANIFEST = """
profiles:
  demo: a profile of the test manifest
  other: another
chapters:
  - notebook: tiny
    title: Tiny chapter
    metrics:
      auroc: {label: tiny score, reference: auroc}
    runs:
      demo:
        - tag: a
          classes: [0, 1]
          seeds: [0, 1]
          parameters: {dataset: digits}
        - tag: b
          note: the same with another x
          classes: [2]
          parameters: {dataset: digits, x: 2}
  - notebook: ghost
    title: A chapter whose notebook is not written yet
    runs:
      demo:
        - classes: all
          parameters: {dataset: digits}
"""


@pytest.fixture
def manifest(project):
    root, _, _ = project
    path = root / "chapters.yml"
    path.write_text(MANIFEST)
    return path


def test_profiles_and_plan_come_from_the_manifest(project, manifest):
    root, nb_dir, _ = project
    assert pipeline.available_profiles(manifest) == ["demo", "other"]
    jobs = pipeline.plan("demo", root / "runs", notebook_dir=nb_dir, manifest=manifest)
    # the ghost chapter has no notebook: it is not planned, and nothing fails
    assert [j.output.relative_to(root / "runs").as_posix() for j in jobs] == [
        "demo/tiny/digits-a/class0_seed0.ipynb", "demo/tiny/digits-a/class0_seed1.ipynb",
        "demo/tiny/digits-a/class1_seed0.ipynb", "demo/tiny/digits-a/class1_seed1.ipynb",
        "demo/tiny/digits-b/class2_seed0.ipynb"]
    assert jobs[-1].parameters == {"dataset": "digits", "x": 2, "normal_class": 2, "seed": 0,
                                   "profile": "demo"}
    assert pipeline.plan("other", root / "runs", notebook_dir=nb_dir, manifest=manifest) == []
    assert [j.name for j in pipeline.plan("demo", root / "runs", notebook_dir=nb_dir,
                                          manifest=manifest, tags=["b"])] == [
        "tiny/digits-b/class2_seed0"]
    # a notebook that exists is planned from the same manifest entry
    (nb_dir / "ghost.ipynb").write_text((nb_dir / "tiny.ipynb").read_text())
    jobs = pipeline.plan("demo", root / "runs", notebook_dir=nb_dir, manifest=manifest)
    assert {j.notebook for j in jobs} == {"tiny", "ghost"}


def test_manifest_errors_are_clear(project, manifest, capsys):
    root, nb_dir, _ = project
    assert pipeline.main(["--profile", "nosuch", "--manifest", str(manifest)]) == 2
    assert "unknown profile 'nosuch'; known: demo, other" in capsys.readouterr().err
    manifest.write_text(MANIFEST.replace("tag: b", "tag: a"))
    with pytest.raises(pipeline.PipelineError, match="share a folder"):
        pipeline.plan("demo", root / "runs", notebook_dir=nb_dir, manifest=manifest)
    manifest.write_text(MANIFEST.replace("      demo:\n        - tag: a", "      paper:\n        - tag: a"))
    with pytest.raises(pipeline.PipelineError, match="undeclared profile 'paper'"):
        pipeline.plan("demo", root / "runs", notebook_dir=nb_dir, manifest=manifest)


def test_the_books_manifest_declares_every_chapter_in_every_profile():
    from nbutils.chapters import load_manifest

    chapters = load_manifest()
    assert list(chapters.profiles) == ["smoke", "quick", "paper"]
    present = chapters.present()
    assert {"baselines", "fisher_kernel", "gradcon", "flow_llr"} <= {c.notebook for c in present}
    for chapter in present:
        assert set(chapter.runs) == {"smoke", "quick", "paper"}, chapter.notebook
        assert chapter.metrics and all(m.label for m in chapter.metrics), chapter.notebook
        assert not any(m.label == m.key for m in chapter.metrics)  # labels in words
    for profile in chapters.profiles:  # every run set expands (data sets and classes resolve)
        assert {j.notebook for j in pipeline.plan(profile)} == {c.notebook for c in present}
