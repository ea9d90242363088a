"""SQLite store of run records: resumable, one transaction per run, safe to kill.

Layout (schema version :data:`SCHEMA_VERSION`):

* ``meta(name PRIMARY KEY, value)`` — ``schema_version`` and the ``flatprior`` version that
  created the file;
* ``runs(key PRIMARY KEY, status, created, record)`` — one row per run configuration, the record
  as JSON (config inside it: the result carries its configuration, not a file name);
* ``specs(label PRIMARY KEY, info)`` — each spec label run into this file (e.g.
  ``fig3/mnist-fcn@quick``) with its resolved description (JSON), for reports;
* ``members(spec, key)`` — which spec label asked for which run (a run shared by two specs is
  stored once and listed in both).

The database is opened in WAL mode. Every record is written in its own transaction, so a process
killed at any moment leaves either the whole row or nothing. Only the process that owns the
:class:`Store` writes; workers return records to it.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flatprior.errors import FlatpriorError

SCHEMA_VERSION = 1
#: statuses that mean "this key is done; skip it when the sweep is re-run"
FAILED = "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS specs (label TEXT PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    spec TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (spec, key)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE INDEX IF NOT EXISTS members_key ON members(key);
"""


class Store:
    """A results database (SQLite file). Use as a context manager or call :meth:`close`.

    Args:
        path: the ``.db`` file; created (with its schema) if absent.
        readonly: open an existing file for reading only (reports).

    Raises:
        FlatpriorError: the path cannot be written, is not a SQLite file, or was written by
            another schema version.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path).expanduser()
        #: keys of stored records whose JSON could not be parsed (skipped by :meth:`records`)
        self.unreadable: set[str] = set()
        # only a writable store is an output (`flatprior run --out`); reports just read a file
        self._out_hint = "" if readonly else "; choose another --out"
        if readonly and not self.path.is_file():
            raise FlatpriorError(f"no results database at {self.path}; run `flatprior run` first")
        if not readonly:
            parent = self.path.parent
            if not parent.is_dir():
                raise FlatpriorError(
                    f"cannot write results to {self.path}: folder {parent} does not exist; "
                    "create it or choose another --out"
                )
            if self.path.is_dir():
                raise FlatpriorError(f"--out {self.path} is a folder; give a file name like r.db")
        try:
            if readonly:
                self._con = self._connect_readonly()
            else:
                self._con = sqlite3.connect(self.path, timeout=30)
            self._con.execute("PRAGMA busy_timeout=30000")
            if not readonly:
                self._con.execute("PRAGMA journal_mode=WAL")
                self._con.execute("PRAGMA synchronous=NORMAL")
            self._check_or_create(readonly)
        except sqlite3.DatabaseError as exc:
            self._close_quietly()
            msg = str(exc)
            if "not a database" in msg or "malformed" in msg:
                raise FlatpriorError(
                    f"{self.path} is not a flatprior results database (SQLite: {msg})"
                    f"{self._out_hint}"
                ) from None
            if readonly:
                raise FlatpriorError(
                    f"cannot read results database {self.path} ({msg}); check that the file is "
                    "readable"
                ) from None
            raise FlatpriorError(
                f"cannot open results database {self.path} ({msg}); free space / make the file "
                "and its folder writable, or choose another --out"
            ) from None

    def _connect_readonly(self) -> sqlite3.Connection:
        """Open for reading without leaving files behind.

        A WAL database read with ``mode=ro`` gets ``-wal``/``-shm`` files created next to it
        (and kept after closing), which fails in a read-only folder. When no ``-wal`` file
        exists no process has the store open (a writer keeps its ``-wal`` while connected), so
        the file is opened ``immutable`` (no locks, no side files). When a writer is active,
        ``mode=ro`` shares its ``-wal``/``-shm`` and sees its committed runs; if that fails
        too (read-only folder), ``immutable`` reads what is checkpointed into the main file.
        """
        base = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
        wal = self.path.with_name(self.path.name + "-wal")
        if not wal.exists():
            return sqlite3.connect(base + "&immutable=1", uri=True, timeout=30)
        try:
            con = sqlite3.connect(base, uri=True, timeout=30)
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return con
        except sqlite3.OperationalError:
            return sqlite3.connect(base + "&immutable=1", uri=True, timeout=30)

    # -- schema ------------------------------------------------------------------------------
    def _check_or_create(self, readonly: bool) -> None:
        tables = {
            r[0] for r in self._con.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if not tables:
            if readonly:
                raise FlatpriorError(f"{self.path} is empty, not a flatprior results database")
            from flatprior import __version__

            with self._con:
                self._con.executescript(_SCHEMA)
                self._con.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("schema_version", str(SCHEMA_VERSION)), ("created_by", __version__)],
                )
            return
        if not {"meta", "runs", "specs", "members"} <= tables:
            raise FlatpriorError(
                f"{self.path} is a SQLite file but not a flatprior results database"
                f"{self._out_hint}"
            )
        row = self._con.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        found = row[0] if row else "none"
        if found != str(SCHEMA_VERSION):
            fix = "use a new --out file or" if not readonly else "use"
            raise FlatpriorError(
                f"{self.path} has results schema version {found}, this flatprior reads version "
                f"{SCHEMA_VERSION}; {fix} the flatprior version that wrote it"
            )

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One transaction (COMMIT, or ROLLBACK on error).

        A failed write (disk full, read-only file, locked) becomes one line telling how to
        resume.
        """
        try:
            with self._con:
                yield
        except sqlite3.OperationalError as exc:
            raise FlatpriorError(
                f"cannot write to results database {self.path} ({exc}); free space / make the "
                "file writable, then re-run to resume (finished runs are kept)"
            ) from None

    # -- writing -----------------------------------------------------------------------------
    def put(self, record: dict[str, Any], spec: str | None = None) -> None:
        """Insert or replace one run record in one transaction (needs ``key`` and ``status``)."""
        self.put_many([record], spec)

    def put_many(self, records: Iterable[dict[str, Any]], spec: str | None = None) -> None:
        """Insert or replace run records, all in ONE transaction.

        An ensemble's members are stored together or not at all.
        """
        rows = []
        for record in records:
            key, status = record.get("key"), record.get("status")
            if not key or not status:
                raise FlatpriorError("a record needs 'key' and 'status' to be stored")
            try:
                blob = json.dumps(record, allow_nan=False, separators=(",", ":"))
            except ValueError as exc:
                raise FlatpriorError(f"record {key} is not JSON-serialisable ({exc})") from None
            rows.append((key, status, time.time(), blob))
        with self._writing():  # BEGIN … COMMIT, or ROLLBACK on error: never a partial row
            self._con.executemany(
                "INSERT OR REPLACE INTO runs(key, status, created, record) VALUES (?, ?, ?, ?)",
                rows,
            )
            if spec:
                self._con.executemany(
                    "INSERT OR IGNORE INTO members VALUES (?, ?)", [(spec, r[0]) for r in rows]
                )

    def set_spec(self, label: str, info: dict[str, Any]) -> None:
        """Store (or update) the description of a spec label."""
        with self._writing():
            self._con.execute(
                "INSERT OR REPLACE INTO specs VALUES (?, ?)", (label, json.dumps(info, default=str))
            )

    def spec_info(self, label: str) -> dict[str, Any]:
        """The description stored by :meth:`set_spec` (``{}`` if none)."""
        row = self._con.execute("SELECT info FROM specs WHERE label = ?", (label,)).fetchone()
        try:
            return json.loads(row[0]) if row else {}
        except ValueError:  # damaged description: the runs can still be analysed
            return {}

    def add_members(self, spec: str, keys: Iterable[str]) -> None:
        """List already-stored runs under ``spec`` too (a re-run that skipped them)."""
        with self._writing():
            self._con.executemany(
                "INSERT OR IGNORE INTO members VALUES (?, ?)", [(spec, k) for k in keys]
            )

    # -- reading -----------------------------------------------------------------------------
    def statuses(self) -> dict[str, str]:
        """``key -> status`` of every stored run."""
        return dict(self._con.execute("SELECT key, status FROM runs"))

    def specs(self) -> list[str]:
        """Names of the specs with runs in this database, in order of first appearance."""
        rows = self._con.execute(
            "SELECT m.spec, MIN(r.created) AS t FROM members m JOIN runs r ON r.key = m.key "
            "GROUP BY m.spec ORDER BY t"
        )
        return [r[0] for r in rows]

    def records(
        self, spec: str | None = None, status: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Stored records (dicts, with ``created``), optionally of one spec and/or status.

        A record whose JSON cannot be parsed (a damaged file, an edit by hand) is skipped and
        its key added to :attr:`unreadable`, so one bad row does not stop a report.
        """
        q = "SELECT r.record, r.created, r.key FROM runs r"
        args: list[Any] = []
        where = []
        if spec is not None:
            q += " JOIN members m ON m.key = r.key"
            where.append("m.spec = ?")
            args.append(spec)
        if status is not None:
            where.append("r.status = ?")
            args.append(status)
        if where:
            q += " WHERE " + " AND ".join(where)
        q += " ORDER BY r.created, r.key"
        # the cursor is read as it goes: a caller that stops early (the first config of a
        # spec) does not pull every record of a 1e5-run sweep out of SQLite
        for blob, created, key in self._con.execute(q, args):
            try:
                rec = json.loads(blob)
            except (TypeError, ValueError):
                rec = None
            if not isinstance(rec, dict):
                self.unreadable.add(key)
                continue
            rec["created"] = created
            yield rec

    def execution_counts(self, spec: str) -> dict[str, int]:
        """How many of ``spec``'s finished runs each path ran: ``{"ensemble": n, "single": m}``.

        From the records' ``executed_as`` (failed runs and records stored before the field
        existed are not counted), by SQLite's JSON functions: no record is parsed in Python.
        """
        q = ("SELECT json_extract(r.record, '$.executed_as'), COUNT(*) FROM runs r "
             "JOIN members m ON m.key = r.key WHERE m.spec = ? AND r.status != ? "
             "AND json_valid(r.record) GROUP BY 1")
        try:
            rows = self._con.execute(q, (spec, FAILED)).fetchall()
        except sqlite3.OperationalError:  # an SQLite built without JSON functions
            rows = Counter(r.get("executed_as") for r in self.records(spec=spec)
                           if r.get("status") != FAILED).items()
        return {k: int(n) for k, n in rows if k in ("ensemble", "single")}

    def versions(self) -> list[dict[str, Any]]:
        """The distinct ``versions`` dicts of the stored records (library versions of the runs).

        Extracted by SQLite's JSON functions, so a report does not parse every record again;
        records SQLite cannot parse are skipped, as :meth:`records` skips them.
        """
        try:
            rows = self._con.execute(
                "SELECT DISTINCT json_extract(record, '$.versions') FROM runs "
                "WHERE json_valid(record)").fetchall()
        except sqlite3.OperationalError:  # an SQLite built without JSON functions
            return list({json.dumps(r.get("versions") or {}, sort_keys=True): r.get("versions")
                         or {} for r in self.records()}.values())
        out = []
        for (blob,) in rows:
            try:
                v = json.loads(blob) if blob is not None else None
            except (TypeError, ValueError):
                continue
            if isinstance(v, dict):
                out.append(v)
        return out

    def count(self) -> int:
        """Number of stored runs (any status)."""
        return int(self._con.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def to_frame(self, spec: str | None = None, status: str | None = None):
        """Records as a pandas DataFrame of scalar fields, one row per distinct run.

        Rows: see :func:`flatten_record`.

        Records of the same run stored under two keys (stores written before measure lists were
        made canonical, see :meth:`flatprior.pipeline.RunConfig.key`) are one run: a record
        whose key was hashed from its config (old or new recipe) is identified by the canonical
        :func:`flatprior.pipeline.config_key`, and the latest record of each run is kept, so
        ``n`` counts runs. Records with keys of their own (custom run functions) stay distinct.
        """
        return records_frame(self.records(spec, status), spec)

    def export(self, path: str | Path, spec: str | None = None) -> Path:
        """Write the flattened records to ``.csv`` or ``.parquet`` (chosen by the suffix)."""
        path = Path(path)
        df = self.to_frame(spec)
        if path.suffix == ".csv":
            df.to_csv(path, index=False)
        elif path.suffix in (".parquet", ".pq"):
            df.to_parquet(path, index=False)
        else:
            raise FlatpriorError(f"export to {path.name}: use a .csv or .parquet file name")
        return path

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the database (also done on leaving the ``with`` block)."""
        self._close_quietly()

    def _close_quietly(self) -> None:
        con = getattr(self, "_con", None)
        if con is not None:
            try:
                con.close()
            except sqlite3.Error:
                pass
            self._con = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def records_frame(records: Iterable[dict[str, Any]], spec: str | None = None):
    """:meth:`Store.to_frame` of records already read (oldest first): one row per distinct run."""
    import pandas as pd

    from flatprior.config import config_key

    latest: dict[str, dict[str, Any]] = {}
    for r in records:  # ordered by time: a later record replaces
        cfg, key = r.get("config"), str(r.get("key"))
        if isinstance(cfg, dict):
            canonical = config_key(cfg)
            if key != canonical and key == config_key(cfg, canonical=False):
                key = canonical
        latest[key] = r
    rows = [flatten_record(r) for r in latest.values()]
    if spec is not None:
        for r in rows:
            r["spec"] = spec
    return pd.DataFrame(rows)


def flatten_record(rec: dict[str, Any]) -> dict[str, Any]:
    """One DataFrame row: the record's scalar fields, then config fields not already present.

    Config fields carry today's names (:func:`flatprior.config.migrate_config`). Lists in the
    config (``hidden``, ``measures``) become compact JSON strings; ``history``,
    ``notes``, ``traceback`` and ``versions`` are dropped (``versions`` is kept as
    ``flatprior_version``).
    """
    row: dict[str, Any] = {}
    for k, v in rec.items():
        if k in ("config", "history", "versions", "notes", "traceback"):
            continue
        if v is None or isinstance(v, (str, int, float, bool)):
            row[k] = v
    from flatprior.config import migrate_config

    # records stored before a rename get today's column names (sigma_b -> sigma_b2)
    for k, v in migrate_config(rec.get("config") or {}).items():
        if k in row:
            continue
        row[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
    row["flatprior_version"] = (rec.get("versions") or {}).get("flatprior")
    return row
