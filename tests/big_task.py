"""A test-only task with a large model (> 8 million float32 parameters) and a trivial, exact "training" step.

Training adds 1/1024 (exactly representable) to every parameter, so the aggregated model is known without
floating-point doubt and any corruption in the chunked download or upload shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from common.tasks.base import EvalResult, SiteData, TrainResult, TrainSettings
from common.tasks.breast_cancer import TASK as BREAST_CANCER

STEP = 1.0 / 1024
WIDTH = 2900  # 2900 * 2900 + 2900 = 8,412,900 parameters, about 32 MiB of float32


class BigTask:
    name = "big"
    schema = BREAST_CANCER.schema

    def build_model(self, seed: int = 0) -> torch.nn.Module:
        gen = torch.Generator().manual_seed(seed)
        model = torch.nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            model.weight.copy_(torch.rand(WIDTH, WIDTH, generator=gen))
            model.bias.copy_(torch.rand(WIDTH, generator=gen))
        return model

    def load_data(self, data_dir: Path) -> SiteData:
        return BREAST_CANCER.load_data(data_dir)

    def train(self, model: torch.nn.Module, data: SiteData, settings: TrainSettings) -> TrainResult:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(STEP)
        return TrainResult(num_samples=len(data.train), loss=0.0, accuracy=0.0)  # type: ignore[arg-type]

    def evaluate(
        self,
        model: torch.nn.Module,
        dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int = 256,
    ) -> EvalResult:
        return EvalResult(num_samples=len(dataset), loss=0.0, accuracy=0.0)  # type: ignore[arg-type]


TASK = BigTask()
