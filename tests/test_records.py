import json

import pytest

from nbutils.records import (
    Timer,
    find_records,
    is_complete_record,
    make_record,
    read_record,
    records_table,
    write_record,
)


def _record(**overrides):
    base = dict(method="m", variant="v", dataset="digits", normal_class=3, protocol="full",
                seed=1, profile="quick", params={"lr": 1e-3}, metrics={"auroc": 0.9, "auroc.x": 0.7},
                timings={"train_seconds": 2.0}, device="cpu: test")
    base.update(overrides)
    return make_record(**base)


def test_round_trip(tmp_path):
    import numpy as np

    record = _record(metrics={"auroc": np.float32(0.5), "curve": np.arange(3)})
    path = write_record(record, tmp_path / "a" / "r.json")
    back = read_record(path)
    assert back["metrics"] == {"auroc": 0.5, "curve": [0, 1, 2]}
    assert back["versions"]["torch"] and back["git_commit"] and back["date"]
    assert list(tmp_path.rglob("*.tmp")) == []


def test_incomplete_or_truncated_records_are_never_read(tmp_path):
    good = write_record(_record(), tmp_path / "class3_seed1.json")
    text = good.read_text()
    (tmp_path / "half.json").write_text(text[: len(text) // 2])
    (tmp_path / "partial.json").write_text(json.dumps({"method": "m"}))
    (tmp_path / ".class4_seed1.json.abc.tmp").write_text(text)
    assert not is_complete_record(tmp_path / "half.json")
    assert not is_complete_record(tmp_path / "partial.json")
    assert find_records(tmp_path) == [good]
    with pytest.raises(ValueError, match="not valid JSON"):
        read_record(tmp_path / "half.json")


def test_write_refuses_incomplete_record(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        write_record({"method": "m"}, tmp_path / "r.json")


def test_records_table(tmp_path):
    write_record(_record(seed=0), tmp_path / "quick" / "nb" / "digits" / "class3_seed0.json")
    write_record(_record(seed=1), tmp_path / "quick" / "nb" / "digits" / "class3_seed1.json")
    table = records_table(tmp_path)
    assert len(table) == 2 and set(table["seed"]) == {0, 1}
    assert table["metric.auroc.x"].tolist() == [0.7, 0.7]
    assert set(table["notebook"]) == {"nb"} and set(table["run_set"]) == {"digits"}
    assert "record" not in table
    full = records_table(tmp_path, with_record=True)
    assert [r["seed"] for r in full["record"]] == full["seed"].tolist()
    assert all(r == read_record(p) for r, p in zip(full["record"], full["path"]))


def test_timer_accumulates():
    timer = Timer()
    for _ in range(2):
        with timer("step"):
            pass
    assert set(timer.seconds) == {"step"} and timer.seconds["step"] >= 0


def test_git_commit_of_a_copied_tree_comes_from_the_environment(tmp_path, monkeypatch):
    from nbutils.records import git_commit

    monkeypatch.delenv("NBUTILS_GIT_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"
    assert git_commit() not in ("unknown", "abc123def456")  # a checkout asks git
    monkeypatch.setenv("NBUTILS_GIT_COMMIT", "abc123def456")
    assert git_commit(tmp_path) == "abc123def456"
    assert git_commit() == "abc123def456"  # a stale .git must not win over the named commit
