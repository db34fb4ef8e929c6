"""Built-in task ``fraud``: card-fraud detection for banks, on the transactions of :mod:`common.fraud_data`.

Schema: the 21 transaction columns of :data:`common.fraud_data.FEATURES` (amount, amount over the customer's usual,
hour on the clock face, merchant category one-hot, velocities, new device / new merchant / card present / foreign
flags, distance from home, account age, customer age), then the label ``fraud`` (1: fraudulent).

Fraud is 0.2-1.5 % of a bank's transactions, so accuracy means nothing (always "legitimate" scores 99 %). The task
therefore

* trains with a class-weighted cross-entropy (the fraud class counts ``positive_weight`` times) or a focal loss
  (Lin et al. 2017; ``loss: focal``), chosen by the job's ``task_params``;
* reports per-class score histograms (``report_scores``), from which the coordinator derives AUC-PR and recall at 1 %
  false-positive rate over the whole federation (common/metrics.py).

Scaling: federated (the statistics phase; :data:`RANGES` are the declared plausible ranges, and the federation's
quantile bounds clip outliers such as a 20,000-unit purchase). Fallback without a statistics phase: the fixed
reference constants in :data:`REFERENCE` (the generator's documented design values, not statistics of any data),
after clipping to the declared ranges.

Parameters (``job.task_params``): ``hidden`` (units per hidden layer), ``loss`` (``weighted``, ``focal`` or
``plain``), ``positive_weight``, ``focal_gamma``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.fraud_data import FEATURES, LABEL
from common.tasks.base import DataSchema, TrainSettings
from common.tasks.csv_split import FloatArray
from common.tasks.params import Param
from common.tasks.standardize import FeatureScaling
from common.tasks.tabular import TabularTask

SCHEMA = DataSchema(features=FEATURES, label=LABEL, num_classes=2)

_FLAG = (0.0, 1.0)
RANGES: dict[str, tuple[float, float]] = {
    "amount": (0.0, 20_000.0),
    "amount_vs_usual": (0.0, 100.0),
    "hour_sin": (-1.0, 1.0),
    "hour_cos": (-1.0, 1.0),
    **{f: _FLAG for f in FEATURES if f.startswith("mcc_")},
    "velocity_1h": (0.0, 50.0),
    "velocity_24h": (0.0, 200.0),
    "new_device": _FLAG,
    "new_merchant": _FLAG,
    "card_present": _FLAG,
    "foreign": _FLAG,
    "distance_km": (0.0, 20_000.0),
    "account_age_days": (0.0, 30_000.0),
    "customer_age": (0.0, 120.0),
}

# (centre, scale) per feature for the fallback scaling: design values of the generator (common/fraud_data.py).
REFERENCE: dict[str, tuple[float, float]] = {
    "amount": (100.0, 300.0),
    "amount_vs_usual": (1.2, 1.5),
    "hour_sin": (0.0, 0.7),
    "hour_cos": (0.0, 0.7),
    **{f: (0.125, 0.33) for f in FEATURES if f.startswith("mcc_")},
    "velocity_1h": (0.4, 0.8),
    "velocity_24h": (3.0, 2.0),
    "new_device": (0.03, 0.17),
    "new_merchant": (0.25, 0.43),
    "card_present": (0.6, 0.49),
    "foreign": (0.08, 0.27),
    "distance_km": (150.0, 500.0),
    "account_age_days": (2500.0, 2500.0),
    "customer_age": (45.0, 16.0),
}

DEFAULT_SETTINGS = TrainSettings(local_epochs=1, batch_size=128, learning_rate=0.003, seed=0)
RECOMMENDED_ROUNDS = 15


class FraudTask(TabularTask):
    """21 transaction features -> two hidden ReLU layers -> 2 logits (legitimate, fraud), Adam."""

    name = "fraud"
    version = "1"
    schema = SCHEMA
    default_settings = DEFAULT_SETTINGS
    recommended_rounds = RECOMMENDED_ROUNDS
    feature_ranges = tuple(RANGES[f] for f in FEATURES)
    histogram_bins = 256
    report_scores = True
    params_schema = {
        "hidden": Param("int", 32, "units per hidden layer", low=4, high=1024),
        "loss": Param("str", "weighted", "training loss", choices=("weighted", "focal", "plain")),
        "positive_weight": Param("float", 10.0, "weight of the fraud class in the loss", low=1.0, high=1000.0),
        "focal_gamma": Param("float", 2.0, "focusing exponent of the focal loss", low=0.0, high=10.0),
    }

    def make_model(self) -> torch.nn.Module:
        hidden = int(self.params["hidden"])
        return torch.nn.Sequential(
            torch.nn.Linear(len(FEATURES), hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 2),
        )

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kind = self.params["loss"]
        ce = F.cross_entropy(logits, target, reduction="none")
        if kind == "plain":
            return ce.mean()
        weight = torch.where(target == 1, float(self.params["positive_weight"]), 1.0)
        if kind == "focal":
            # (1 - p_t)^gamma down-weights the many easy legitimate records; the class weight still applies.
            ce = (1 - torch.exp(-ce)) ** float(self.params["focal_gamma"]) * ce
        # A mean over the batch (not over the weights): what DP-SGD's per-record gradients assume.
        return (weight * ce).mean()

    def fallback_scaling(self, x_train: FloatArray) -> FeatureScaling:
        centre = np.array([REFERENCE[f][0] for f in FEATURES])
        scale = np.array([REFERENCE[f][1] for f in FEATURES])
        return FeatureScaling(
            tuple(centre.tolist()),
            tuple(scale.tolist()),
            tuple(RANGES[f][0] for f in FEATURES),
            tuple(RANGES[f][1] for f in FEATURES),
        )


TASK = FraudTask()
