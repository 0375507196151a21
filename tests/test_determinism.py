"""The same seed on the CPU gives the same metrics twice, for every chapter: the smoke profile
executed twice by the pipeline into two runs folders, each training from scratch (its own
checkpoint folder), and every metric of the two records compared (to 1e-6). The first
execution is the session's ``smoke_book`` (tests/conftest.py), which the notebook tests use too.

What changes on a GPU (cuDNN's algorithm choice, atomic additions in some kernels) is said in
book/protocol.md; this test pins the CPU case, where the book's quick profile runs."""

import math

import pytest

from nbutils import pipeline
from nbutils.chapters import load_manifest
from nbutils.records import read_record

CHAPTERS = [c.notebook for c in load_manifest().present()]


@pytest.fixture(scope="module")
def two_executions(smoke_book, tmp_path_factory):
    _, first_jobs, first_outcomes = smoke_book
    root = tmp_path_factory.mktemp("determinism")
    jobs = pipeline.plan("smoke", root / "runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("CHECKPOINT_DIR", str(root / "checkpoints"))  # train from scratch
    try:
        outcomes = pipeline.run(jobs, n_jobs=2)
    finally:
        mp.undo()
    return [(first_jobs, {o.job.output: o for o in first_outcomes}),
            (jobs, {o.job.output: o for o in outcomes})]


def _numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every number among a record's metrics (nested ones by their dotted path)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{prefix}{key}[{i}]": float(v) for i, v in enumerate(value)})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("notebook", CHAPTERS)
def test_the_same_seed_on_the_cpu_gives_the_same_metrics(two_executions, notebook):
    (first_jobs, first), (second_jobs, second) = two_executions
    pairs = [(a, b) for a, b in zip(first_jobs, second_jobs, strict=True) if a.notebook == notebook]
    assert pairs, f"the smoke profile has no run of {notebook}"
    for a, b in pairs:
        for job, outcomes in ((a, first), (b, second)):
            outcome = outcomes.get(job.output)
            assert outcome is not None and outcome.ok, (job.name, outcome and outcome.message)
        ra, rb = read_record(a.record), read_record(b.record)
        assert ra["device"].startswith("cpu") and ra["seed"] == rb["seed"]
        ma, mb = _numbers(ra["metrics"]), _numbers(rb["metrics"])
        assert ma and ma.keys() == mb.keys(), a.name
        differ = {k: (ma[k], mb[k]) for k in ma
                  if not (math.isclose(ma[k], mb[k], rel_tol=0, abs_tol=1e-6)
                          or math.isnan(ma[k]) and math.isnan(mb[k]))}
        assert not differ, f"{a.name}: metrics differ between two executions: {differ}"
