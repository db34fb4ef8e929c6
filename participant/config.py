"""Participant daemon configuration (YAML; see docs/CONFIG.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from common.certs import TlsFiles
from common.errors import ConfigError
from common.settings import HttpConfig, parse_address

ENV_PREFIX = "COHORT_PARTICIPANT_"


@dataclass(frozen=True)
class CoordinatorEndpoint:
    address: str = "127.0.0.1:50051"
    # Name the coordinator's certificate must carry when it differs from the host in ``address``.
    server_name: str = ""
    rpc_timeout_s: float = 30.0
    transfer_timeout_s: float = 600.0  # deadline of one model download or update upload
    # Move models and updates over the coordinator's bulk data channel when it offers one (participant/bulk.py);
    # off: gRPC only. ``data_address`` (host:port) overrides where it is dialled (a port mapped by a firewall or NAT).
    data_channel: bool = True
    data_address: str = ""

    def check(self, path: str) -> None:
        parse_address(self.address, f"{path}.address")
        if self.data_address:
            parse_address(self.data_address, f"{path}.data_address")
        if self.rpc_timeout_s <= 0 or self.transfer_timeout_s <= 0:
            raise ConfigError(f"{path}: rpc_timeout_s and transfer_timeout_s must be > 0")


@dataclass(frozen=True)
class ReconnectConfig:
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def check(self, path: str) -> None:
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ConfigError(f"{path}: need 0 < initial_backoff_s <= max_backoff_s")


@dataclass(frozen=True)
class TrainingConfig:
    torch_threads: int = 1

    def check(self, path: str) -> None:
        if not 1 <= self.torch_threads <= 256:
            raise ConfigError(f"{path}.torch_threads: must be between 1 and 256")


@dataclass(frozen=True)
class RecordPrivacyConfig:
    """Record-level DP at this site (DP-SGD in local training) and the site's own budget.

    The site owns these: with ``enabled``, every round trains with DP-SGD at ``noise_multiplier`` and per-record
    clip ``max_grad_norm``, and the site refuses a round that would take its epsilon at ``delta`` past
    ``target_epsilon``. What it has spent is kept in ``state_file`` across restarts.
    """

    enabled: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float = 8.0
    delta: float = 1e-5
    state_file: Path = Path("state/participant/privacy.json")

    def check(self, path: str) -> None:
        # noise_multiplier 0 would mean no privacy at all: epsilon is infinite after one step.
        if not 0 < self.noise_multiplier < math.inf:
            raise ConfigError(f"{path}.noise_multiplier: must be a positive number")
        if not 0 < self.max_grad_norm < math.inf:
            raise ConfigError(f"{path}.max_grad_norm: must be a positive number")
        if not 0 < self.target_epsilon < math.inf:
            raise ConfigError(f"{path}.target_epsilon: must be a positive number")
        if not 0 < self.delta < 1:
            raise ConfigError(f"{path}.delta: must be between 0 and 1 (exclusive)")


@dataclass(frozen=True)
class ParticipantConfig:
    tls: TlsFiles
    data_dir: Path
    task: str
    coordinator: CoordinatorEndpoint = field(default_factory=CoordinatorEndpoint)
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: RecordPrivacyConfig = field(default_factory=RecordPrivacyConfig)
    http: HttpConfig = field(default_factory=HttpConfig)  # /healthz, /readyz (common/ops_http.py); off when empty
    # Stop the daemon (exit code 0) once the coordinator says the job it serves has finished: for benches and batch
    # runs. A long-running site leaves it off and waits for the next job.
    exit_after_job: bool = False
    # Keep each finished job's final model here (a safetensors file with the coordinator's checkpoint metadata,
    # owner-only, replaced atomically by the next job's); only jobs this site trained or evaluated. Off when unset.
    keep_final_model: Path | None = None

    def check(self, path: str) -> None:
        if self.keep_final_model is not None and self.keep_final_model.is_dir():
            raise ConfigError(
                f"{path + '.' if path else ''}keep_final_model: {self.keep_final_model} is a directory; name the "
                f"file to write, e.g. {self.keep_final_model / 'final.safetensors'}"
            )
