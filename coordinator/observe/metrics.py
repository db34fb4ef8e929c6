"""The coordinator's Prometheus metrics (``GET /metrics`` on the ops HTTP port, common/ops_http.py).

Every metric lives in the daemon's own registry (two coordinators in one test process do not share counters). They
are fed from three places, never from the round machine itself (it stays pure): the job runner after it executed an
event's actions (:class:`coordinator.observe.watch.JobWatch`), the servicers' error translation (refused calls) and
the registry's join/leave notifications.

No metric carries a per-site value that secure aggregation hides (docs/SECURITY.md, "What the coordinator keeps about
each site"): counts, bytes and times are federation totals; the only per-site label is on the record-level epsilon a
site publishes about itself.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from common.logs import CONVERGENCE

PHASES = ("dispatch", "training_wait", "upload", "unmask", "aggregate", "commit")
_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class CoordinatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes (RSS), CPU seconds, open fds
        self.rounds_started = Counter("cohort_rounds_started", "Round attempts started", registry=r)
        self.rounds_completed = Counter("cohort_rounds_completed", "Round attempts committed", registry=r)
        self.rounds_failed = Counter("cohort_rounds_failed", "Round attempts that failed", registry=r)
        self.round_seconds = Histogram(
            "cohort_round_duration_seconds",
            "Wall time of a round attempt, from its start to its commit or failure",
            ["outcome"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.phase_seconds = Histogram(
            "cohort_round_phase_seconds",
            "Time per phase of a round: dispatch (record and queue the tasks), training_wait (start to first upload), "
            "upload (first upload to the last input), unmask (secure aggregation), aggregate, commit",
            ["phase"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.bytes_received = Counter(
            "cohort_upload_bytes_received", "Bytes of verified updates (masked inputs included)", registry=r
        )
        self.bytes_sent = Counter("cohort_model_bytes_sent", "Bytes of global models sent to sites", registry=r)
        self.transfers = Counter(
            "cohort_transfers",
            "Model downloads and update uploads completed, by channel (grpc, or data: the bulk data channel) and "
            "direction (download, upload); uploads over gRPC while a data port is open mean sites cannot reach it",
            ["channel", "direction"],
            registry=r,
        )
        self.uploads_accepted = Counter(
            "cohort_uploads_accepted", "Uploads verified and counted", ["kind"], registry=r
        )  # kind: train, evaluation (a secure evaluation's masked input)
        self.uploads_refused = Counter(
            "cohort_uploads_refused", "Uploads refused, by gRPC status", ["reason"], registry=r
        )
        self.rpcs_refused = Counter(
            "cohort_rpcs_refused", "Calls refused, by method and gRPC status", ["method", "code"], registry=r
        )
        self.handshakes_refused = Counter(
            "cohort_tls_handshakes_refused", "TLS handshakes refused, by reason", ["reason"], registry=r
        )
        self.site_joins = Counter("cohort_site_joins", "Sessions opened by sites (Join)", registry=r)
        self.site_leaves = Counter("cohort_site_leaves", "Sessions that ended (left, dropped, replaced)", registry=r)
        self.sites_allowed = Gauge("cohort_sites_allowed", "Sites on the allow-list", registry=r)
        self.sites_connected = Gauge("cohort_sites_connected", "Sites with an open session", registry=r)
        self.sites_selected = Gauge("cohort_round_sites_selected", "Cohort of the latest round attempt", registry=r)
        self.sites_reported = Gauge(
            "cohort_round_sites_reported", "Sites counted in the latest finished round attempt", registry=r
        )
        self.sites_dropped = Counter(
            "cohort_round_sites_dropped", "Sites asked to train but not counted in their attempt", registry=r
        )
        self.sites_suspended = Gauge(
            "cohort_sites_suspended", "Sites suspended from the running job for secure-aggregation aborts", registry=r
        )
        self.secagg_site_aborts = Counter(
            "cohort_secagg_site_aborts", "Secure-aggregation aborts charged to a site", registry=r
        )
        self.secagg_rounds_aborted = Counter(
            "cohort_secagg_rounds_aborted", "Secure-aggregation instances that aborted", registry=r
        )
        self.audit_events = Counter(
            "cohort_job_audit_events", "Audit events written by running jobs, by kind", ["kind"], registry=r
        )
        self.epsilon = Gauge(
            "cohort_privacy_epsilon", "Epsilon spent by the running job (record level: the largest)", registry=r
        )
        self.epsilon_budget = Gauge("cohort_privacy_epsilon_budget", "The running job's epsilon budget", registry=r)
        self.site_record_epsilon = Gauge(
            "cohort_site_record_epsilon",
            "Record-level epsilon a site reports about itself (kept in the clear under secure aggregation too)",
            ["site"],
            registry=r,
        )
        self.job_round = Gauge("cohort_job_completed_rounds", "Rounds the running job has committed", registry=r)
        self.job_rounds = Gauge("cohort_job_rounds", "Rounds the running job is asked to train", registry=r)
        Gauge(
            "cohort_dp_accounting_convergence_warnings",
            "dp-accounting RDP orders that failed to converge (logged once, then counted)",
            registry=r,
        ).set_function(lambda: float(CONVERGENCE.count))
        for phase in PHASES:  # every phase appears on the first scrape, with 0 observations
            self.phase_seconds.labels(phase)
        for outcome in ("completed", "failed"):
            self.round_seconds.labels(outcome)
