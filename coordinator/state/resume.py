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
- A validation evaluation that the crash cut off (its round is the newest completed one, it was due, none of its
  results is recorded and no later round started) is run again before the next round. Evaluation reports recorded
  before the crash count again wherever the same model is evaluated (a site does not evaluate one model twice).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.serde import EncodedTensors, Spec, new_hasher, state_dict_float32
from common.tasks.base import Task
from coordinator.config import JobConfig
from coordinator.state.model_store import ModelStore
from coordinator.state.store import RoundRow, Store

log = logging.getLogger("cohort.coordinator.resume")

RESTART_DETAIL = "interrupted by a coordinator restart"


@dataclass(frozen=True)
class ResumePlan:
    """Where the job's state machine continues: round ``number``, attempt ``attempt``."""

    number: int
    attempt: int
    completed: int  # rounds the restored model reflects
    reopen_cohort: tuple[str, ...] | None = None  # the open plaintext attempt to continue
    uploads: tuple[Mapping[str, Any], ...] = ()  # its accepted uploads (site, sha256, num_samples, metrics)
    evaluate: tuple[int, int] | None = None  # (round, attempt) whose validation evaluation a crash cut off
    # (round, split, model version) -> site -> (n, loss, accuracy): reports that arrived before the restart. A site
    # does not evaluate the same model twice, so they count again (a re-run round that yields the same model).
    stored_evaluations: Mapping[tuple[int, str, str], Mapping[str, tuple[int, float, float]]] = field(
        default_factory=dict
    )
    notes: tuple[str, ...] = ()  # what was found and done, for the operator's log
    generation: int = 1  # how many times the job has been resumed (numbers its new secure evaluation instances)
    aborts: Mapping[str, int] = field(default_factory=dict)  # secure-aggregation aborts per site so far
    suspended: Mapping[str, str] = field(default_factory=dict)  # sites kept out of the cohorts, and why
    # The strategy state committed with the round the job continues from (server optimizer step and moments file,
    # the selection's memory); empty from round 0.
    strategy: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResumePoint:
    """The model a job continues from, and the plan for its state machine."""

    tensors: dict[str, torch.Tensor]
    model: EncodedTensors
    plan: ResumePlan
    moments: dict[str, np.ndarray] = field(default_factory=dict)  # the server optimizer's, as of that round


class CannotResume(Exception):
    """The job's state on disk does not allow it to continue (reason in the message)."""


def spool_dir(spool_root: Path, job_id: str, number: int, attempt: int, split: str = "") -> Path:
    """Where a round attempt's uploads are spooled (and, briefly, a secure evaluation's masked inputs)."""
    if split:
        return spool_root / job_id / f"eval-{number}-{split}-{attempt}"
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
    strategy_files: ModelStore | None = None,
) -> ResumePoint:
    rounds = store.rounds(job_id)
    notes: list[str] = []
    # Asynchronous rounds stage uploads here until they are counted; one cut short by the crash was never counted.
    shutil.rmtree(spool_root / job_id / "incoming", ignore_errors=True)
    completed = sorted((r for r in rounds if r.state == "completed"), key=lambda r: r.round)

    # 1. The newest checkpoint that verifies. Rounds after a damaged one are run again.
    # A stateful server optimizer's moments are part of the checkpoint: a round whose moments file is missing or
    # damaged is as unusable as one whose model is.
    chosen: tuple[int, tuple[dict[str, torch.Tensor], EncodedTensors]] | None = None
    strategy: Mapping[str, Any] = {}
    moments: dict[str, np.ndarray] = {}
    for r in reversed(completed):
        loaded = _load_verified(models, r.model_version, store, job_id, r.round, notes)
        found = _load_moments(strategy_files, r, store, job_id, notes) if loaded is not None else None
        if loaded is not None and found is not None:
            chosen, strategy, moments = (r.round, loaded), r.strategy_state, found
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
    evaluate = _cut_off_evaluation(spec, rounds, base_round)
    if evaluate is not None:
        notes.append(f"the validation evaluation of round {base_round} was cut off; it runs again")
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
    stored: dict[tuple[int, str, str], dict[str, tuple[int, float, float]]] = {}
    for e in store.evaluation_rows(job_id):
        key = (int(e["round"]), str(e["split"]), str(e["model_version"]))
        stored.setdefault(key, {})[str(e["site"])] = (int(e["num_samples"]), float(e["loss"]), float(e["accuracy"]))
    resumed_before = sum(1 for e in store.audit_events("job_resumed") if e["detail"].get("job_id") == job_id)
    abort_state = (store.job(job_id) or {}).get("site_aborts") or {}
    plan = ResumePlan(
        number=number,
        attempt=attempt,
        completed=base_round,
        reopen_cohort=tuple(reopen.cohort) if reopen is not None else None,
        uploads=tuple(uploads),
        evaluate=evaluate,
        stored_evaluations=stored,
        notes=tuple(notes),
        generation=resumed_before + 1,
        aborts={str(k): int(v) for k, v in dict(abort_state.get("aborts", {})).items()},
        suspended={str(k): str(v) for k, v in dict(abort_state.get("suspended", {})).items()},
        strategy=strategy,
    )
    return ResumePoint(tensors, model, plan, moments)


def _load_moments(
    files: ModelStore | None, r: RoundRow, store: Store, job_id: str, notes: list[str]
) -> dict[str, np.ndarray] | None:
    """The server optimizer moments committed with round ``r`` ({} when it keeps none); None when they are lost."""
    ref = dict(r.strategy_state.get("optimizer", {})).get("moments")
    if not ref:
        return {}
    if files is None:
        return None
    try:
        return {k: v.numpy() for k, v in files.load(str(ref)).items()}
    except (OSError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        store.audit("checkpoint_corrupt", "coordinator", job_id=job_id, round=r.round, version=ref, reason=reason)
        notes.append(f"round {r.round}: the server optimizer's moments {str(ref)[:19]}... are unusable ({reason})")
        return None


def _cut_off_evaluation(spec: JobConfig, rounds: list[RoundRow], base_round: int) -> tuple[int, int] | None:
    """The (round, attempt) whose due validation evaluation never completed, if the crash cut it off."""
    if base_round < 1 or not spec.evaluate_every or base_round % spec.evaluate_every:
        return None
    if any(r.round > base_round for r in rounds):
        return None  # a later round started, so the evaluation had ended (possibly with no report)
    row = next((r for r in rounds if r.round == base_round and r.state == "completed"), None)
    if row is None or row.val_samples is not None:
        return None
    return base_round, row.attempt


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
