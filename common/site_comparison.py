"""Is federating worth it? Each site alone, the federation, and pooled data, measured on each site's own test split.

Three ways to train the same task's model with the same recipe (``settings``, ``rounds x local_epochs`` epochs):

* **alone**: each site trains only on its own training split (what a bank can do without anyone else);
* **federated**: FedAvg over all sites (what Cohort does; :func:`common.datasets.fedavg` in one process, or the
  model a real federation produced);
* **pooled**: one model on every site's training records together (what no federation may build: the yardstick).

Each model is scored on each site's own test split with the task's imbalance metrics (common/metrics.py), and the
federated and pooled models also on all test splits together (the sum of the sites' score histograms, as the
coordinator computes it). Scaling follows what each party could do: with ``scaling="federated"`` a site alone
standardizes with its own statistics, the federation and the pool with the federation's
(:func:`federated_scaling`); with ``"fallback"`` every party uses the task's fixed fallback.

Used by ``bench/fraud.py`` (several seeds, in the README) and ``cohort demo --use-case fraud`` (the federated
model from the real daemons).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, cast

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from common.datasets import fedavg
from common.errors import ConfigError
from common.metrics import ScoreHistogram, imbalance_metrics
from common.tasks.base import SiteData, Task, TrainSettings
from common.tasks.setup import TaskSetup, prepare
from common.tasks.standardize import FeatureScaling, derive_scaling
from common.tasks.tabular import dataset_tensors

Scaling = Literal["federated", "fallback"]
METRIC = "auc_pr"


@dataclass(frozen=True)
class Comparison:
    """``metric`` of each model on each site's test split; ``*_all``: over every site's test split together."""

    metric: str
    alone: dict[str, float]
    federated: dict[str, float]
    pooled: dict[str, float]
    federated_all: float
    pooled_all: float

    @property
    def median_alone(self) -> float:
        return statistics.median(self.alone.values())

    def table(self) -> list[str]:
        """Lines of a plain-text table: one row per site, then the medians and the all-sites values."""
        name = self.metric.upper().replace("_", "-")
        lines = [f"{'site':<10} {name + ' alone':>14} {'federated':>10} {'pooled':>8}"]
        for site in self.alone:
            lines.append(
                f"{site:<10} {self.alone[site]:>14.4f} {self.federated[site]:>10.4f} {self.pooled[site]:>8.4f}"
            )
        lines.append(
            f"{'median':<10} {self.median_alone:>14.4f} {statistics.median(self.federated.values()):>10.4f} "
            f"{statistics.median(self.pooled.values()):>8.4f}"
        )
        lines.append(f"{'all sites':<10} {'':>14} {self.federated_all:>10.4f} {self.pooled_all:>8.4f}")
        return lines


def federated_scaling(task: Task, sites: Mapping[str, SiteData]) -> FeatureScaling:
    """What the statistics phase gives the sites: the scaling derived from the sum of their statistics vectors
    (in the clear here; the federation sums them under secure aggregation). The task must declare feature_ranges."""
    spec_of, statistics = getattr(task, "statistics_spec", None), getattr(task, "site_statistics", None)
    spec = spec_of() if callable(spec_of) else None
    if spec is None or not callable(statistics):
        raise ConfigError(f"task {task.name} declares no feature_ranges; it has no federated scaling")
    total = np.zeros(spec.length)
    for data in sites.values():
        total += statistics(data)
    return derive_scaling(total, spec)


def pooled_site(sites: Mapping[str, SiteData]) -> SiteData:
    """Every site's splits concatenated: one big site (the centralized reference, which no federation may build)."""

    def cat(split: str) -> Dataset[tuple[torch.Tensor, torch.Tensor]]:
        xs, ys = zip(*(dataset_tensors(d.split(split)) for d in sites.values()), strict=True)
        return cast(Dataset[tuple[torch.Tensor, torch.Tensor]], TensorDataset(torch.cat(xs), torch.cat(ys)))

    return SiteData(train=cat("train"), val=cat("val"), test=cat("test"))


def scores_of(task: Task, model: torch.nn.Module, data: SiteData) -> ScoreHistogram:
    """The score histogram of ``model`` on a site's test split (the task must report scores)."""
    result = task.evaluate(model, data.test)
    if result.scores is None:
        raise ConfigError(f"task {task.name} reports no score histograms; it cannot be compared on {METRIC}")
    return result.scores


def _scaled(task: Task, sites: Mapping[str, SiteData], scaling: Scaling) -> dict[str, SiteData]:
    if scaling == "fallback":
        return dict(sites)
    shared = TaskSetup(scaling=federated_scaling(task, sites))
    return {site: prepare(task, data, shared)[1] for site, data in sites.items()}


def train_on(task: Task, data: SiteData, settings: TrainSettings, epochs: int) -> torch.nn.Module:
    model = task.build_model(settings.seed)
    task.train(model, data, replace(settings, local_epochs=epochs))
    return model


def compare(
    task: Task,
    sites: Mapping[str, SiteData],
    settings: TrainSettings,
    rounds: int,
    *,
    scaling: Scaling = "federated",
    federated_model: torch.nn.Module | None = None,
    metric: str = METRIC,
) -> Comparison:
    """Train alone, pooled and (unless ``federated_model`` is given) federated, and score them all (module doc).

    ``sites`` are the sites' data as loaded (fallback scaling); ``federated_model`` must have been trained on data
    scaled the same way as ``scaling`` says.
    """
    epochs = rounds * settings.local_epochs
    shared = _scaled(task, sites, scaling)
    alone = {}
    for site, data in sites.items():
        own = _scaled(task, {site: data}, scaling)[site]
        model = train_on(task, own, settings, epochs)
        alone[site] = imbalance_metrics(scores_of(task, model, own)).get(metric, 0.0)
    federated = federated_model if federated_model is not None else fedavg(task, shared, settings, rounds)
    pooled = train_on(task, pooled_site(shared), settings, epochs)

    def per_site(model: torch.nn.Module) -> tuple[dict[str, float], float]:
        histograms = {site: scores_of(task, model, data) for site, data in shared.items()}
        total = ScoreHistogram.empty()
        for h in histograms.values():
            total = total + h
        values = {site: imbalance_metrics(h).get(metric, 0.0) for site, h in histograms.items()}
        return values, imbalance_metrics(total).get(metric, 0.0)

    fed_sites, fed_all = per_site(federated)
    pooled_sites, pooled_all = per_site(pooled)
    return Comparison(metric, alone, fed_sites, pooled_sites, fed_all, pooled_all)
