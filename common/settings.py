"""Configuration sections shared by the coordinator and the participant."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError


@dataclass(frozen=True)
class TrainParamsConfig:
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.01
    seed: int = 0

    def check(self, path: str) -> None:
        where = path or "params"
        if not 1 <= self.local_epochs <= 1000:
            raise ConfigError(f"{where}.local_epochs: must be between 1 and 1000")
        if not 1 <= self.batch_size <= 1 << 20:
            raise ConfigError(f"{where}.batch_size: must be between 1 and 1048576")
        if not 0 < self.learning_rate < 100:
            raise ConfigError(f"{where}.learning_rate: must be > 0 and < 100")
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: must be >= 0")


def parse_address(address: str, path: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and check the port."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{path}: expected host:port, got {address!r}")
    return host.strip("[]"), int(port_text)
