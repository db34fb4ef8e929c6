"""Which model files a job keeps: ``state.keep_models`` = the last N completed rounds' models plus the best one.

Every round writes a checkpoint (``state_dir/models/<digest>.safetensors``) and, with a stateful server optimizer,
its moments (``state_dir/strategy/<digest>.safetensors``, named in the round's ``strategy_state``). Without a
policy they pile up (one file per round, forever). After each commit, :func:`prune` removes the files of this
job's older rounds except:

- the last ``keep`` completed rounds' models and moments (the newest is the job's current model, which a restart
  resumes from with its moments; the ones before it are the fallback when the newest checkpoint is damaged);
- the best round's model (the highest federated validation accuracy; ties: the later round) and its moments;
- under asynchronous rounds, at least ``max_staleness + 1`` models (sites may still train on a recent one);
- anything another job (or this job's initial model, or an open round's base) refers to.

``keep = 0`` keeps everything (the default). Files are content-addressed, so a file is removed only when no kept
reference of any job names it.
"""

from __future__ import annotations

import logging
from typing import Any

from coordinator.state.model_store import ModelStore
from coordinator.state.store import RoundRow, Store

log = logging.getLogger("cohort.coordinator.retention")


def _moments(row: RoundRow) -> str:
    optimizer = dict(row.strategy_state or {}).get("optimizer", {})
    value = optimizer.get("moments", "") if isinstance(optimizer, dict) else ""
    return value if isinstance(value, str) else ""


def best_round(rows: list[RoundRow]) -> RoundRow | None:
    """The completed round with the highest validation accuracy (the later one on a tie); None if none evaluated."""
    evaluated = [r for r in rows if r.state == "completed" and r.val_samples and r.val_accuracy is not None]
    return max(evaluated, key=lambda r: (r.val_accuracy or 0.0, r.round), default=None)


def kept_rounds(rows: list[RoundRow], keep: int) -> list[RoundRow]:
    completed = sorted((r for r in rows if r.state == "completed"), key=lambda r: r.round)
    kept = completed[-keep:] if keep > 0 else completed
    best = best_round(completed)
    if best is not None and best not in kept:
        kept = [*kept, best]
    return kept


def prune(store: Store, models: ModelStore, strategy_files: ModelStore, job_id: str, keep: int) -> list[str]:
    """Remove the job's model and moments files the policy does not keep; the versions removed."""
    if keep <= 0:
        return []
    rows = store.rounds(job_id)
    kept = kept_rounds(rows, keep)
    protected: set[str] = set()
    for r in kept:
        protected |= {r.model_version, _moments(r)}
    first = [r.base_version for r in rows if r.round == 1]
    protected.update(first[:1])  # the initial model: what `cohort model download --round 0` names
    protected |= {r.base_version for r in rows if r.state not in ("completed", "failed", "discarded")}
    for job in store.jobs():
        row: dict[str, Any] = job
        protected.add(str(row.get("model_version") or ""))
        if row["job_id"] != job_id:
            for other in store.rounds(row["job_id"]):
                protected |= {other.model_version, other.base_version, _moments(other)}
    removed: list[str] = []
    for r in rows:
        if r.state != "completed":
            continue
        for files, version in ((models, r.model_version), (strategy_files, _moments(r))):
            if not version or version in protected:
                continue
            try:
                path = files.path_for(version)
            except ValueError:
                continue
            if path.exists():
                path.unlink()
                removed.append(version)
    if removed:
        log.info("job %s: removed %d model files by state.keep_models=%d", job_id, len(removed), keep)
    return removed
