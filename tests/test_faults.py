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


# One small training per chapter that trains for long, each a `train(path)` returning its curve
# and final weights; `module` is where the chapter's trainer finds `save_checkpoint`.
TRAINERS = {
    "gradcon": """
from nbutils.methods import gradcon as module
gen = torch.Generator().manual_seed(0)
x = torch.rand(48, 1, 28, 28, generator=gen, dtype=torch.float64)
config = module.TrainConfig(seed=3, epochs=5, batch_size=16, variant="cae_grad", save_every=1)
def train(path):
    torch.manual_seed(3)
    model = module.make_model("cae_grad", 1).double()
    _, history, _ = module.train_gradcon(model, x[:32], x[32:], config, path)
    return history, model.state_dict()
""",
    "flow_llr": """
from nbutils.methods import flow_llr as module
data = torch.randint(0, 256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                     dtype=torch.uint8).numpy()
def train(path):
    torch.manual_seed(3)
    model = module.Glow(1, levels=2, steps_per_level=2, hidden=8)
    history = module.train_flow(model, data, 5, lr=1e-3, weight_decay=0.0, batch_size=16,
                                warmup_steps=2, state_path=path)
    return history, model.state_dict()
""",
    "cpc_ad": """
from nbutils.methods import cpc_ad as module
x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
def train(path):
    torch.manual_seed(3)
    model = module.CPCAD("resnet18", "layer", prediction_steps=2)
    out = module.train_cpc(model, x[:4], x[4:], epochs=5, batch_size=2, lr=1e-3, patch_size=8,
                           patch_stride=4, n_negatives=4, skip=1, seed=0, bank_images=4,
                           ckpt_path=path)
    return out["history"], model.state_dict()
""",
    "efficientad": """
from nbutils.methods import efficientad as module
x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
def train(path):
    torch.manual_seed(3)
    model = module.EfficientAD(module.pdn("small"), "small", 64)
    mean, std = module.teacher_normalization(model.teacher, x)
    model.teacher_mean.copy_(mean)
    model.teacher_std.copy_(std)
    out = module.train_efficientad(model, x[:4], x[4:], steps=5, batch_size=1, lr=1e-4,
                                   weight_decay=1e-5, hard_q=0.999, penalty_images=None, seed=0,
                                   ckpt_path=path, save_every=1, eval_every=1)
    return out["curve"], model.state_dict()
""",
}

HARNESS = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
state, result, slow = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "slow"
{trainer}
if slow:  # the same training, paused after each save so that it can be killed mid-way
    saves, save = state.with_suffix(".saves"), module.save_checkpoint
    def slow_save(obj, path):
        save(obj, path)
        saves.write_text(str(int(saves.read_text()) + 1 if saves.exists() else 1))
        time.sleep(0.5)
    module.save_checkpoint = slow_save
steps = [0]  # optimiser steps taken in this process
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(lambda *a: steps.__setitem__(0, steps[0] + 1))
curve, weights = train(state)  # continues from the state file when there is one
if not slow:
    resumed_steps = steps[0]
    whole_curve, whole = train(state.with_name("whole.pt"))
    untimed = lambda c: json.dumps([{{k: v for k, v in r.items() if "second" not in k}}
                                    if isinstance(r, dict) else r for r in c])
    result.write_text(json.dumps({{
        "resumed_steps": resumed_steps, "whole_steps": steps[0] - resumed_steps,
        "same_curve": untimed(curve) == untimed(whole_curve),
        "same_weights": all(torch.equal(v.nan_to_num(), whole[k].nan_to_num())  # NaN: unset
                            for k, v in weights.items())}}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL: POSIX")
@pytest.mark.parametrize("chapter", list(TRAINERS))
def test_a_training_killed_with_sigkill_resumes_from_its_last_state(tmp_path, chapter):
    """Each chapter's trainer, killed in a real process just after its second save: a new
    process continues from that state, not from zero (it takes fewer optimiser steps than a
    whole training), and ends with the uninterrupted training's curve and weights, bit for bit."""
    script, state, result = tmp_path / "train.py", tmp_path / "run.state.pt", tmp_path / "r.json"
    saves = state.with_suffix(".saves")
    script.write_text(HARNESS.format(trainer=TRAINERS[chapter]))
    proc = subprocess.Popen([sys.executable, str(script), str(state), str(result), "slow"],
                            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: saves.exists() and saves.read_text() == "2" or proc.poll() is not None,
                 120, "the second save")
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert state.exists() and not list(tmp_path.glob(".*.tmp"))
    done = subprocess.run([sys.executable, str(script), str(state), str(result), "fast"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(result.read_text())
    assert 0 < out["resumed_steps"] < out["whole_steps"], out  # resumed, not from scratch
    assert out["same_curve"] and out["same_weights"], out


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
