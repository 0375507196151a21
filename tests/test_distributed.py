"""The pipeline on a real Dask cluster (a local scheduler and two worker processes): the same
records as the local pool, and a worker killed with SIGKILL under its run: the run is retried
on a worker and completes once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_faults import (
    alive,
    assert_no_half_records,
    finished_runs,
    pipeline_args,
    wait_for,
    write_toy_project,
)

from nbutils import pipeline
from nbutils.config import PROJECT_ROOT
from nbutils.records import read_record

distributed = pytest.importorskip("distributed")

# what two executions of one run may differ in (the commit: another may land in between)
VARYING = ("date", "timings", "host", "git_commit")


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and two worker processes (under nannies), one run at a time each."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, memory_limit=0) as local:
        yield local


def test_gpu_runs_default_to_one_job_per_visible_gpu_each_pinned(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,9")
    assert pipeline.visible_gpus() == ["7", "9"]
    profile = write_toy_project(tmp_path, extra="    gpu: true\n")
    assert all(j.gpu for j in pipeline.plan(str(profile), tmp_path / "runs",
                                            notebook_dir=tmp_path / "notebooks"))
    assert pipeline.main(pipeline_args(tmp_path, profile)) == 0
    assert "2 job(s), pinned to GPU(s) 7, 9" in capsys.readouterr().out
    assert {(tmp_path / "marks" / f"class{c}_seed0.gpu").read_text() for c in range(3)} <= {"7", "9"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pipeline.visible_gpus() == []


def _records(runs):
    return {p.relative_to(runs).as_posix().split("/", 1)[1]:
            {k: v for k, v in read_record(p).items() if k not in VARYING}
            for p in sorted(runs.rglob("*.json"))}


def test_a_sweep_on_dask_writes_the_records_the_local_pool_writes(tmp_path, cluster, capsys):
    pool_root, dask_root = tmp_path / "pool", tmp_path / "dask"
    for root in (pool_root, dask_root):  # the same sweep (the records do not name mark_dir)
        write_toy_project(root, classes=(0, 1), seeds=(0, 1))
    assert pipeline.main(pipeline_args(pool_root, pool_root / "faults.yml", "--jobs", "2")) == 0
    assert pipeline.main(pipeline_args(dask_root, dask_root / "faults.yml",
                                       "--scheduler", cluster.scheduler_address)) == 0
    out = capsys.readouterr().out
    assert "2 worker(s)" in out and "4 succeeded, 0 failed" in out
    pool, dask = _records(pool_root / "runs"), _records(dask_root / "runs")
    assert len(dask) == 4
    for name, record in dask.items():
        assert {k: v for k, v in record.items() if record[k] != pool[name][k]} == {}, name
    assert dask == pool
    assert {r["metrics"]["auroc"] for r in dask.values()} == {0.5, 0.501, 0.51, 0.511}
    # the executed pages are there too, with their provenance, as the book expects
    assert all(p.with_suffix(".ipynb").exists() for p in (dask_root / "runs").rglob("*.json"))
    assert finished_runs(dask_root) == finished_runs(pool_root) == [
        "class0_seed0", "class0_seed1", "class1_seed0", "class1_seed1"]


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and /proc: Linux")
def test_a_dask_worker_killed_under_its_run_is_retried_and_no_run_is_done_twice(tmp_path):
    """``--scheduler local:2 --gpu``: the pipeline starts the cluster itself, one (pretend)
    GPU per worker; class 1 hangs on its first attempt, and its worker is killed: Dask reruns
    it elsewhere, once."""
    profile = write_toy_project(tmp_path, hang_first=[1])
    proc = subprocess.Popen([sys.executable, "-m", "nbutils.pipeline",
                             *pipeline_args(tmp_path, profile, "--scheduler", "local:2", "--gpu")],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "7,9"})
    try:
        pid_file = tmp_path / "marks" / "class1_seed0.pid"
        wait_for(lambda: pid_file.exists() or proc.poll() is not None, 120, "class 1 to start")
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)  # the file is written in one call; let it be complete
        kernel, worker = map(int, pid_file.read_text().split())
        signal_sent = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "3 succeeded, 0 failed" in output, output
    assert finished_runs(tmp_path) == ["class0_seed0", "class1_seed0", "class2_seed0"]
    wait_for(lambda: not alive(kernel), 10, "the killed worker's kernel to exit")
    _, second_worker = map(int, pid_file.read_text().split())  # the retry's
    assert second_worker != worker
    # each run saw its worker's one GPU (and asked for it: no warning that none is offered)
    assert {(tmp_path / "marks" / f"class{c}_seed0.gpu").read_text() for c in range(3)} <= {"7", "9"}
    assert "no Dask worker offers the resource GPU" not in output
    assert time.monotonic() - signal_sent < 120
    assert_no_half_records(tmp_path / "runs")
    out = tmp_path / "runs" / "faults" / "toy" / "digits"
    assert json.loads((out / "class1_seed0.json").read_text())["metrics"]["auroc"] == 0.51


def test_bad_scheduler_options_give_clear_errors(tmp_path, capsys):
    profile = write_toy_project(tmp_path)
    assert pipeline.main(pipeline_args(tmp_path, profile, "--scheduler", "local:x")) == 2
    assert "--scheduler local:N takes a number" in capsys.readouterr().err
    assert pipeline.main(pipeline_args(tmp_path, profile, "--scheduler", "local:2",
                                       "--jobs", "2")) == 2
    assert "--jobs is for the local pool" in capsys.readouterr().err
    assert pipeline.main(pipeline_args(tmp_path, profile, "--scheduler", "nonsense://x")) == 2
    assert "cannot reach the Dask scheduler at 'nonsense://x'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
