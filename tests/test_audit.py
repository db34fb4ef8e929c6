"""The audit log is hash-chained: `cohort audit verify` passes on a clean log and fails on each kind of tampering."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.state.audit import verify_database
from coordinator.state.store import SqliteStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def state(tmp_path: Path) -> Path:
    store = SqliteStore(tmp_path / "coordinator.db")
    store.audit("join", "site-a", task="breast_cancer")
    store.audit("join_refused", "site-z", reason="not on the allow-list")
    store.audit("job_started", "coordinator", job_id="j1")
    store.audit("round_completed", "coordinator", job_id="j1", round=1)
    store.audit("job_finished", "coordinator", job_id="j1")
    store.close()
    return tmp_path


def tamper(state: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(state / "coordinator.db")
    for statement in sql.split(";"):
        db.execute(statement, args if "?" in statement else ())
    db.commit()
    db.close()


def test_clean_log_verifies_through_the_cli(state: Path) -> None:
    report = verify_database(state / "coordinator.db")
    assert report.ok
    assert report.count == 5
    result = subprocess.run(
        [sys.executable, "-m", "cohort_cli", "audit", "verify", "--state-dir", str(state), "--head", report.head],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "intact: 5 events" in result.stdout


@pytest.mark.parametrize(
    ("sql", "args", "finding"),
    [
        ("UPDATE audit SET actor = ? WHERE seq = 2", ("site-a",), "edited"),
        ("UPDATE audit SET detail = ? WHERE seq = 4", ('{"job_id":"j1","round":2}',), "edited"),
        ("DELETE FROM audit WHERE seq = 3", (), "removed"),
        (  # rows 2 and 3 swapped
            "UPDATE audit SET seq = 100 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3;"
            " UPDATE audit SET seq = 3 WHERE seq = 100",
            (),
            "broken",
        ),
    ],
)
def test_each_kind_of_tampering_is_detected(state: Path, sql: str, args: tuple[object, ...], finding: str) -> None:
    tamper(state, sql, *args)
    report = verify_database(state / "coordinator.db")
    assert not report.ok
    assert any(finding in p for p in report.problems), report.problems
    result = subprocess.run(
        [sys.executable, "-m", "cohort_cli", "audit", "verify", "--state-dir", str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "TAMPERED" in result.stdout


def test_truncation_is_detected_against_a_recorded_head(state: Path) -> None:
    head = verify_database(state / "coordinator.db").head
    tamper(state, "DELETE FROM audit WHERE seq = 5")
    assert verify_database(state / "coordinator.db").ok  # a shorter chain is still a chain ...
    report = verify_database(state / "coordinator.db", head)
    assert not report.ok  # ... but not the one that ended at the recorded head
    assert "truncated" in report.problems[0]
