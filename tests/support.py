"""Test support: certificate identities, config builders binding to 127.0.0.1 port 0, and poll_until."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import torch
import yaml

from common.ca import write_pem
from common.certs import TlsFiles
from common.failpoints import ENV as FAILPOINTS_ENV
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.serde import Assembler, EncodedTensors, encode
from common.settings import TrainParamsConfig
from common.tasks.base import load_task, task_digest
from coordinator.config import CoordinatorConfig, FederationConfig, JobConfig, ServerConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.round.runner import JobRunner
from participant.config import CoordinatorEndpoint, ParticipantConfig, ReconnectConfig
from participant.daemon import ParticipantDaemon

SITES = ("site-a", "site-b", "site-c", "site-d", "site-e")
UNLISTED = "site-z"  # has a valid certificate from the federation CA, but is not on the allow-list

torch.set_num_threads(1)


ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Pki:
    root: Path
    ids: dict[str, TlsFiles]
    foreign: TlsFiles  # a participant certificate from another CA
    expired: TlsFiles  # a participant certificate from our CA that has expired

    def site(self, name: str) -> TlsFiles:
        return self.ids[f"site:{name}"]

    @property
    def coordinator(self) -> TlsFiles:
        return self.ids["coordinator"]

    @property
    def admin(self) -> TlsFiles:
        return self.ids["admin:admin"]


def tls(files: TlsFiles) -> TlsFiles:
    return TlsFiles(ca=files.ca, cert=files.cert, key=files.key)


def write_identity(directory: Path, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(ca=directory / "ca.crt", cert=directory / "tls.crt", key=directory / "tls.key")
    write_pem(files.ca, ca_pem, private=False)
    write_pem(files.cert, cert_pem, private=False)
    write_pem(files.key, key_pem, private=True)
    return files


def cert_pem(cert: object) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509 import Certificate

    assert isinstance(cert, Certificate)
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def coordinator_config(
    pki: Pki,
    state_dir: Path,
    *,
    sites: tuple[str, ...] = SITES,
    job: JobConfig | None = None,
    heartbeat_s: float = 2.0,
) -> CoordinatorConfig:
    return CoordinatorConfig(
        federation=FederationConfig(name="test", sites=sites),
        server=ServerConfig(
            listen="127.0.0.1:0",
            tls=tls(pki.coordinator),
            heartbeat_interval_s=heartbeat_s,
            shutdown_grace_s=1.0,
        ),
        state_dir=state_dir,
        job=job,
    )


def job_config(**overrides: object) -> JobConfig:
    base = JobConfig(
        task="breast_cancer",
        name="test",
        rounds=2,
        fraction=1.0,
        min_sites=3,
        round_timeout_s=60,
        wait_for_sites_s=60,
        evaluate_every=1,
        params=TrainParamsConfig(local_epochs=1, batch_size=16, learning_rate=0.05, seed=3),
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def participant_config(files: TlsFiles, address: str, data_dir: Path, task: str = "breast_cancer") -> ParticipantConfig:
    return ParticipantConfig(
        tls=tls(files),
        data_dir=data_dir,
        task=task,
        coordinator=CoordinatorEndpoint(address=address, rpc_timeout_s=10, transfer_timeout_s=60),
        reconnect=ReconnectConfig(initial_backoff_s=0.05, max_backoff_s=0.5),
    )


async def poll_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 30.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Wait until ``predicate()`` is true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 30.0,
    what: str = "condition",
    *,
    alive: Callable[[], str | None] | None = None,
    interval: float = 0.05,
) -> None:
    """:func:`poll_until` for code outside an event loop (subprocess tests): wait until ``predicate()`` holds, fail
    with ``what`` after ``timeout`` seconds, and at once when ``alive()`` says why a process the wait depends on is
    gone (it returns None while all is well)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        gone = alive() if alive is not None else None
        if gone is not None:
            raise AssertionError(f"while waiting for {what}: {gone}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def running(proc: subprocess.Popen[Any], log: Callable[[], str] = lambda: "") -> Callable[[], str | None]:
    """For :func:`wait_until`'s ``alive``: None while ``proc`` runs, else its exit code and ``log()``."""

    def check() -> str | None:
        code = proc.poll()
        return None if code is None else f"the process exited with {code}\n{log()[-3000:]}"

    return check


def wait_ready_file(
    path: Path, proc: subprocess.Popen[Any], timeout: float = 60, log: Callable[[], str] = lambda: ""
) -> str:
    """The address a daemon started with ``--ready-file path`` writes once it serves."""
    wait_until(path.exists, timeout, f"{path.name} (the process did not start)", alive=running(proc, log))
    return path.read_text().strip()


class SiteProcess:
    """A site as a separate ``cohort participant`` process: what a real SIGKILL or SIGSTOP needs (the crash and
    liveness tests). Failpoints (common/failpoints.py) freeze or kill it at an exact point."""

    def __init__(self, directory: Path, pki: Pki, site: str, data_dir: Path) -> None:
        self.config = directory / f"{site}.yaml"
        self.log = directory / f"{site}.log"
        self.files = pki.site(site)
        self.data_dir = data_dir
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, address: str, task: str, failpoint: str | None) -> None:
        config = {
            "coordinator": {"address": address, "rpc_timeout_s": 10, "transfer_timeout_s": 60},
            "tls": {"ca": str(self.files.ca), "cert": str(self.files.cert), "key": str(self.files.key)},
            "data_dir": str(self.data_dir),
            "task": task,
            "reconnect": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
        }
        self.config.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if k != FAILPOINTS_ENV}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # where a test task lives
        if failpoint is not None:
            env[FAILPOINTS_ENV] = failpoint
        with self.log.open("ab") as out:
            out.write(f"--- start, {FAILPOINTS_ENV}={failpoint or ''}\n".encode())
            out.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cohort_cli",
                "participant",
                "--config",
                str(self.config),
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )

    async def wait_killed(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"the victim did not die within {timeout}s\n{self.tail()}") from None
        assert rc == -signal.SIGKILL, f"the victim exited with {rc}, not by SIGKILL\n{self.tail()}"

    def stopped(self) -> bool:
        """Whether the process is frozen (state T in /proc/PID/stat)."""
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    async def kill(self) -> None:
        """End the process if it still runs, frozen or not (a kill, not a graceful stop: that takes seconds and
        tests nothing)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            await self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "victim log:\n" + "\n".join(text.splitlines()[-lines:])


CoordinatorFactory = Callable[[CoordinatorConfig], Awaitable[CoordinatorDaemon]]
ParticipantFactory = Callable[[ParticipantConfig], Awaitable[ParticipantDaemon]]


def runner_of(daemon: CoordinatorDaemon) -> JobRunner:
    runner = daemon.coordinator.runner
    assert runner is not None, "no job was started"
    return runner


def join_request(**overrides: object) -> pb.JoinRequest:
    task = load_task("breast_cancer")
    fields: dict[str, object] = {
        "task_name": task.name,
        "task_digest": task_digest(task),
        "schema_fingerprint": task.schema.fingerprint(),
        "software_version": "test",
    }
    fields.update(overrides)
    return pb.JoinRequest(**fields)  # type: ignore[arg-type]


def channel(address: str, files: TlsFiles | None, ca: Path) -> grpc.aio.Channel:
    if files is None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=files.key.read_bytes(),
            certificate_chain=files.cert.read_bytes(),
        )
    return grpc.aio.secure_channel(address, creds)


async def download_model(
    stub: pb_grpc.FederationAsyncStub, job_id: str, version: str, timeout: float = 10.0
) -> dict[str, torch.Tensor]:
    """Stream a model down (manifest, then chunks) and return its tensors; the assembler checks the digest."""
    asm = None
    async for chunk in stub.DownloadModel(pb.ModelRequest(job_id=job_id, model_version=version), timeout=timeout):
        if chunk.WhichOneof("kind") == "manifest":
            asm = Assembler(chunk.manifest)
        else:
            assert asm is not None
            asm.add(chunk.data)
    assert asm is not None
    return asm.finish()


def update_header(task: pb.TrainTask, enc: EncodedTensors, **header: object) -> pb.UpdateHeader:
    """A well-formed upload header for ``task`` carrying ``enc``; keyword arguments override its fields."""
    fields: dict[str, object] = {
        "job_id": task.job_id,
        "round": task.round,
        "attempt": task.attempt,
        "base_model_version": task.model_version,
        "num_samples": 10,
        "metrics": {"loss": 0.5},
        "manifest": enc.manifest(),
    }
    fields.update(header)
    return pb.UpdateHeader(**fields)  # type: ignore[arg-type]


def update_messages(
    task: pb.TrainTask, tensors: dict[str, torch.Tensor], chunk_bytes: int = 4096, **header: object
) -> list[pb.UpdateChunk]:
    """An upload stream: the header, then the tensors' bytes in ``chunk_bytes`` chunks."""
    enc = encode(tensors)
    first = pb.UpdateChunk(header=update_header(task, enc, **header))
    return [first, *(pb.UpdateChunk(data=bytes(c)) for c in enc.chunks(chunk_bytes))]
