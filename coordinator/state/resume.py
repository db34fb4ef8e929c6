"""Where a job picks up after the coordinator died: the round to run, the model to start from, uploads to keep.

Everything here is read back from what the runner made durable before acting on it: the job row (spec, privacy
state), the round rows, the accepted-upload rows and their spooled files, and the checkpoints named by digest. The
rules:

- The job continues from the last *completed* round whose checkpoint still hashes to its name. A checkpoint that is
  missing or damaged is reported (audit ``checkpoint_corrupt``) and the previous good one is used; the rounds after
  it are marked ``discarded`` and run again. The privacy accountant is never rolled back: those rounds' releases
  still count, so epsilon is over-reported rather than under-reported.
- A plaintext round that was open is reopened as the same attempt: each accepted upload whose spooled file still
  hashes to its recorded digest is taken back (never counted twice: a site is in a round's accepted set once), the
  others are forgotten so their sites may upload again, and the cohort's other sites get the task again.
- A secure-aggregation round that was open cannot be continued: its protocol state (who advertised, which shares were
  routed, the masked sum) died with the process, and the sites will not reveal anything twice. It is recorded as
  failed and the round is retried with fresh keys, as after any failed secure round. Masked inputs alone reveal
  nothing and are deleted.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.serde import EncodedTensors, Spec, new_hasher, state_dict_float32
from common.tasks.base import Task
from coordinator.config import JobConfig
from coordinator.state.model_store import ModelStore
from coordinator.state.store import RoundRow, Store

log = logging.getLogger("cohort.coordinator.resume")

RESTART_DETAIL = "interrupted by a coordinator restart"


@dataclass(frozen=True)
class ResumePoint:
    """Where a job continues: round ``number``, attempt ``attempt``, on ``model``."""

    number: int
    attempt: int
    tensors: dict[str, torch.Tensor]
    model: EncodedTensors
    reopen: RoundRow | None = None  # the open plaintext attempt to continue, with its accepted uploads below
    uploads: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was found and done, for the operator's log


class CannotResume(Exception):
    """The job's state on disk does not allow it to continue (reason in the message)."""


def spool_dir(spool_root: Path, job_id: str, number: int, attempt: int) -> Path:
    return spool_root / job_id / f"round-{number}-{attempt}"


def file_digest(path: Path, specs: tuple[Spec, ...]) -> str:
    hasher = new_hasher(specs)
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()


def plan_resume(
    job_id: str,
    spec: JobConfig,
    task: Task,
    *,
    store: Store,
    models: ModelStore,
    spool_root: Path,
    initial_version: str,
) -> ResumePoint:
    rounds = store.rounds(job_id)
    notes: list[str] = []
    completed = sorted((r for r in rounds if r.state == "completed"), key=lambda r: r.round)

    # 1. The newest checkpoint that verifies. Rounds after a damaged one are run again.
    chosen: tuple[int, tuple[dict[str, torch.Tensor], EncodedTensors]] | None = None
    for r in reversed(completed):
        loaded = _load_verified(models, r.model_version, store, job_id, r.round, notes)
        if loaded is not None:
            chosen = (r.round, loaded)
            break
    if chosen is None:
        loaded = _load_verified(models, initial_version, store, job_id, 0, notes)
        if loaded is None:
            # The initial model is a pure function of the task and the seed: rebuild it and check it is the same.
            rebuilt = state_dict_float32(task.build_model(seed=spec.params.seed))
            saved = models.save(rebuilt, {"job": job_id, "round": "0"})
            if saved.version != initial_version:
                raise CannotResume(
                    f"job {job_id}: no usable checkpoint, and the rebuilt initial model {saved.version[:19]}... "
                    f"differs from the recorded {initial_version[:19]}... (was the task code changed?)"
                )
            notes.append("rebuilt the initial model from the task and seed")
            loaded = (rebuilt, saved)
        chosen = (0, loaded)
    base_round, (tensors, model) = chosen
    version = model.version
    for r in completed:
        if r.round > base_round:
            store.discard_round(job_id, r.round, r.attempt, f"checkpoint {r.model_version[:19]}... is damaged")
            notes.append(f"round {r.round} will run again: its checkpoint is damaged")

    # 2. The attempt that was open, if any: reopen it (plaintext, on the same base) or record it as failed.
    number = base_round + 1
    attempts = [r.attempt for r in rounds if r.round == number]
    attempt = max(attempts) + 1 if attempts else 0
    reopen: RoundRow | None = None
    uploads: list[dict[str, Any]] = []
    for r in rounds:
        if r.state != "training":
            continue
        can_continue = (
            r.round == number and r.base_version == version and not spec.secure_aggregation.enabled and reopen is None
        )
        if can_continue:
            reopen, attempt = r, r.attempt
            uploads = _surviving_uploads(store, job_id, r, spool_root, model.specs, notes)
            notes.append(f"round {r.round} attempt {r.attempt} reopened with {len(uploads)} accepted uploads")
        else:
            store.abandon_round(job_id, r.round, r.attempt, RESTART_DETAIL)
            shutil.rmtree(spool_dir(spool_root, job_id, r.round, r.attempt), ignore_errors=True)
            notes.append(f"round {r.round} attempt {r.attempt} recorded as failed ({RESTART_DETAIL}); it is retried")
    return ResumePoint(number, attempt, tensors, model, reopen, uploads, notes)


def _load_verified(
    models: ModelStore, version: str, store: Store, job_id: str, number: int, notes: list[str]
) -> tuple[dict[str, torch.Tensor], EncodedTensors] | None:
    try:
        return models.load_encoded(version)
    except (OSError, ValueError) as exc:  # missing, truncated, or not hashing to its name
        reason = f"{type(exc).__name__}: {exc}"
        store.audit("checkpoint_corrupt", "coordinator", job_id=job_id, round=number, version=version, reason=reason)
        log.error("job %s: checkpoint of round %d (%s) is unusable: %s", job_id, number, version[:19], reason)
        notes.append(f"checkpoint of round {number} is unusable ({reason}); using the previous one")
        return None


def _surviving_uploads(
    store: Store, job_id: str, row: RoundRow, spool_root: Path, specs: tuple[Spec, ...], notes: list[str]
) -> list[dict[str, Any]]:
    directory = spool_dir(spool_root, job_id, row.round, row.attempt)
    kept = []
    for up in store.uploads(job_id, row.round, row.attempt):
        path = directory / f"{up['site']}.update"
        ok = path.is_file() and file_digest(path, specs) == up["sha256"]
        if ok:
            kept.append(up)
            continue
        store.forget_upload(job_id, row.round, row.attempt, up["site"])
        store.audit(
            "upload_lost", "coordinator", job_id=job_id, round=row.round, site=up["site"], reason="spool file damaged"
        )
        notes.append(f"the spooled upload of {up['site']} did not survive; the site may upload again")
    for stale in directory.glob("*.part") if directory.is_dir() else ():
        stale.unlink(missing_ok=True)  # a stream cut by the crash: never counted
    return kept
