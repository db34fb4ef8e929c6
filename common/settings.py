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
    # The local optimizer: "task" (the task's own make_optimizer), "sgd" (with ``momentum``; 0: plain SGD) or
    # "adam"; ``weight_decay`` for both. ``keep_optimizer_state``: each site keeps its optimizer's state (momentum,
    # Adam's moments) from one round to its next instead of starting fresh.
    optimizer: Literal["task", "sgd", "adam"] = "task"
    momentum: float = 0.0
    weight_decay: float = 0.0
    keep_optimizer_state: bool = False
    # FedProx (Li et al. 2020): every local step also pulls toward the round's global model, mu/2 * ||w - w_global||^2.
    proximal_mu: float = 0.0

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
        if not 0 <= self.momentum < 1 or not 0 <= self.weight_decay < 1:
            raise ConfigError(f"{where}.momentum and weight_decay: must be in [0, 1)")
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(f"{where}.momentum: only for optimizer: sgd (adam keeps its own moments)")
        if self.weight_decay and self.optimizer == "task":
            raise ConfigError(f"{where}.weight_decay: choose optimizer: sgd or adam to set it")
        if not 0 <= self.proximal_mu <= 100:
            raise ConfigError(f"{where}.proximal_mu: must be between 0 (off) and 100")


@dataclass(frozen=True)
class HttpConfig:
    """The operations HTTP endpoint (common/ops_http.py: /healthz, /readyz); off while ``listen`` is empty.

    Plain HTTP without TLS and without any federation data: bind it to loopback, or to a port that only the
    orchestrator's probes reach (the Kubernetes manifests' NetworkPolicy, the compose healthchecks).
    """

    listen: str = ""
    # Coordinator only: also serve /dashboard and /api/dashboard. They show what `cohort status` shows an admin (sites,
    # the job, epsilon, recent audit events with peer addresses) to anyone who reaches the port, so they are off
    # unless asked for; /healthz, /readyz and /metrics carry no federation detail beyond aggregate counters.
    dashboard: bool = False

    def check(self, path: str) -> None:
        if self.listen:
            parse_address(self.listen, f"{path or 'http'}.listen")
        if self.dashboard and not self.listen:
            raise ConfigError(f"{path or 'http'}.dashboard: needs {path or 'http'}.listen (the port it is served on)")

    @property
    def enabled(self) -> bool:
        return bool(self.listen)


def parse_address(address: str, path: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and check the port."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{path}: expected host:port, got {address!r}")
    return host.strip("[]"), int(port_text)
