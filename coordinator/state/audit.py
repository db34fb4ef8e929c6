"""The tamper-evident audit log: every security-relevant event, hash-chained.

Each row stores ``hash = SHA-256(prev_hash || canonical(seq, ts, kind, actor, detail))`` with the previous row's
hash (64 zeros for the first). Editing a row breaks its own hash; removing or reordering rows breaks the chain at
the next row (and sequence numbers must run 1, 2, 3 ...). Cutting rows off the end leaves a valid shorter chain, so
`cohort audit verify` prints the head hash: keep it elsewhere (a ticket, another host) and pass it back with
``--head`` to detect truncation too.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import ConfigError

GENESIS = "0" * 64


def canonical(seq: int, ts: float, kind: str, actor: str, detail: str) -> bytes:
    return json.dumps([seq, repr(ts), kind, actor, detail], separators=(",", ":")).encode()


def chain_hash(prev: str, seq: int, ts: float, kind: str, actor: str, detail: str) -> str:
    return hashlib.sha256(prev.encode() + canonical(seq, ts, kind, actor, detail)).hexdigest()


@dataclass
class AuditReport:
    count: int = 0
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_rows(rows: list[dict[str, Any]], head: str | None = None) -> AuditReport:
    report = AuditReport()
    prev = GENESIS
    for expected_seq, row in enumerate(rows, start=1):
        seq = int(row["seq"])
        if seq != expected_seq:
            report.problems.append(f"row {seq}: expected sequence number {expected_seq} (a row was removed or moved)")
        if row["prev_hash"] != prev:
            report.problems.append(f"row {seq}: its link to the previous row is broken (removed or reordered rows)")
        want = chain_hash(row["prev_hash"], seq, row["ts"], row["kind"], row["actor"], row["detail"])
        if row["hash"] != want:
            report.problems.append(f"row {seq}: content does not match its hash (the row was edited)")
        prev = row["hash"]
        report.count += 1
    report.head = prev
    if head is not None and head != prev:
        report.problems.append(f"the log ends at {prev[:16]}..., not at the expected head {head[:16]}... (truncated?)")
    return report


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise ConfigError(f"no coordinator database at {path}; pass the coordinator's state_dir with --state-dir")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    return db


def verify_database(path: Path, head: str | None = None) -> AuditReport:
    db = _read_only(path)
    try:
        rows = [dict(r) for r in db.execute("SELECT * FROM audit ORDER BY seq")]
    finally:
        db.close()
    return verify_rows(rows, head)


def read_events(path: Path, kinds: Sequence[str] = (), last: int = 0) -> list[dict[str, Any]]:
    """The audit events in ``path`` (oldest first): only of ``kinds`` if given, only the ``last`` ones if > 0."""
    where = f"WHERE kind IN ({', '.join('?' * len(kinds))})" if kinds else ""
    limit = "LIMIT ?" if last > 0 else ""
    query = f"SELECT seq, ts, kind, actor, detail FROM audit {where} ORDER BY seq DESC {limit}"  # noqa: S608
    db = _read_only(path)
    try:
        rows = [dict(r) for r in db.execute(query, (*kinds, *([last] if last > 0 else [])))]
    finally:
        db.close()
    return [r | {"detail": json.loads(r["detail"])} for r in reversed(rows)]


def format_event(event: dict[str, Any]) -> str:
    """One line: sequence number, UTC time, kind, actor, then the detail as key=value pairs."""
    when = datetime.fromtimestamp(event["ts"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    detail = event["detail"]
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(detail.items())) if isinstance(detail, dict) else ""
    return f"{event['seq']:>6}  {when}  {event['kind']:<22} {event['actor']:<16} {pairs}".rstrip()
