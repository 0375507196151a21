"""What a run leaves for readers: no absolute path of the machine that ran it, no stream of
progress-bar redraws, no kernel noise on the console, and a warning for a heavy page."""

import json
from pathlib import Path

import nbformat
import pytest

from nbutils import config, pipeline
from nbutils.config import PROJECT_ROOT, portable_paths
from nbutils.records import (
    absolute_paths,
    make_portable,
    make_record,
    portable_notebook,
    published_text,
    read_record,
)

ROOTS = {"/work/shared/data": "$DATA_DIR", "/work/main/.carry/data": "$DATA_DIR",
         "/work/main": "", "/root/out": "$OUT"}
PNG = "iVBORw0KGgo/work/main/AAAANSUhEUg=="  # base64 may hold "/work/main/" by chance


def test_portable_paths_rewrites_whole_folders_only():
    cases = {
        "record /work/main/book/runs/a.json\n": "record book/runs/a.json\n",
        "cwd=/work/main, data /work/shared/data": "cwd=., data $DATA_DIR",
        "/work/main/.carry/data/MNIST": "$DATA_DIR/MNIST",  # the longest folder wins
        '"/work/shared/data/MNIST/raw"': '"$DATA_DIR/MNIST/raw"',
        "/root/out/speed.json --device cuda": "$OUT/speed.json --device cuda",
        "/work/main2/x and x/work/main/y": "/work/main2/x and x/work/main/y",  # not ours
    }
    for text, expected in cases.items():
        assert portable_paths(text, ROOTS) == expected


def test_default_roots_are_this_machines_project_data_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    text = f"{PROJECT_ROOT}/book/x.json {tmp_path}/data/MNIST/raw {Path.home()}/.cache/t"
    assert portable_paths(text) == "book/x.json $DATA_DIR/MNIST/raw ~/.cache/t"


def test_records_name_paths_relative_to_the_project_and_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    record = make_record(method="m", variant="v", dataset="mnist", normal_class=1, protocol="full",
                         seed=0, profile="p", metrics={"auroc": 0.5}, timings={}, device="cpu",
                         params={"checkpoint": PROJECT_ROOT / "checkpoints" / "a.pt"},
                         data={"source": f"MNIST: {tmp_path / 'MNIST'}"})
    assert record["params"]["checkpoint"] == "checkpoints/a.pt"
    assert record["data"]["source"] == "MNIST: $DATA_DIR/MNIST"


def _page(text: str) -> dict:
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# A page"),
        nbformat.v4.new_code_cell("x = 1", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text=text),
            nbformat.v4.new_output("display_data", data={"image/png": PNG,
                                                         "text/plain": "<Figure>"})])])
    nb.metadata["papermill"] = {"input_path": "/work/main/notebooks/a.ipynb"}
    return nb


def test_an_absolute_path_in_a_page_is_caught_and_made_portable(tmp_path):
    path = tmp_path / "page.ipynb"
    nbformat.write(_page("loaded /home/alice/ckpt.pt; record /work/main/book/runs/a.json\n"), path)
    assert absolute_paths(published_text(path)) == ["/home/alice", "/work/main"]
    assert make_portable(path, {**ROOTS, "/home/alice": "~"})
    assert absolute_paths(published_text(path)) == []
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[1].outputs[0].text == "loaded ~/ckpt.pt; record book/runs/a.json\n"
    assert nb.cells[1].outputs[1].data["image/png"] == PNG  # images are not text
    assert nb.metadata.papermill.input_path == "notebooks/a.ipynb"
    assert not make_portable(path, ROOTS)  # nothing left to change


def test_making_a_record_portable_changes_only_its_paths(tmp_path):
    record = {"metrics": {"auroc": 0.9123456789012345, "nan": float("nan")}, "timings": {"t": 1e-7},
              "data": {"source": "MNIST (torchvision layout): /work/shared/data/MNIST"}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record, indent=1))
    assert make_portable(path, ROOTS)
    after = json.loads(path.read_text())
    assert after["data"]["source"] == "MNIST (torchvision layout): $DATA_DIR/MNIST"
    assert json.dumps(after["metrics"]) == json.dumps(record["metrics"])
    assert path.read_text() == json.dumps({**record, "data": after["data"]}, indent=1)


def test_committed_pages_and_records_name_no_absolute_path():
    runs = PROJECT_ROOT / "book" / "runs"
    needles = [b"/work/", b"/root/", b"/home/", b"/Users/", str(PROJECT_ROOT).encode()]
    offenders = {}
    for path in sorted(runs.rglob("*")):
        if path.suffix not in (".json", ".ipynb") or not any(n in path.read_bytes()
                                                              for n in needles):
            continue  # the cheap byte test first: most files have no candidate at all
        if found := absolute_paths(published_text(path)):
            offenders[str(path.relative_to(runs))] = found
    assert not offenders, f"absolute paths in published runs (see nbutils.records."\
                          f"make_portable): {dict(list(offenders.items())[:5])}"


def test_redraws_collapse_to_the_last_state_of_each_line():
    bar = "".join(f"\rtrain: {i:3d}%" for i in range(0, 101, 10))
    assert pipeline.collapse_redraws(bar + "\nloss 0.1\n") == "train: 100%\nloss 0.1\n"
    assert pipeline.collapse_redraws("abcdef\rxy\r\n") == "xycdef\n"  # as a terminal shows it


SOURCE = '''
import os, sys
from pathlib import Path
from nbutils.records import make_record, write_record
for i in range(300):  # a progress bar's redraws, one stream output each
    print(f"\\rstep {i + 1}/300", end="", flush=True)
print()
print("cwd", os.getcwd(), "record", Path(record_path).resolve())
if fail:
    raise RuntimeError("broken on purpose")
write_record(make_record(method="tiny", variant="v", dataset=dataset, normal_class=normal_class,
                         protocol="full", seed=seed, profile=profile, params={}, metrics={},
                         timings={"s": 0.1}, device="cpu: test", extra={"cwd": os.getcwd()}),
             record_path)
'''


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """A project folder of its own: one notebook and a profile, the pipeline rooted there."""
    for module in (config, pipeline):
        monkeypatch.setattr(module, "PROJECT_ROOT", tmp_path)
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    params = nbformat.v4.new_code_cell(
        'normal_class = 0\ndataset = "digits"\nseed = 0\nprofile = "manual"\nrecord_path = ""\n'
        "fail = False", metadata={"tags": ["parameters"]})
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Tiny\ntext"), params,
                                         nbformat.v4.new_code_cell(SOURCE)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, nb_dir / "tiny.ipynb")
    profile = tmp_path / "demo.yml"
    profile.write_text("sweeps:\n  - notebook: tiny\n    classes: [0]\n    seeds: [0]\n"
                       "    parameters: {dataset: digits}\n")
    return tmp_path, pipeline.plan(str(profile), tmp_path / "book" / "runs", notebook_dir=nb_dir)


def test_a_new_page_is_lean_portable_and_flagged_when_heavy(tiny_project, monkeypatch, capfd):
    root, (job,) = tiny_project
    monkeypatch.setattr(pipeline, "PAGE_LIMIT_KB", 1)
    outcome = pipeline.execute(job)
    assert outcome.ok, outcome.message
    page = nbformat.read(job.output, as_version=4)
    assert page.metadata.papermill.parameters.record_path == \
        "book/runs/demo/tiny/digits/class0_seed0.json"
    (stream,) = [o for o in page.cells[-1].outputs if o.output_type == "stream"]
    assert stream.text == ("step 300/300\ncwd . record "
                           "book/runs/demo/tiny/digits/class0_seed0.json\n")
    assert str(root) not in published_text(job.output)
    assert read_record(job.record)["extra"]["cwd"] == str(root)  # the kernel ran in the project
    assert "over 1 KB" in pipeline.summarise([outcome])
    console = capfd.readouterr().err
    assert "without encryption" not in console and "KeyboardInterrupt" not in console


def test_a_failing_page_prints_its_error_and_nothing_else(tiny_project, capfd):
    _, (job,) = tiny_project
    job.parameters["fail"] = True
    outcome = pipeline.execute(job)
    assert not outcome.ok and outcome.message == "RuntimeError: broken on purpose"
    page = nbformat.read(job.output, as_version=4)
    assert any(o.get("ename") == "RuntimeError" for o in page.cells[-1].outputs)
    console = capfd.readouterr().err
    assert "without encryption" not in console and "KeyboardInterrupt" not in console


def test_portable_notebook_keeps_binary_outputs():
    nb = portable_notebook(_page("/work/main/x\n"), ROOTS)
    assert nb["cells"][1]["outputs"][0]["text"] == "x\n"
    assert nb["cells"][1]["outputs"][1]["data"]["image/png"] == PNG


def test_figures_are_stored_with_a_palette_that_looks_the_same():
    """tidy_page's figure shrinking: a matplotlib figure with smooth gradients loses most of
    its bytes and no visible pixel; what is not a PNG is left untouched."""
    import base64
    import io

    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.linspace(0, 10, 400)
    for k in range(6):
        ax.plot(x, np.sin(x + k), lw=1.5)
    ax.imshow(np.outer(np.ones(30), x), extent=(0, 10, -1, 1), aspect="auto", alpha=0.4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    raw = buf.getvalue()
    small = pipeline.palette_png(raw)
    assert len(small) < 0.7 * len(raw)
    before = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=int)
    after = np.asarray(Image.open(io.BytesIO(small)).convert("RGB"), dtype=int)
    assert before.shape == after.shape and np.abs(before - after).mean() < 2.0
    assert pipeline.palette_png(b"not a png") == b"not a png"
    assert pipeline.palette_png(small) == small  # already a palette: nothing to gain

    nb = _page("x\n")
    nb["cells"][1]["outputs"][1]["data"]["image/png"] = base64.b64encode(raw).decode()
    nb = nbformat.from_dict(nb)
    pipeline.shrink_figures(nb)
    assert base64.b64decode(nb.cells[1].outputs[1].data["image/png"]) == small
