import json
import sqlite3

import pandas as pd
import pytest

from flatprior.errors import FlatpriorError
from flatprior.experiments.store import SCHEMA_VERSION, Store, flatten_record


def rec(key, status="zero_error", **kw):
    return {"key": key, "status": status, "config": {"seed": 1, "hidden": [40, 40],
            "n_attack": 5}, "versions": {"flatprior": "0.1.0"}, "test_error": 0.25,
            "history": [{"epoch": 0}], **kw}


def test_put_read_replace_and_members(tmp_path):
    db = tmp_path / "r.db"
    with Store(db) as s:
        s.put(rec("a"), "spec1")
        s.put(rec("b", "failed", error="boom"), "spec1")
        s.add_members("spec2", ["a"])
        s.set_spec("spec1", {"analysis": "attack"})
        assert s.statuses() == {"a": "zero_error", "b": "failed"}
        s.put(rec("b", "zero_error"), "spec1")  # retry replaces, never duplicates
        assert s.count() == 2 and s.statuses()["b"] == "zero_error"
    with Store(db, readonly=True) as s:
        assert s.specs() == ["spec1", "spec2"]
        assert [r["key"] for r in s.records(spec="spec2")] == ["a"]
        assert s.spec_info("spec1") == {"analysis": "attack"} and s.spec_info("x") == {}
        r = next(s.records(status="zero_error"))
        assert r["history"] == [{"epoch": 0}] and "created" in r
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION)


def test_flatten_and_export(tmp_path):
    row = flatten_record(rec("a", sharpness=0.5))
    assert row["key"] == "a" and row["sharpness"] == 0.5 and row["n_attack"] == 5
    assert row["hidden"] == "[40,40]" or json.loads(row["hidden"]) == [40, 40]
    assert "history" not in row and row["flatprior_version"] == "0.1.0"
    with Store(tmp_path / "r.db") as s:
        for i in range(3):
            s.put(rec(f"k{i}", sharpness=0.1 * i), "sp")
        df = s.to_frame(spec="sp")
        assert list(df["key"]) == ["k0", "k1", "k2"] and set(df["spec"]) == {"sp"}
        s.export(tmp_path / "r.csv")
        s.export(tmp_path / "r.parquet")
        with pytest.raises(FlatpriorError, match=".csv or .parquet"):
            s.export(tmp_path / "r.xlsx")
    for f in ("r.csv", "r.parquet"):
        back = pd.read_csv(tmp_path / f) if f.endswith("csv") else pd.read_parquet(tmp_path / f)
        assert back["sharpness"].tolist() == pytest.approx([0.0, 0.1, 0.2])


def test_bad_databases_are_one_line_errors(tmp_path):
    with pytest.raises(FlatpriorError, match="folder .* does not exist"):
        Store(tmp_path / "missing" / "r.db")
    with pytest.raises(FlatpriorError, match="is a folder"):
        Store(tmp_path)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"hello, not sqlite" * 100)
    with pytest.raises(FlatpriorError, match="not a flatprior results database"):
        Store(junk)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(FlatpriorError, match="SQLite file but not a flatprior"):
        Store(other)
    old = tmp_path / "old.db"
    Store(old).close()
    con = sqlite3.connect(old)
    con.execute("UPDATE meta SET value='0' WHERE name='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(FlatpriorError, match="schema version 0.*reads version 1") as e:
        Store(old)
    assert "\n" not in str(e.value)
    with pytest.raises(FlatpriorError, match="no results database"):
        Store(tmp_path / "nope.db", readonly=True)


def test_unwritable_folder(tmp_path):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        # root may write to a 0500 folder; /proc refuses new files to everyone
        target = ro / "r.db" if not os.access(ro, os.W_OK) else "/proc/flatprior-test.db"
        with pytest.raises(FlatpriorError, match="cannot open results database") as e:
            Store(target)
        assert "\n" not in str(e.value)
    finally:
        ro.chmod(0o700)


def test_record_must_be_json(tmp_path):
    with Store(tmp_path / "r.db") as s:
        with pytest.raises(FlatpriorError, match="needs 'key' and 'status'"):
            s.put({"status": "x"})
        with pytest.raises(FlatpriorError, match="not JSON"):
            s.put(rec("a", x=float("nan")))
        assert s.count() == 0  # nothing half-written


def test_execution_counts_per_spec(tmp_path):
    from flatprior.experiments.store import Store

    recs = [{"key": "a", "status": "zero_error", "executed_as": "ensemble"},
            {"key": "b", "status": "zero_error", "executed_as": "ensemble"},
            {"key": "c", "status": "collapsed", "executed_as": "single"},
            {"key": "d", "status": "failed", "executed_as": "single"},  # failed: not counted
            {"key": "e", "status": "zero_error"}]  # stored before the field existed
    with Store(tmp_path / "s.db") as st:
        st.put_many(recs, "x")
        st.put({"key": "f", "status": "zero_error", "executed_as": "single"}, "y")
        assert st.execution_counts("x") == {"ensemble": 2, "single": 1}
        assert st.execution_counts("y") == {"single": 1}
        assert st.execution_counts("nope") == {}
