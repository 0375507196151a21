"""Faults, for real (no mocks): the pipeline killed with SIGKILL mid-run, a run that raises,
a run that hangs, a training killed mid-way. A toy notebook (written here, no torch) stands in
for a chapter: it can hang on its first attempt, hang always, or raise, and it logs each
finished run, so that a duplicate would show."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from nbutils import pipeline
from nbutils.config import PROJECT_ROOT
from nbutils.records import is_complete_record, read_record

TOY = '''
import os, time
from pathlib import Path
from nbutils.records import make_record, write_record
marks = Path(mark_dir)
marks.mkdir(parents=True, exist_ok=True)
started = marks / f"class{normal_class}_seed{seed}.started"
first = not started.exists()
started.touch()
# the kernel and its parent (a pool or Dask worker), for the tests to kill or watch
(marks / f"class{normal_class}_seed{seed}.pid").write_text(f"{os.getpid()} {os.getppid()}")
(marks / f"class{normal_class}_seed{seed}.gpu").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
if normal_class in hang_on or (first and normal_class in hang_first):
    time.sleep(600)
if normal_class in fail_on:
    raise RuntimeError(f"class {normal_class} is broken on purpose")
write_record(make_record(method="toy", variant="v", dataset=dataset, normal_class=normal_class,
                         protocol="full", seed=seed, profile=profile, params={},
                         metrics={"auroc": 0.5 + normal_class / 100 + seed / 1000},
                         timings={"s": 0.1}, device="cpu: test"), record_path)
with open(marks / "done.log", "a") as log:  # one line per finished run: duplicates show
    log.write(f"class{normal_class}_seed{seed}\\n")
'''


def write_toy_project(root: Path, classes=(0, 1, 2), seeds=(0,), extra: str = "",
                      **parameters) -> Path:
    """``root/notebooks/toy.ipynb`` (the same bytes each time: fixed cell ids) and a profile
    ``root/faults.yml`` running it; returns the profile. ``parameters`` become the sweep's (hang_first, hang_on, fail_on: class lists)."""
    nb_dir = root / "notebooks"
    nb_dir.mkdir(parents=True, exist_ok=True)
    params = nbformat.v4.new_code_cell(
        'normal_class = 0\ndataset = "digits"\nseed = 0\nprofile = "manual"\nrecord_path = ""\n'
        'mark_dir = "marks"\nhang_first = []\nhang_on = []\nfail_on = []',
        metadata={"tags": ["parameters"]}, id="parameters")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Toy chapter", id="title"),
                                         params, nbformat.v4.new_code_cell(TOY, id="toy")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, nb_dir / "toy.ipynb")
    parameters = {"dataset": "digits", "mark_dir": str(root / "marks"), **parameters}
    profile = root / "faults.yml"
    profile.write_text(
        f"sweeps:\n  - notebook: toy\n    classes: {list(classes)}\n    seeds: {list(seeds)}\n"
        f"    parameters: {json.dumps(parameters)}\n{extra}")
    return profile


def pipeline_args(root: Path, profile: Path, *extra: str) -> list[str]:
    return ["--profile", str(profile), "--runs-dir", str(root / "runs"),
            "--notebook-dir", str(root / "notebooks"), *extra]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def finished_runs(root: Path) -> list[str]:
    log = root / "marks" / "done.log"
    return sorted(log.read_text().split()) if log.exists() else []


def assert_no_half_records(runs: Path) -> None:
    """Every record file is complete, and no writer's temporary file is left."""
    for path in runs.rglob("*.json"):
        assert is_complete_record(path), path
    assert not list(runs.rglob(".*.tmp"))


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and /proc: Linux")
def test_pipeline_killed_with_sigkill_resumes_exactly_the_missing_runs(tmp_path, capsys):
    profile = write_toy_project(tmp_path, hang_first=[1])
    out = tmp_path / "runs" / "faults" / "toy" / "digits"
    proc = subprocess.Popen([sys.executable, "-m", "nbutils.pipeline",
                             *pipeline_args(tmp_path, profile, "--jobs", "1")],
                            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # class 0 finishes, class 1 hangs: kill the pipeline in the middle of class 1
        pid_file = tmp_path / "marks" / "class1_seed0.pid"
        wait_for(pid_file.exists, 90, "class 1 to start")
        kernel, worker = map(int, pid_file.read_text().split())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    # the pool worker and the kernel die with the pipeline: nothing finishes behind our back
    wait_for(lambda: not alive(worker) and not alive(kernel), 15, "the worker and kernel to exit")
    assert is_complete_record(out / "class0_seed0.json")
    assert not (out / "class1_seed0.json").exists() and not (out / "class2_seed0.json").exists()
    assert finished_runs(tmp_path) == ["class0_seed0"]
    assert_no_half_records(tmp_path / "runs")
    before = (out / "class0_seed0.json").stat().st_mtime_ns

    assert pipeline.main(pipeline_args(tmp_path, profile, "--jobs", "2")) == 0
    text = capsys.readouterr().out
    assert "1 of 3 runs already have records: skipped" in text and "2 succeeded, 0 failed" in text
    assert (out / "class0_seed0.json").stat().st_mtime_ns == before  # the finished run kept
    assert finished_runs(tmp_path) == ["class0_seed0", "class1_seed0", "class2_seed0"]
    assert_no_half_records(tmp_path / "runs")


def test_a_run_that_raises_or_hangs_fails_alone_with_its_notebook_kept(tmp_path, capsys):
    """Class 1 hangs: the run set's ``timeout_s`` is long, ``--timeout`` overrides it and the
    kernel is killed; class 2 raises; class 0 is done regardless."""
    profile = write_toy_project(tmp_path, hang_on=[1], fail_on=[2], extra="    timeout_s: 600\n")
    jobs = pipeline.plan(str(profile), tmp_path / "runs", notebook_dir=tmp_path / "notebooks")
    assert [j.timeout_s for j in jobs] == [600] * 3 and not any(j.gpu for j in jobs)
    out = tmp_path / "runs" / "faults" / "toy" / "digits"
    start = time.monotonic()
    assert pipeline.main(pipeline_args(tmp_path, profile, "--jobs", "2", "--timeout", "6")) == 1
    assert time.monotonic() - start < 60
    summary = capsys.readouterr().out
    assert "1 succeeded, 2 failed" in summary
    assert "FAILED toy/digits/class1_seed0: timeout: stopped after 6 s" in summary
    assert "FAILED toy/digits/class2_seed0: RuntimeError: class 2 is broken on purpose" in summary
    assert finished_runs(tmp_path) == ["class0_seed0"]
    assert not (out / "class1_seed0.json").exists() and not (out / "class2_seed0.json").exists()
    kernel, _ = map(int, (tmp_path / "marks" / "class1_seed0.pid").read_text().split())
    assert not alive(kernel)
    # both failed runs keep their executed notebook, with the error or the cell it hung in
    raised = nbformat.read(out / "class2_seed0.ipynb", as_version=4)
    assert any(o.get("ename") == "RuntimeError" for c in raised.cells for o in c.get("outputs", []))
    hung = nbformat.read(out / "class1_seed0.ipynb", as_version=4)
    assert "time.sleep(600)" in hung.cells[-1].source
    assert_no_half_records(tmp_path / "runs")
    # the sweep's wall time and each run's time and state are logged beside the chapters
    [sweep] = [json.loads(line) for line in
               (tmp_path / "runs" / "faults" / "sweeps.jsonl").read_text().splitlines()]
    assert sweep["where"] == "pool of 2" and 6 <= sweep["wall_s"] < 60 and not sweep["interrupted"]
    runs = {r["run"]: r for r in sweep["runs"]}
    assert runs["toy/digits/class1_seed0"]["message"].startswith("timeout")
    assert runs["toy/digits/class0_seed0"]["ok"] and runs["toy/digits/class0_seed0"]["seconds"] > 0


TRAIN = '''
import json, sys, time
import torch
from nbutils.methods import gradcon as gc

torch.set_num_threads(1)
from pathlib import Path
state, result, slow = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "slow"
progress = state.with_suffix(".progress")
gen = torch.Generator().manual_seed(0)
train = torch.rand(32, 1, 28, 28, generator=gen, dtype=torch.float64)
val = torch.rand(16, 1, 28, 28, generator=gen, dtype=torch.float64)
config = gc.TrainConfig(seed=3, epochs=5, batch_size=16, variant="cae_grad", save_every=1)
if slow:  # the same training, slowed down so that it can be killed mid-way
    trange = gc.trange
    class SlowTrange:
        def __init__(self, *args, **kwargs):
            self.bar = trange(*args, **kwargs)
        def set_postfix(self, **kwargs):
            self.bar.set_postfix(**kwargs)
        def __iter__(self):
            for epoch in self.bar:
                time.sleep(0.4)
                progress.write_text(str(epoch))  # the epochs before it are done and saved
                yield epoch
    gc.trange = SlowTrange

def run(path):
    torch.manual_seed(3)
    model = gc.make_model("cae_grad", 1).double()
    snaps, history, _ = gc.train_gradcon(model, train, val, config, path)
    return {"history": history, "model": model.state_dict()}

resumed = run(state)  # continues from the state file when there is one
if not slow:
    whole = run(None)
    same = resumed["history"] == whole["history"] and all(
        torch.equal(v, whole["model"][k]) for k, v in resumed["model"].items())
    result.write_text(json.dumps({"epochs": [h["epoch"] for h in resumed["history"]],
                                  "same": same}))
'''


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL: POSIX")
def test_a_training_killed_with_sigkill_resumes_from_its_last_state(tmp_path):
    """GradCon's trainer (the chapters' long trainings save their state the same way) killed
    in a real process mid-way: a new process continues from the saved epoch, not from zero,
    and ends with the uninterrupted run's history and weights, bit for bit."""
    import re

    script, state, result = tmp_path / "train.py", tmp_path / "run.state.pt", tmp_path / "r.json"
    progress = state.with_suffix(".progress")
    script.write_text(TRAIN)
    proc = subprocess.Popen([sys.executable, str(script), str(state), str(result), "slow"],
                            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:  # kill it during its fourth epoch, three epochs done and saved
        wait_for(lambda: progress.exists() and progress.read_text() == "3"
                 or proc.poll() is not None, 90, "epoch 3's state")
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    done = subprocess.run([sys.executable, str(script), str(state), str(result), "fast"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed_after = re.search(r"resumed from run.state.pt after epoch (\d+)", done.stdout)
    assert resumed_after and 3 <= int(resumed_after[1]) < 5, done.stdout  # not from scratch
    out = json.loads(result.read_text())
    assert out["epochs"] == [1, 2, 3, 4, 5] and out["same"]


def test_a_record_write_cut_short_leaves_the_old_record(tmp_path):
    """A record is written to a temporary file and renamed: a write that fails half-way (here
    a value JSON cannot hold, met after the first keys are written) leaves the previous
    record whole and no temporary file."""
    from nbutils.records import REQUIRED, write_record

    record = {k: 0 for k in REQUIRED}
    path = write_record(record, tmp_path / "r.json")
    with pytest.raises(TypeError):
        write_record({**record, "metrics": {"auroc": object()}}, path)
    assert read_record(path) == record and not list(tmp_path.glob(".*"))
