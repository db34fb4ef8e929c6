"""Configuration sections shared by the coordinator and the participant."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from common.errors import ConfigError


@dataclass(frozen=True)
class TrainParamsConfig:
    """Local training, as the coordinator tells every site each round.

    ``lr_schedule`` makes the learning rate a function of the round (the coordinator sends each round's rate):
    ``constant``; ``step`` (times ``lr_gamma`` every ``lr_step_rounds`` rounds); ``cosine`` (from ``learning_rate``
    down to ``lr_min`` over the job's rounds).
    """

    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.01
    seed: int = 0
    lr_schedule: Literal["constant", "step", "cosine"] = "constant"
    lr_step_rounds: int = 10
    lr_gamma: float = 0.5
    lr_min: float = 0.0

    def rate(self, number: int, rounds: int) -> float:
        """The learning rate of round ``number`` (from 1) of a job of ``rounds`` rounds."""
        if self.lr_schedule == "step":
            return self.learning_rate * self.lr_gamma ** ((number - 1) // self.lr_step_rounds)
        if self.lr_schedule == "cosine":
            progress = (number - 1) / max(1, rounds - 1)
            return self.lr_min + (self.learning_rate - self.lr_min) * (1 + math.cos(math.pi * progress)) / 2
        return self.learning_rate

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
        if not 1 <= self.lr_step_rounds <= 100_000 or not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"{where}.lr_step_rounds: must be between 1 and 100000; lr_gamma in (0, 1]")
        if not 0 <= self.lr_min < self.learning_rate:
            raise ConfigError(f"{where}.lr_min: must be >= 0 and below learning_rate")


def parse_address(address: str, path: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and check the port."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{path}: expected host:port, got {address!r}")
    return host.strip("[]"), int(port_text)
