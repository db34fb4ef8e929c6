"""Synthetic benchmark tasks: breast_cancer's data with one wide hidden layer, sized to 10^5 or 10^6 parameters.

For bench/simulation.py (the simulator's cost against the model's size). The data, schema and scaling are the
built-in ``breast_cancer`` task's; only the model is wider: 30 inputs -> ``hidden`` ReLU units -> 2 logits, i.e.
``33 * hidden + 2`` parameters, trained with plain SGD. Reference a task as ``bench.wide_mlp_task:MLP_1E5`` (the
repository root on ``PYTHONPATH``, as for Ray's workers).
"""

from __future__ import annotations

import torch

from common.tasks.base import TrainSettings
from common.tasks.breast_cancer import SCHEMA, BreastCancerTask

INPUTS, CLASSES = len(SCHEMA.features), SCHEMA.num_classes


def hidden_for(params: int) -> int:
    """The hidden width whose model has about ``params`` parameters."""
    return max(1, round((params - CLASSES) / (INPUTS + 1 + CLASSES)))


class WideMlpTask(BreastCancerTask):
    """breast_cancer with a ``hidden``-unit hidden layer."""

    def __init__(self, params: int) -> None:
        self.hidden = hidden_for(params)
        self.name = f"breast_cancer_mlp_{params:.0e}".replace("+0", "").replace("+", "")
        self.default_settings = TrainSettings(local_epochs=1, batch_size=16, learning_rate=0.05, seed=0)

    def make_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(INPUTS, self.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(self.hidden, CLASSES),
        )


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MLP_1E5 = WideMlpTask(100_000)
MLP_1E6 = WideMlpTask(1_000_000)
