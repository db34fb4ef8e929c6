"""``cohort model download``: a job's model out of the coordinator, as a safetensors file, checked twice.

The coordinator streams the file it committed (admin certificate; coordinator/handlers/models.py). The copy is
written to a temporary file beside ``--out``, then checked: its size and SHA-256 against what the coordinator
announced, and its tensors against the model version (Cohort's digest over names, dtypes, shapes and bytes) that
the job recorded. Only then is it renamed to ``--out``. Load it with ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from cohort_cli.admin_client import AdminEndpoint
from common.errors import CohortError
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.serde import encode


async def download(
    endpoint: AdminEndpoint, out: Path, job_id: str = "", round_: int | None = None, timeout_s: float = 600.0
) -> pb.ModelFileInfo:
    """Write the model to ``out`` (atomically) once it checks out; return what the coordinator said about it."""
    request = pb.ModelFileRequest(job_id=job_id)
    if round_ is not None:
        request.round = round_
    tmp = out.with_name(f".{out.name}.part")
    info: pb.ModelFileInfo | None = None
    digest = hashlib.sha256()
    size = 0
    try:
        with tmp.open("wb") as f:
            async with endpoint.channel() as channel:
                async for chunk in pb_grpc.AdminStub(channel).DownloadModelFile(request, timeout=timeout_s):
                    if chunk.WhichOneof("kind") == "info":
                        info = chunk.info
                        continue
                    if info is None:
                        raise CohortError("the coordinator sent model bytes before the model's description")
                    size += len(chunk.data)
                    if size > info.size:
                        raise CohortError(f"the coordinator sent more than the announced {info.size} bytes")
                    digest.update(chunk.data)
                    f.write(chunk.data)
            f.flush()
            os.fsync(f.fileno())
        if info is None:
            raise CohortError("the coordinator sent no model")
        got = "sha256:" + digest.hexdigest()
        if size != info.size or got != info.file_sha256:
            raise CohortError(f"the copy does not match: {size} bytes, {got}; expected {info.size}, {info.file_sha256}")
        check_model_file(tmp, info.model_version)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return info


def check_model_file(path: Path, version: str) -> None:
    """The file's tensors, in the model's own order, hash to ``version``."""
    with safe_open(str(path), framework="pt") as f:
        order = json.loads((f.metadata() or {}).get("cohort_order", "[]"))
    tensors = load_file(str(path))
    ordered = {name: tensors[name] for name in order} if set(order) == set(tensors) else tensors
    if encode(ordered).version != version:
        raise CohortError(f"{path}: the tensors do not hash to the model version {version}")


def _cmd_download(args: argparse.Namespace) -> int:
    endpoint = AdminEndpoint.from_dir(args.coordinator, args.tls_dir, args.server_name)
    out: Path = args.out
    if args.round is not None and args.round < 0:
        raise CohortError(f"--round {args.round}: a round number is 0 (the initial model) or more")
    if out.is_dir():
        raise CohortError(f"--out {out}: is a directory; name the file to write (e.g. model.safetensors)")
    if not out.parent.is_dir():
        raise CohortError(f"--out {out}: the directory {out.parent} does not exist")
    info = asyncio.run(download(endpoint, out, args.job_id, args.round))
    if args.json:
        from cohort_cli.admin_client import to_json

        print(to_json(info))
        return 0
    meta = info.metadata
    eps = meta.get("cohort_epsilon", "")
    privacy = f", epsilon {float(eps):.3f} at delta {meta.get('cohort_delta')}" if eps and float(eps) > 0 else ""
    print(
        f"wrote {out}: job {info.job_id} round {info.round}, task {meta.get('cohort_task', '?')}{privacy}; "
        f"model {info.model_version}, file {info.file_sha256}, {info.size} bytes (checked)"
    )
    return 0


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    add_admin_args: Callable[[argparse.ArgumentParser], None],
) -> None:
    model = subparsers.add_parser("model", help="take a job's trained model out (admin certificate)")
    commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = commands.add_parser("download", help="write a job's model to a safetensors file, checked by digest")
    p.add_argument("job_id", nargs="?", default="", help="default: the newest job")
    p.add_argument("--round", type=int, default=None, help="the model round N committed (0: initial; default: final)")
    p.add_argument("--out", type=Path, required=True, help="the file to write, e.g. model.safetensors")
    add_admin_args(p)
    p.set_defaults(func=_cmd_download)
