"""Durable coordinator state: the :class:`Store` interface and its SQLite implementation.

SQLite runs in WAL mode with one writer (the coordinator's event loop). Tables: jobs, rounds (one row per attempt),
uploads (accepted updates: digest, weight, metrics; never tensors), evaluations (per-site federated evaluation
results: counts, loss, accuracy) and audit (security-relevant events, hash-chained). An in-memory implementation
with the same contract is in :mod:`coordinator.state.memory_store` (tests/test_store.py runs both).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from common import files
from coordinator.state.audit import GENESIS, chain_hash

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    current_round INTEGER NOT NULL DEFAULT 0,
    model_version TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    test_loss REAL,
    test_accuracy REAL,
    test_samples INTEGER,
    epsilon REAL NOT NULL DEFAULT 0,
    site_epsilon TEXT NOT NULL DEFAULT '{}',
    privacy_state TEXT NOT NULL DEFAULT '{}',
    site_aborts TEXT NOT NULL DEFAULT '{}',
    test_metrics TEXT NOT NULL DEFAULT '{}',
    feature_scaling TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    cohort TEXT NOT NULL,
    reported TEXT NOT NULL DEFAULT '[]',
    base_version TEXT NOT NULL,
    model_version TEXT NOT NULL DEFAULT '',
    train_loss REAL,
    train_samples INTEGER,
    val_loss REAL,
    val_accuracy REAL,
    val_samples INTEGER,
    timings TEXT NOT NULL DEFAULT '{}',
    detail TEXT NOT NULL DEFAULT '',
    epsilon REAL,
    val_metrics TEXT NOT NULL DEFAULT '{}',
    strategy_state TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (job_id, round, attempt)
);
CREATE TABLE IF NOT EXISTS uploads (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    site TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    train_seconds REAL NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (job_id, round, attempt, site)
);
CREATE TABLE IF NOT EXISTS evaluations (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    split TEXT NOT NULL,
    site TEXT NOT NULL,
    model_version TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    loss REAL NOT NULL,
    accuracy REAL NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (job_id, round, split, site)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""


JOB_FIELDS = frozenset(
    {
        "state",
        "current_round",
        "model_version",
        "detail",
        "test_loss",
        "test_accuracy",
        "test_samples",
        "epsilon",
        "site_epsilon",
        "privacy_state",
        "site_aborts",
        "test_metrics",
        "feature_scaling",
    }
)


@dataclass(frozen=True)
class RoundRow:
    job_id: str
    round: int
    attempt: int
    state: str
    started: float
    finished: float | None
    cohort: list[str]
    reported: list[str]
    base_version: str
    model_version: str
    train_loss: float | None
    train_samples: int | None
    val_loss: float | None
    val_accuracy: float | None
    val_samples: int | None
    timings: dict[str, float]
    detail: str
    epsilon: float | None
    val_metrics: dict[str, float]  # federated imbalance metrics of the round's evaluation (common/metrics.py)
    # A completed round's strategy state: the server optimizer's step and moments file, the selection's memory.
    strategy_state: dict[str, Any] = field(default_factory=dict)


class Store(Protocol):
    """What the coordinator keeps durably. Every write is committed before the call returns."""

    def close(self) -> None: ...
    def create_job(
        self, job_id: str, name: str, spec: Mapping[str, Any], model_version: str, state: str = "running"
    ) -> None: ...
    def update_job(self, job_id: str, **fields: Any) -> None: ...
    def jobs(self) -> list[dict[str, Any]]: ...
    def job(self, job_id: str) -> dict[str, Any] | None: ...
    def start_round(self, job_id: str, rnd: int, attempt: int, cohort: list[str], base_version: str) -> None: ...
    def finish_round(
        self,
        job_id: str,
        rnd: int,
        attempt: int,
        *,
        state: str,
        reported: list[str],
        model_version: str = "",
        train_loss: float | None = None,
        train_samples: int | None = None,
        timings: Mapping[str, float] | None = None,
        detail: str = "",
        epsilon: float | None = None,
        privacy_state: Mapping[str, Any] | None = None,
        strategy_state: Mapping[str, Any] | None = None,
    ) -> None: ...
    def abandon_round(self, job_id: str, rnd: int, attempt: int, detail: str) -> None: ...
    def discard_round(self, job_id: str, rnd: int, attempt: int, detail: str) -> None: ...
    def set_round_eval(
        self,
        job_id: str,
        rnd: int,
        attempt: int,
        loss: float,
        accuracy: float,
        n: int,
        metrics: Mapping[str, float] | None = None,
    ) -> None: ...
    def rounds(self, job_id: str) -> list[RoundRow]: ...
    def record_upload(
        self,
        job_id: str,
        rnd: int,
        attempt: int,
        site: str,
        *,
        sha256: str,
        num_samples: int,
        metrics: Mapping[str, float],
        train_seconds: float,
    ) -> None: ...
    def uploads(self, job_id: str, rnd: int, attempt: int) -> list[dict[str, Any]]: ...
    def forget_upload(self, job_id: str, rnd: int, attempt: int, site: str) -> None: ...
    def record_evaluation(
        self, job_id: str, rnd: int, split: str, site: str, model_version: str, n: int, loss: float, acc: float
    ) -> None: ...
    def evaluations(self, job_id: str, rnd: int, split: str) -> list[dict[str, Any]]: ...
    def evaluation_rows(self, job_id: str) -> list[dict[str, Any]]: ...
    def audit(self, kind: str, actor: str, **detail: Any) -> None: ...
    def audit_events(self, kind: str | None = None) -> list[dict[str, Any]]: ...


class SqliteStore:
    """The SQLite implementation of :class:`Store`; all writes are committed before the call returns."""

    def __init__(self, path: Path) -> None:
        files.private_dir(path.parent, "state_dir")
        # SQLite creates -wal and -shm with the database file's mode, so a 0600 database keeps all three private.
        files.create_private(path)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._migrate()
        self.is_open = True  # read by the readiness probe (another thread): a flag, never a query

    def _migrate(self) -> None:
        """Columns added after a state directory was first created (SQLite cannot add them in CREATE IF NOT EXISTS)."""
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)").fetchall()}
        if "privacy_state" not in have:
            self._db.execute("ALTER TABLE jobs ADD COLUMN privacy_state TEXT NOT NULL DEFAULT '{}'")
        if "site_aborts" not in have:
            self._db.execute("ALTER TABLE jobs ADD COLUMN site_aborts TEXT NOT NULL DEFAULT '{}'")
        if "test_metrics" not in have:
            self._db.execute("ALTER TABLE jobs ADD COLUMN test_metrics TEXT NOT NULL DEFAULT '{}'")
        if "feature_scaling" not in have:
            self._db.execute("ALTER TABLE jobs ADD COLUMN feature_scaling TEXT NOT NULL DEFAULT '{}'")
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(rounds)").fetchall()}
        if "val_metrics" not in have:
            self._db.execute("ALTER TABLE rounds ADD COLUMN val_metrics TEXT NOT NULL DEFAULT '{}'")
        if "strategy_state" not in have:
            self._db.execute("ALTER TABLE rounds ADD COLUMN strategy_state TEXT NOT NULL DEFAULT '{}'")

    def close(self) -> None:
        self.is_open = False
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- jobs ---------------------------------------------------------------------------------------------------
    def create_job(
        self, job_id: str, name: str, spec: Mapping[str, Any], model_version: str, state: str = "running"
    ) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (job_id, name, spec, state, created, updated, model_version)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, json.dumps(spec, sort_keys=True), state, now, now, model_version),
            )

    def update_job(self, job_id: str, **fields: Any) -> None:
        bad = set(fields) - JOB_FIELDS
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(
                f"UPDATE jobs SET {cols}, updated = ? WHERE job_id = ?",  # noqa: S608 - column names are allow-listed
                (*fields.values(), time.time(), job_id),
            )

    def jobs(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["spec"] = json.loads(d["spec"])
            d["privacy_state"] = json.loads(d["privacy_state"])
            d["site_aborts"] = json.loads(d["site_aborts"])
            d["test_metrics"] = json.loads(d["test_metrics"])
            d["feature_scaling"] = json.loads(d["feature_scaling"])
            out.append(d)
        return out

    def job(self, job_id: str) -> dict[str, Any] | None:
        return next((j for j in self.jobs() if j["job_id"] == job_id), None)

    # -- rounds -------------------------------------------------------------------------------------------------
    def start_round(self, job_id: str, rnd: int, attempt: int, cohort: list[str], base_version: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds (job_id, round, attempt, state, started, cohort, base_version)"
                " VALUES (?, ?, ?, 'training', ?, ?, ?)",
                (job_id, rnd, attempt, time.time(), json.dumps(cohort), base_version),
            )

    def finish_round(
        self,
        job_id: str,
        rnd: int,
        attempt: int,
        *,
        state: str,
        reported: list[str],
        model_version: str = "",
        train_loss: float | None = None,
        train_samples: int | None = None,
        timings: Mapping[str, float] | None = None,
        detail: str = "",
        epsilon: float | None = None,
        privacy_state: Mapping[str, Any] | None = None,
        strategy_state: Mapping[str, Any] | None = None,
    ) -> None:
        """Close a round attempt. A completed round, the job's new model, its privacy state (the accountant) and its
        strategy state are committed in one transaction: after a crash either all of them are there or none is."""
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET state = ?, finished = ?, reported = ?, model_version = ?, train_loss = ?,"
                " train_samples = ?, timings = ?, detail = ?, epsilon = ?, strategy_state = ?"
                " WHERE job_id = ? AND round = ? AND attempt = ?",
                (
                    state,
                    time.time(),
                    json.dumps(sorted(reported)),
                    model_version,
                    train_loss,
                    train_samples,
                    json.dumps(dict(timings or {}), sort_keys=True),
                    detail,
                    epsilon,
                    json.dumps(dict(strategy_state or {}), sort_keys=True),
                    job_id,
                    rnd,
                    attempt,
                ),
            )
            if state == "completed":
                db.execute(
                    "UPDATE jobs SET current_round = ?, model_version = ?, updated = ?, epsilon = ?,"
                    " privacy_state = ? WHERE job_id = ?",
                    (
                        rnd,
                        model_version,
                        time.time(),
                        epsilon or 0.0,
                        json.dumps(dict(privacy_state or {}), sort_keys=True),
                        job_id,
                    ),
                )

    def abandon_round(self, job_id: str, rnd: int, attempt: int, detail: str) -> None:
        """Mark an attempt that a restart cannot continue as failed, and forget its uploads (never counted)."""
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET state = 'failed', finished = ?, detail = ?"
                " WHERE job_id = ? AND round = ? AND attempt = ?",
                (time.time(), detail, job_id, rnd, attempt),
            )

    def discard_round(self, job_id: str, rnd: int, attempt: int, detail: str) -> None:
        """A completed round whose checkpoint was lost: it is run again (its privacy cost stays accounted)."""
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET state = 'discarded', detail = ? WHERE job_id = ? AND round = ? AND attempt = ?",
                (detail, job_id, rnd, attempt),
            )

    def set_round_eval(
        self,
        job_id: str,
        rnd: int,
        attempt: int,
        loss: float,
        accuracy: float,
        n: int,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET val_loss = ?, val_accuracy = ?, val_samples = ?, val_metrics = ?"
                " WHERE job_id = ? AND round = ? AND attempt = ?",
                (loss, accuracy, n, json.dumps(dict(metrics or {}), sort_keys=True), job_id, rnd, attempt),
            )

    def rounds(self, job_id: str) -> list[RoundRow]:
        rows = self._db.execute("SELECT * FROM rounds WHERE job_id = ? ORDER BY round, attempt", (job_id,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["cohort"] = json.loads(d["cohort"])
            d["reported"] = json.loads(d["reported"])
            d["timings"] = json.loads(d["timings"])
            d["val_metrics"] = json.loads(d["val_metrics"])
            d["strategy_state"] = json.loads(d["strategy_state"])
            out.append(RoundRow(**d))
        return out

    # -- uploads and evaluations --------------------------------------------------------------------------------
    def record_upload(
        self,
        job_id: str,
        rnd: int,
        attempt: int,
        site: str,
        *,
        sha256: str,
        num_samples: int,
        metrics: Mapping[str, float],
        train_seconds: float,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    rnd,
                    attempt,
                    site,
                    sha256,
                    num_samples,
                    json.dumps(dict(metrics)),
                    train_seconds,
                    time.time(),
                ),
            )

    def uploads(self, job_id: str, rnd: int, attempt: int) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM uploads WHERE job_id = ? AND round = ? AND attempt = ? ORDER BY site",
            (job_id, rnd, attempt),
        ).fetchall()
        return [dict(r) | {"metrics": json.loads(r["metrics"])} for r in rows]

    def forget_upload(self, job_id: str, rnd: int, attempt: int, site: str) -> None:
        """Drop the record of an accepted upload whose spooled file did not survive (the site may upload again)."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM uploads WHERE job_id = ? AND round = ? AND attempt = ? AND site = ?",
                (job_id, rnd, attempt, site),
            )

    def record_evaluation(
        self,
        job_id: str,
        rnd: int,
        split: str,
        site: str,
        model_version: str,
        n: int,
        loss: float,
        acc: float,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, rnd, split, site, model_version, n, loss, acc, time.time()),
            )

    def evaluations(self, job_id: str, rnd: int, split: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM evaluations WHERE job_id = ? AND round = ? AND split = ? ORDER BY site",
            (job_id, rnd, split),
        ).fetchall()
        return [dict(r) for r in rows]

    def evaluation_rows(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT * FROM evaluations WHERE job_id = ? ORDER BY round, split, site", (job_id,)
        ).fetchall()
        return [dict(r) for r in rows]

    # -- audit --------------------------------------------------------------------------------------------------
    def audit(self, kind: str, actor: str, **detail: Any) -> None:
        """Append a security-relevant event to the hash-chained audit log (coordinator/audit.py)."""
        text = json.dumps(detail, sort_keys=True, default=str)
        with self._tx() as db:
            last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (int(last["seq"]) + 1, str(last["hash"])) if last else (1, GENESIS)
            ts = time.time()
            db.execute(
                "INSERT INTO audit (seq, ts, kind, actor, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, ts, kind, actor, text, prev, chain_hash(prev, seq, ts, kind, actor, text)),
            )

    def audit_events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if kind is None:
            rows = self._db.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        else:
            rows = self._db.execute("SELECT * FROM audit WHERE kind = ? ORDER BY seq", (kind,)).fetchall()
        return [dict(r) | {"detail": json.loads(r["detail"])} for r in rows]
