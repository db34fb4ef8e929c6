"""Coordinator configuration (YAML; see docs/CONFIG.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.certs import TlsFiles
from common.errors import ConfigError
from common.names import RULE, is_name
from common.settings import HttpConfig, TrainParamsConfig, parse_address
from common.tasks.standardize import DEFAULT_LOWER_QUANTILE, DEFAULT_UPPER_QUANTILE
from coordinator.strategy.config import StrategyConfig

ENV_PREFIX = "COHORT_COORDINATOR_"
# A round's attempts number its secure-aggregation instances (common/secagg_wire.py secagg_round_no).
MAX_ROUND_RETRIES = 499


@dataclass(frozen=True)
class FederationConfig:
    """Who may take part: the allow-list of site ids (each must match a certificate's CN), and who may not.

    ``deny_list`` names a YAML file of revoked site ids, certificate serials and fingerprints
    (coordinator/denylist.py). The coordinator re-reads it when it changes (checked every ``deny_list_poll_s``)
    and drops the live sessions it revokes, without a restart.
    """

    name: str = "cohort"
    sites: tuple[str, ...] = ()
    deny_list: Path | None = None
    deny_list_poll_s: float = 1.0

    def check(self, path: str) -> None:
        where = path or "federation"
        for i, site in enumerate(self.sites):
            if not is_name(site):
                raise ConfigError(f"{where}.sites[{i}]: {site!r} is not a valid site id ({RULE})")
        if len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"{where}.sites: a site id is listed twice")
        if not self.sites:
            raise ConfigError(f"{where}.sites: the allow-list is empty; list the site ids that may join")
        if not 0.05 <= self.deny_list_poll_s <= 3600:
            raise ConfigError(f"{where}.deny_list_poll_s: must be between 0.05 and 3600 seconds")


@dataclass(frozen=True)
class ServerConfig:
    """The listening endpoint and the limits that keep one peer from exhausting the coordinator.

    Uploads: a stream that sends no message for ``upload_idle_timeout_s`` or is not complete within
    ``upload_deadline_s`` is cut (slow-loris), as is one with more than ``max_upload_chunks`` messages or a chunk over
    ``max_chunk_bytes``. At most ``max_concurrent_uploads`` uploads are read at once (0: no limit); the others wait,
    held back by HTTP/2 flow control with a fixed per-stream window of ``stream_window_bytes`` (no BDP probing, whose
    windows grow to megabytes per stream and so the coordinator's memory with the number of sites). Joins: a token
    bucket per caller (``join_rate_per_min`` refill, ``join_burst`` size) and one for everyone
    (``join_global_rate_per_min``, ``join_global_burst``; 0 sizes it from the allow-list).
    """

    listen: str = "127.0.0.1:50051"
    tls: TlsFiles | None = None
    heartbeat_interval_s: float = 5.0
    # HTTP/2 keepalive: the coordinator pings every half heartbeat interval and closes a connection whose ping is not
    # answered within this many seconds (None: two heartbeat intervals). This, not a late heartbeat, is what drops a
    # site that has a task in hand, so it bounds how long a busy site may be frozen (swapped out, starved of CPU).
    keepalive_timeout_s: float | None = None
    shutdown_grace_s: float = 5.0
    max_chunk_bytes: int = 4 << 20
    max_update_bytes: int = 2 << 30
    max_upload_chunks: int = 65_536
    upload_idle_timeout_s: float = 30.0
    upload_deadline_s: float = 900.0
    max_concurrent_uploads: int = 4
    max_concurrent_downloads: int = 4
    stream_window_bytes: int = 1 << 20
    join_rate_per_min: float = 30.0
    join_burst: int = 10
    join_global_rate_per_min: float = 600.0
    join_global_burst: int = 0
    # The bulk data channel (docs/ARCHITECTURE.md): models and updates over mutual TLS on a second port, several
    # times cheaper per byte than gRPC-python. "auto": the host of ``listen`` and the next port (a free one when
    # ``listen``'s port is 0); host:port; "off" (every transfer uses gRPC). Sites learn the port at Join and fall
    # back to gRPC when they cannot reach it.
    data_listen: str = "auto"
    data_idle_timeout_s: float = 300.0  # a data connection with no request for this long is closed
    max_data_connections: int = 1024  # open data connections (one thread each); more are refused

    @property
    def data_address(self) -> str | None:
        """Where the bulk data channel listens (``data_listen`` with "auto" resolved); None when it is off."""
        if self.data_listen == "off":
            return None
        if self.data_listen != "auto":
            return self.data_listen
        host, port = parse_address(self.listen, "server.listen")
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{port + 1 if port else 0}"

    @property
    def keepalive_timeout(self) -> float:
        return self.keepalive_timeout_s if self.keepalive_timeout_s is not None else 2 * self.heartbeat_interval_s

    def check(self, path: str) -> None:
        where = path or "server"
        parse_address(self.listen, f"{where}.listen")
        if self.tls is None:
            raise ConfigError(f"{where}.tls: required (ca, cert, key); Cohort has no insecure mode")
        if not 0.05 <= self.heartbeat_interval_s <= 600:
            raise ConfigError(f"{where}.heartbeat_interval_s: must be between 0.05 and 600 seconds")
        if self.keepalive_timeout_s is not None and not 1 <= self.keepalive_timeout_s <= 3600:
            raise ConfigError(f"{where}.keepalive_timeout_s: must be between 1 and 3600 seconds")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"{where}.shutdown_grace_s: must be >= 0")
        if not 1 << 16 <= self.max_chunk_bytes <= 64 << 20:
            raise ConfigError(f"{where}.max_chunk_bytes: must be between 64 KiB and 64 MiB")
        if not 1 <= self.max_upload_chunks <= 1 << 24:
            raise ConfigError(f"{where}.max_upload_chunks: must be between 1 and {1 << 24}")
        if not 0 < self.upload_idle_timeout_s <= self.upload_deadline_s <= 86_400:
            raise ConfigError(
                f"{where}.upload_idle_timeout_s and upload_deadline_s: need 0 < idle timeout <= deadline <= 86400 s"
            )
        if not 0 <= self.max_concurrent_uploads <= 10_000:
            raise ConfigError(f"{where}.max_concurrent_uploads: must be between 0 (no limit) and 10000")
        if not 0 <= self.max_concurrent_downloads <= 10_000:
            raise ConfigError(f"{where}.max_concurrent_downloads: must be between 0 (no limit) and 10000")
        if not 1 << 16 <= self.stream_window_bytes <= 64 << 20:
            raise ConfigError(f"{where}.stream_window_bytes: must be between 64 KiB and 64 MiB")
        if self.join_rate_per_min <= 0 or self.join_global_rate_per_min <= 0:
            raise ConfigError(f"{where}.join_rate_per_min and join_global_rate_per_min: must be > 0")
        if self.data_listen not in ("auto", "off"):
            parse_address(self.data_listen, f"{where}.data_listen")
        elif self.data_listen == "auto" and parse_address(self.listen, f"{where}.listen")[1] == 65535:
            raise ConfigError(f"{where}.data_listen: 'auto' takes the port after listen's 65535; name one, or 'off'")
        if not 1 <= self.data_idle_timeout_s <= 86_400:
            raise ConfigError(f"{where}.data_idle_timeout_s: must be between 1 and 86400 seconds")
        if not 1 <= self.max_data_connections <= 100_000:
            raise ConfigError(f"{where}.max_data_connections: must be between 1 and 100000")
        if self.join_burst < 1 or self.join_global_burst < 0:
            raise ConfigError(f"{where}.join_burst: must be >= 1; join_global_burst: >= 0 (0: from the allow-list)")


@dataclass(frozen=True)
class SecureAggregationConfig:
    """SecAgg+ for the job's rounds: the coordinator only ever sees the sum of the sites' updates.

    ``clip`` bounds every coordinate of a site's update before it is encoded (the encoding's range); ``weight_cap``
    bounds a site's FedAvg weight (sample counts above it count as the cap). ``dropout_rate`` and
    ``corruption_rate`` choose the neighbour count k and threshold t for large cohorts (see common/secagg/graph.py);
    up to ``full_graph_max`` sites every site is every site's neighbour (classic SecAgg). A site that aborts
    ``max_site_aborts`` secure rounds of a job (each abort makes it a dropout of that round; docs/SECURITY.md) is
    suspended from the job's cohorts until an admin clears it (0: never suspend).
    """

    enabled: bool = False
    bits: int = 32
    clip: float = 1.0
    weight_cap: int = 10_000
    dropout_rate: float = 0.2
    corruption_rate: float = 0.0
    stage_timeout_s: float = 60.0
    full_graph_max: int = 64
    max_site_aborts: int = 3

    def check(self, path: str) -> None:
        where = path or "secure_aggregation"
        if not 16 <= self.bits <= 32:
            raise ConfigError(f"{where}.bits: must be between 16 and 32")
        if not 0 < self.clip < 1e6:
            raise ConfigError(f"{where}.clip: must be > 0")
        if self.weight_cap < 1:
            raise ConfigError(f"{where}.weight_cap: must be >= 1")
        if not (0 <= self.dropout_rate < 1 and 0 <= self.corruption_rate < 1):
            raise ConfigError(f"{where}.dropout_rate and corruption_rate: must be in [0, 1)")
        if self.stage_timeout_s <= 0 or self.full_graph_max < 2:
            raise ConfigError(f"{where}.stage_timeout_s must be > 0 and full_graph_max >= 2")
        if not 0 <= self.max_site_aborts <= 1000:
            raise ConfigError(f"{where}.max_site_aborts: must be between 0 (never suspend) and 1000")


@dataclass(frozen=True)
class StandardizeConfig:
    """Federated feature standardization (common/tasks/standardize.py): before round 1 the sites' feature statistics
    are summed securely, and every train and evaluate task carries the scaling derived from the totals.

    Needs secure aggregation (a site's statistics in the clear would show the coordinator that site's feature means
    and histograms; docs/SECURITY.md) and a task that declares ``feature_ranges``. Each feature is clipped to the
    pooled ``lower_quantile`` / ``upper_quantile`` (0 / 1: no clip on that side), then standardized.
    """

    enabled: bool = False
    lower_quantile: float = DEFAULT_LOWER_QUANTILE
    upper_quantile: float = DEFAULT_UPPER_QUANTILE

    def check(self, path: str) -> None:
        where = path or "standardize"
        if not 0 <= self.lower_quantile < 0.5 < self.upper_quantile <= 1:
            raise ConfigError(f"{where}: need 0 <= lower_quantile < 0.5 < upper_quantile <= 1")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy for the job, and its budget.

    ``unit``: "none"; "record" (each site trains with DP-SGD and owns its record-level budget; the coordinator
    collects and reports each site's epsilon); "site" (DP-FedAvg: each site's whole update is clipped to
    ``clip_norm`` and noise with std ``noise_multiplier * clip_norm`` is added to the sum: by the coordinator
    ("central", without secure aggregation) or by the sites in the integer domain (Skellam, with it)).
    ``target_epsilon`` (0: no budget, report only) and ``delta`` bound the job; the coordinator refuses a job whose
    plan exceeds the budget (unless ``refuse_over_budget`` is false) and stops before a round that would exceed it.
    """

    unit: Literal["none", "record", "site"] = "none"
    target_epsilon: float = 0.0
    delta: float = 1e-5
    accountant: Literal["pld", "rdp"] = "pld"
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    refuse_over_budget: bool = True
    # Adaptive clipping (Andrew et al. 2021), site level without secure aggregation: C starts at clip_norm and
    # follows the target quantile of the sites' update norms; the noised count costs part of the noise budget.
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_noise_std: float = 10.0

    def check(self, path: str) -> None:
        where = path or "privacy"
        if not 0 <= self.target_quantile <= 1 or self.clip_learning_rate <= 0 or self.count_noise_std < 0:
            raise ConfigError(f"{where}: target_quantile in [0, 1], clip_learning_rate > 0, count_noise_std >= 0")
        if self.target_epsilon < 0:
            raise ConfigError(f"{where}.target_epsilon: must be >= 0 (0: no budget)")
        if not 0 < self.delta < 1:
            raise ConfigError(f"{where}.delta: must be in (0, 1)")
        if self.noise_multiplier <= 0 or self.clip_norm <= 0:
            raise ConfigError(f"{where}.noise_multiplier and clip_norm: must be > 0")
        if not 0.01 <= self.noise_multiplier <= 1000:
            # Outside this range the accountants' arithmetic under- or overflows, and no useful setting lies there.
            raise ConfigError(f"{where}.noise_multiplier: must be between 0.01 and 1000")


@dataclass(frozen=True)
class JobConfig:
    """A training job: which task, how many rounds, how the cohort is picked, local hyper-parameters."""

    task: str
    name: str = "job"
    rounds: int = 10
    fraction: float = 1.0
    min_sites: int = 2
    # Connected, eligible sites needed before a round starts (0: same as min_sites). Like Flower's
    # min_available_clients: wait for the federation to assemble, then train with whoever is there.
    min_available_sites: int = 0
    round_timeout_s: float = 300.0
    wait_for_sites_s: float = 600.0
    evaluate_every: int = 1
    max_round_retries: int = 3
    # Over-selection (Bonawitz et al. 2019): pick ceil(k * (1 + over_selection)) sites for a round that needs k and
    # close it as soon as k have reported, so a few stragglers do not hold every round up to its deadline.
    over_selection: float = 0.0
    # After the last round, a federated evaluation on the sites' test splits gives the job's test accuracy. Benches
    # and batch runs that do not need it switch it off.
    final_evaluation: bool = True
    params: TrainParamsConfig = field(default_factory=TrainParamsConfig)
    # The task's own parameters (model width, loss ...), checked against the schema the task declares when the
    # coordinator loads it; sent with every task, part of the job's identity (common/tasks/params.py).
    task_params: dict[str, bool | int | float | str] = field(default_factory=dict)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # Server optimizer, aggregation rule and cohort selection (coordinator/strategy/config.py).
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    # The federated feature-statistics phase before round 1 (off: the task's own fallback scaling).
    standardize: StandardizeConfig = field(default_factory=StandardizeConfig)

    def check(self, path: str) -> None:
        where = path or "job"
        if self.standardize.enabled and not self.secure_aggregation.enabled:
            raise ConfigError(
                f"{where}.standardize.enabled: the statistics phase needs secure_aggregation.enabled (in the clear, "
                "each site's statistics would show the coordinator that site's feature means and histograms)"
            )
        self.strategy.check_with(
            f"{where}.strategy",
            min_sites=self.min_sites,
            secure=self.secure_aggregation.enabled,
            site_dp=self.privacy.unit == "site",
        )
        if self.secure_aggregation.enabled and self.min_sites < 2:
            raise ConfigError(f"{where}.min_sites: secure aggregation needs at least 2 sites per round")
        if not 1 <= self.rounds <= 100_000:
            raise ConfigError(f"{where}.rounds: must be between 1 and 100000")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"{where}.fraction: must be in (0, 1]")
        if self.min_sites < 1:
            raise ConfigError(f"{where}.min_sites: must be >= 1")
        if self.min_available_sites < 0:
            raise ConfigError(f"{where}.min_available_sites: must be >= 0")
        if self.round_timeout_s <= 0 or self.wait_for_sites_s <= 0:
            raise ConfigError(f"{where}.round_timeout_s and wait_for_sites_s must be > 0")
        if self.evaluate_every < 0 or not 0 <= self.max_round_retries <= MAX_ROUND_RETRIES:
            raise ConfigError(
                f"{where}.evaluate_every must be >= 0 and max_round_retries between 0 and {MAX_ROUND_RETRIES}"
            )
        if not 0 <= self.over_selection <= 1:
            raise ConfigError(f"{where}.over_selection: must be between 0 (off) and 1 (twice the sites a round needs)")

    @property
    def unmask_reserve_s(self) -> float:
        """The end of the round kept for the two unmasking stages of secure aggregation (0 without it)."""
        if not self.secure_aggregation.enabled:
            return 0.0
        return min(2 * self.secure_aggregation.stage_timeout_s, self.round_timeout_s / 4)


@dataclass(frozen=True)
class StateConfig:
    """What the coordinator keeps in ``state_dir`` (coordinator/state/retention.py)."""

    # Model files per job: the last N completed rounds' models (and server-optimizer moments) plus the best one by
    # validation accuracy. 0 keeps every round's model.
    keep_models: int = 0

    def check(self, path: str) -> None:
        if self.keep_models < 0:
            raise ConfigError(f"{path}.keep_models: 0 (keep all) or more, got {self.keep_models}")


@dataclass(frozen=True)
class CoordinatorConfig:
    federation: FederationConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    state_dir: Path = Path("state/coordinator")
    job: JobConfig | None = None  # started at boot when given; otherwise an admin starts one
    http: HttpConfig = field(default_factory=HttpConfig)  # /healthz, /readyz (common/ops_http.py); off when empty
    state: StateConfig = field(default_factory=StateConfig)  # retention of model files

    def check(self, path: str) -> None:
        if self.server.tls is None:
            raise ConfigError("server.tls: required (ca, cert, key); Cohort has no insecure mode")
        if self.job is not None:
            for key in ("min_sites", "min_available_sites"):
                value = getattr(self.job, key)
                if value > len(self.federation.sites):
                    raise ConfigError(
                        f"job.{key}: {value} is more than the {len(self.federation.sites)} sites on the allow-list"
                    )
