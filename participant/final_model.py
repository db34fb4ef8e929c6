"""Models from the coordinator: the digest-checked download every task uses, and the final model a site keeps.

With ``keep_final_model: PATH`` a site that trained or evaluated for a job downloads the job's final model when the
coordinator says the job ended (``JobFinished.final_model_version``), checks it against that digest, and writes it to
PATH as a safetensors file with the coordinator's checkpoint metadata (task, code digest, job, round, strategy,
epsilon/delta; coordinator/round/model_meta.py) and the site's own notes: owner-only, atomically (a crash leaves the
previous job's file or this one, never half of either). Nothing here is unpickled: safetensors only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import grpc
import torch
from safetensors.torch import save

from common import files
from common.errors import InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.serde import Assembler

log = logging.getLogger("cohort.participant")


async def fetch_model(
    stub: pb_grpc.FederationAsyncStub, job_id: str, version: str, timeout: float, reuse: bytearray | None = None
) -> tuple[Assembler, dict[str, str]]:
    """Stream model ``version`` of ``job_id`` into an assembler (call ``finish()`` for the checked tensors; ``reuse``:
    a buffer to receive into, see :class:`Assembler`) and the metadata its manifest carries (a finished job's final
    model only). Raises when the digest is not ``version``."""
    stream = stub.DownloadModel(pb.ModelRequest(job_id=job_id, model_version=version), timeout=timeout)
    first = await stream.read()
    if not isinstance(first, pb.ModelChunk) or first.WhichOneof("kind") != "manifest":
        raise InvalidArgument("model stream did not start with a manifest")
    # annotated: a final model comes with its checkpoint's metadata
    assembler = Assembler(first.manifest, annotated=True, reuse=reuse)
    while (chunk := await stream.read()) is not grpc.aio.EOF:
        assert isinstance(chunk, pb.ModelChunk)
        if chunk.WhichOneof("kind") != "data":
            raise InvalidArgument("model stream carried a second manifest")
        assembler.add(chunk.data)
    assembler.require_version(version)
    return assembler, dict(first.manifest.metadata)


def write_final_model(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """``tensors`` as a safetensors file at ``path`` with ``metadata``: owner-only (0600), atomic and durable."""
    files.private_dir(path.parent, "keep_final_model's directory", tighten=False)
    order = list(tensors)
    data = save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={**metadata, "cohort_order": json.dumps(order)}
    )
    return files.write_atomic(path, data)


def site_notes(site_id: str, finished: pb.JobFinished) -> dict[str, str]:
    """What the site adds to the coordinator's metadata: who kept it, when, and how the job ended."""
    return {
        "cohort_kept_by": site_id,
        "cohort_kept_unix": f"{time.time():.3f}",
        "cohort_job_end": finished.reason,
        "cohort_version": finished.final_model_version,
    }
