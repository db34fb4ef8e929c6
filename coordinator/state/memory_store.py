"""An in-memory :class:`~coordinator.state.store.Store` with the same contract as SQLite's, for tests and simulation.

It keeps the same records (and the same hash-chained audit log) in dictionaries; nothing survives the process.
tests/test_store.py runs one contract suite against both implementations.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from typing import Any

from coordinator.state.audit import GENESIS, chain_hash
from coordinator.state.store import JOB_FIELDS, RoundRow


class MemoryStore:
    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, Any]] = {}
        self._rounds: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._uploads: dict[tuple[str, int, int, str], dict[str, Any]] = {}
        self._evaluations: dict[tuple[str, int, str, str], dict[str, Any]] = {}
        self._audit: list[dict[str, Any]] = []

    def close(self) -> None:
        pass

    # -- jobs ---------------------------------------------------------------------------------------------------
    def create_job(
        self, job_id: str, name: str, spec: Mapping[str, Any], model_version: str, state: str = "running"
    ) -> None:
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} exists")
        now = time.time()
        self._jobs[job_id] = {
            "job_id": job_id,
            "name": name,
            "spec": json.loads(json.dumps(spec, sort_keys=True)),
            "state": state,
            "created": now,
            "updated": now,
            "current_round": 0,
            "model_version": model_version,
            "detail": "",
            "test_loss": None,
            "test_accuracy": None,
            "test_samples": None,
            "epsilon": 0.0,
            "site_epsilon": "{}",
            "privacy_state": {},
            "site_aborts": {},
            "test_metrics": {},
            "feature_scaling": {},
        }

    def update_job(self, job_id: str, **fields: Any) -> None:
        bad = set(fields) - JOB_FIELDS
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        row = self._jobs.get(job_id)
        if row is None:
            return
        for key, value in fields.items():
            json_column = key in ("privacy_state", "site_aborts", "test_metrics", "feature_scaling") and isinstance(
                value, str
            )
            row[key] = json.loads(value) if json_column else value
        row["updated"] = time.time()

    def jobs(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(j) for j in sorted(self._jobs.values(), key=lambda j: j["created"])]

    def job(self, job_id: str) -> dict[str, Any] | None:
        row = self._jobs.get(job_id)
        return copy.deepcopy(row) if row is not None else None

    # -- rounds -------------------------------------------------------------------------------------------------
    def start_round(self, job_id: str, rnd: int, attempt: int, cohort: list[str], base_version: str) -> None:
        key = (job_id, rnd, attempt)
        if key in self._rounds:
            raise ValueError(f"round {rnd} attempt {attempt} exists")
        self._rounds[key] = {
            "job_id": job_id,
            "round": rnd,
            "attempt": attempt,
            "state": "training",
            "started": time.time(),
            "finished": None,
            "cohort": list(cohort),
            "reported": [],
            "base_version": base_version,
            "model_version": "",
            "train_loss": None,
            "train_samples": None,
            "val_loss": None,
            "val_accuracy": None,
            "val_samples": None,
            "timings": {},
            "detail": "",
            "epsilon": None,
            "val_metrics": {},
            "strategy_state": {},
        }

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
        row = self._rounds.get((job_id, rnd, attempt))
        if row is not None:
            row.update(
                state=state,
                finished=time.time(),
                reported=sorted(reported),
                model_version=model_version,
                train_loss=train_loss,
                train_samples=train_samples,
                timings=dict(timings or {}),
                detail=detail,
                epsilon=epsilon,
                strategy_state=json.loads(json.dumps(dict(strategy_state or {}), sort_keys=True)),
            )
        job = self._jobs.get(job_id)
        if state == "completed" and job is not None:
            job.update(
                current_round=rnd,
                model_version=model_version,
                updated=time.time(),
                epsilon=epsilon or 0.0,
                privacy_state=json.loads(json.dumps(dict(privacy_state or {}), sort_keys=True)),
            )

    def abandon_round(self, job_id: str, rnd: int, attempt: int, detail: str) -> None:
        row = self._rounds.get((job_id, rnd, attempt))
        if row is not None:
            row.update(state="failed", finished=time.time(), detail=detail)

    def discard_round(self, job_id: str, rnd: int, attempt: int, detail: str) -> None:
        row = self._rounds.get((job_id, rnd, attempt))
        if row is not None:
            row.update(state="discarded", detail=detail)

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
        row = self._rounds.get((job_id, rnd, attempt))
        if row is not None:
            row.update(val_loss=loss, val_accuracy=accuracy, val_samples=n, val_metrics=dict(metrics or {}))

    def rounds(self, job_id: str) -> list[RoundRow]:
        rows = sorted((r for k, r in self._rounds.items() if k[0] == job_id), key=lambda r: (r["round"], r["attempt"]))
        return [RoundRow(**copy.deepcopy(r)) for r in rows]

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
        key = (job_id, rnd, attempt, site)
        if key in self._uploads:
            raise ValueError(f"an upload of {site!r} for round {rnd} attempt {attempt} exists")
        self._uploads[key] = {
            "job_id": job_id,
            "round": rnd,
            "attempt": attempt,
            "site": site,
            "sha256": sha256,
            "num_samples": num_samples,
            "metrics": dict(metrics),
            "train_seconds": train_seconds,
            "received": time.time(),
        }

    def uploads(self, job_id: str, rnd: int, attempt: int) -> list[dict[str, Any]]:
        rows = [u for k, u in self._uploads.items() if k[:3] == (job_id, rnd, attempt)]
        return [copy.deepcopy(u) for u in sorted(rows, key=lambda u: u["site"])]

    def forget_upload(self, job_id: str, rnd: int, attempt: int, site: str) -> None:
        self._uploads.pop((job_id, rnd, attempt, site), None)

    def record_evaluation(
        self, job_id: str, rnd: int, split: str, site: str, model_version: str, n: int, loss: float, acc: float
    ) -> None:
        self._evaluations[(job_id, rnd, split, site)] = {
            "job_id": job_id,
            "round": rnd,
            "split": split,
            "site": site,
            "model_version": model_version,
            "num_samples": n,
            "loss": loss,
            "accuracy": acc,
            "received": time.time(),
        }

    def evaluations(self, job_id: str, rnd: int, split: str) -> list[dict[str, Any]]:
        rows = [e for k, e in self._evaluations.items() if k[:3] == (job_id, rnd, split)]
        return [dict(e) for e in sorted(rows, key=lambda e: e["site"])]

    def evaluation_rows(self, job_id: str) -> list[dict[str, Any]]:
        rows = [e for k, e in self._evaluations.items() if k[0] == job_id]
        return [dict(e) for e in sorted(rows, key=lambda e: (e["round"], e["split"], e["site"]))]

    # -- audit --------------------------------------------------------------------------------------------------
    def audit(self, kind: str, actor: str, **detail: Any) -> None:
        text = json.dumps(detail, sort_keys=True, default=str)
        seq = len(self._audit) + 1
        prev = self._audit[-1]["hash"] if self._audit else GENESIS
        ts = time.time()
        self._audit.append(
            {
                "seq": seq,
                "ts": ts,
                "kind": kind,
                "actor": actor,
                "detail": text,
                "prev_hash": prev,
                "hash": chain_hash(prev, seq, ts, kind, actor, text),
            }
        )

    def audit_events(self, kind: str | None = None) -> list[dict[str, Any]]:
        rows = [r for r in self._audit if kind is None or r["kind"] == kind]
        return [dict(r) | {"detail": json.loads(r["detail"])} for r in rows]
