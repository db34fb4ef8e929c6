"""The model out: an admin takes a job's model file (``cohort model download``), byte for byte.

The file is the checkpoint the coordinator committed (``state_dir/models/<digest>.safetensors``), with the metadata
every checkpoint carries (coordinator/round/model_meta.py). It is checked before it is sent (its tensors still hash
to the model version the job recorded) and sent with the SHA-256 of its bytes, so the client can check the copy.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from safetensors import safe_open

from common.errors import FailedPrecondition, NotFound
from common.proto.cohort.v1 import cohort_pb2 as pb
from coordinator.federation import Federation

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelFile:
    info: pb.ModelFileInfo
    data: bytes


def resolve(req: pb.ModelFileRequest, state: Federation) -> tuple[str, int, str]:
    """``(job_id, round, model_version)`` the request names: the newest job by default, its current model unless a
    round is given (0: the initial model; N: the model round N committed)."""
    jobs = state.store.jobs()
    if req.job_id:
        row = state.store.job(req.job_id)
        if row is None:
            raise NotFound(f"unknown job {req.job_id!r}; `cohort job list` lists the jobs")
    elif jobs:
        row = jobs[-1]
    else:
        raise NotFound("the coordinator has no job yet")
    job_id = row["job_id"]
    rounds = [r for r in state.store.rounds(job_id) if r.state == "completed"]
    if not req.HasField("round"):
        latest = max((r.round for r in rounds), default=0)
        return job_id, latest, row["model_version"]
    if req.round == 0:
        first = [r.base_version for r in state.store.rounds(job_id) if r.round == 1]
        return job_id, 0, first[0] if first else row["model_version"]
    for r in rounds:
        if r.round == req.round:
            return job_id, r.round, r.model_version
    done = ", ".join(str(r.round) for r in rounds) or "none"
    raise NotFound(f"job {job_id} has no completed round {req.round} (completed: {done})")


def read_model_file(req: pb.ModelFileRequest, state: Federation) -> ModelFile:
    """The checked file and its description (blocking: run it in a thread)."""
    job_id, number, version = resolve(req, state)
    path = state.models.path_for(version)
    if not path.exists():
        raise NotFound(
            f"the model of job {job_id} round {number} ({version}) is no longer kept: state.keep_models keeps the "
            "last rounds' models and the best one"
        )
    try:
        state.models.load(version)  # its tensors still hash to the version the job recorded
        data = path.read_bytes()
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"the model file of job {job_id} round {number} is damaged: {exc}") from None
    info = pb.ModelFileInfo(
        job_id=job_id,
        round=number,
        model_version=version,
        file_sha256="sha256:" + hashlib.sha256(data).hexdigest(),
        size=len(data),
        metadata=metadata,
    )
    return ModelFile(info, data)


async def model_file(admin: str, req: pb.ModelFileRequest, state: Federation) -> AsyncIterator[pb.ModelFileChunk]:
    model = await asyncio.to_thread(read_model_file, req, state)
    state.store.audit("model_downloaded", admin, job_id=model.info.job_id, round=model.info.round)
    yield pb.ModelFileChunk(info=model.info)
    view = memoryview(model.data)
    for start in range(0, len(view), CHUNK_BYTES):
        yield pb.ModelFileChunk(data=bytes(view[start : start + CHUNK_BYTES]))
