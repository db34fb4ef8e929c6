"""Participant daemon configuration (YAML; see docs/CONFIG.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ConfigError
from common.settings import TlsConfig, parse_address

ENV_PREFIX = "COHORT_PARTICIPANT_"


@dataclass(frozen=True)
class CoordinatorEndpoint:
    address: str = "127.0.0.1:50051"
    # Name the coordinator's certificate must carry when it differs from the host in ``address``.
    server_name: str = ""
    rpc_timeout_s: float = 30.0
    transfer_timeout_s: float = 600.0  # deadline of one model download or update upload

    def check(self, path: str) -> None:
        parse_address(self.address, f"{path}.address")
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
class ParticipantConfig:
    tls: TlsConfig
    data_dir: Path
    task: str
    coordinator: CoordinatorEndpoint = field(default_factory=CoordinatorEndpoint)
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
