"""A finished job's final model, for the sites that keep it (participant config ``keep_final_model``).

A running job's models are served from its runner's memory; a job that ended holds none (the runner drops it at
FinishJob). Its final model (the version of its last committed round, which ``JobFinished.final_model_version``
names) is served from the model store by digest, checked to still hash to it, with the checkpoint's metadata in the
manifest. Nothing else of an ended job is served: not its initial model, not an earlier round's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from common.errors import FailedPrecondition, NotFound
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import EncodedTensors
from coordinator.round.events import JobState
from coordinator.state.model_store import ModelStore
from coordinator.state.store import Store

ENDED = frozenset(s.value for s in (JobState.FINISHED, JobState.STOPPED, JobState.FAILED, JobState.BUDGET_EXHAUSTED))


@dataclass(frozen=True)
class FinalModel(EncodedTensors):
    """The model's wire encoding, and the checkpoint's safetensors metadata sent with its manifest."""

    metadata: dict[str, str] = field(default_factory=dict)

    def manifest(self) -> pb.Manifest:
        manifest = super().manifest()
        manifest.metadata.update(self.metadata)
        return manifest


# The last final model served, per model directory: every site asks for the same one when a job ends. One model's
# memory at most (the coordinator does not grow with the number of jobs it has run).
_last: dict[Path, FinalModel] = {}


def final_model(job_id: str, version: str, store: Store, models: ModelStore) -> FinalModel:
    """The final model ``version`` of the ended job ``job_id`` (blocking: a file read and a digest check)."""
    row = store.job(job_id)
    if row is None or row["state"] not in ENDED:
        raise FailedPrecondition(f"job {job_id!r} is not running")
    if row["current_round"] == 0:
        raise NotFound(f"job {job_id} ended ({row['state']}) before any round committed: it has no final model")
    if version != row["model_version"]:
        raise NotFound(
            f"job {job_id} ended; only its final model ({row['model_version'][:19]}...) is served, "
            f"not {version[:19]}..."
        )
    cached = _last.get(models.root)
    if cached is not None and cached.version == version:
        return cached
    if not models.path_for(version).exists():
        raise NotFound(f"the final model of job {job_id} is no longer kept on the coordinator")
    try:
        _, encoded = models.load_encoded(version)  # its tensors still hash to the version the job recorded
        with safe_open(str(models.path_for(version)), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"the final model file of job {job_id} is damaged: {exc}") from None
    model = FinalModel(encoded.specs, encoded.data, encoded.sha256, metadata)
    _last[models.root] = model
    return model
