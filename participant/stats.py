"""What a participant daemon counts about its own work, and the Prometheus view of it (``/metrics`` on its ops port).

:class:`SiteStats` is plain counters that the work loop and the connection bump (no I/O, no locks: they are written
in the event loop and only read, as whole numbers, by the scrape in the HTTP thread). :class:`SiteCollector` turns
them into metrics at scrape time. Everything here is about this site only, exposed at this site.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.logs import CONVERGENCE


@dataclass
class SiteStats:
    trainings: int = 0
    train_seconds: float = 0.0
    evaluations: int = 0
    model_bytes_received: int = 0
    update_bytes_sent: int = 0
    joins: int = 0  # sessions opened; every one after the first is a reconnect
    epsilon: float = 0.0  # record-level epsilon this site has spent (0 without record-level DP)
    epsilon_budget: float = 0.0

    @property
    def reconnects(self) -> int:
        return max(0, self.joins - 1)


class SiteCollector(Collector):
    def __init__(self, stats: SiteStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        counters = (
            ("cohort_site_trainings", "Training tasks completed and uploaded", s.trainings),
            ("cohort_site_train_seconds", "Seconds spent training locally", s.train_seconds),
            ("cohort_site_evaluations", "Evaluation tasks reported", s.evaluations),
            ("cohort_site_model_bytes_received", "Bytes of global models downloaded", s.model_bytes_received),
            ("cohort_site_update_bytes_sent", "Bytes of updates uploaded (masked or not)", s.update_bytes_sent),
            ("cohort_site_joins", "Sessions opened with the coordinator", s.joins),
            ("cohort_site_reconnects", "Sessions opened after the first (reconnects)", s.reconnects),
            ("cohort_dp_accounting_convergence_warnings", "RDP orders not converged", CONVERGENCE.count),
        )
        for name, text, value in counters:
            yield CounterMetricFamily(name, text, value=float(value))
        yield GaugeMetricFamily("cohort_site_record_epsilon", "Record-level epsilon spent here", value=s.epsilon)
        yield GaugeMetricFamily(
            "cohort_site_record_epsilon_budget", "This site's record-level epsilon budget", value=s.epsilon_budget
        )


def registry_for(stats: SiteStats) -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(SiteCollector(stats))
    return registry
