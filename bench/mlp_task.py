"""A synthetic bench task: an MLP of about ``d`` float32 parameters and one SGD step of local work per round.

``bench/federation.py`` loads it by dotted path (``bench.mlp_task:TASK``) in the coordinator and every participant.
The size ``d`` is a parameter of the task, not a task per size: until jobs can carry task parameters, every process
reads it from the environment variable ``COHORT_BENCH_PARAMS`` (``1e6``, ``10000000``; default 1e5), and the bench
sets the same value for the coordinator and all sites (a site with another ``d`` would be refused at upload: its
tensor shapes would not match the global model's).

The model is ``Linear(32, h) -> ReLU -> Linear(h, 2)`` with ``h`` chosen so the parameter count is as close to ``d``
as the layer shapes allow (:func:`hidden_width`; the bench reports the exact count). The data is synthetic, made in
code from the site's folder name (no files are read; the folder need not exist): 64 training, 32 validation and 32
test records of a linearly separable two-class problem. Local work is one SGD step on one batch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from common.tasks.base import DataSchema, EvalResult, SiteData, TrainResult, TrainSettings

PARAMS_ENV = "COHORT_BENCH_PARAMS"
DEFAULT_PARAMS = 100_000
FEATURES = 32
CLASSES = 2
RECORDS = {"train": 64, "val": 32, "test": 32}


def params_from_env() -> int:
    raw = os.environ.get(PARAMS_ENV, "")
    if not raw:
        return DEFAULT_PARAMS
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{PARAMS_ENV}={raw!r} is not a number of parameters") from None
    if not 1_000 <= value <= 500_000_000:
        raise ValueError(f"{PARAMS_ENV}={raw!r}: choose between 1e3 and 5e8 parameters")
    return value


def hidden_width(d: int) -> int:
    """The hidden width whose parameter count (``FEATURES*h + h + h*CLASSES + CLASSES``) is closest to ``d``."""
    return max(1, round((d - CLASSES) / (FEATURES + 1 + CLASSES)))


def param_count(d: int) -> int:
    h = hidden_width(d)
    return FEATURES * h + h + h * CLASSES + CLASSES


class MlpTask:
    name = "bench_mlp"
    schema = DataSchema(features=tuple(f"x{i}" for i in range(FEATURES)), label="y", num_classes=CLASSES)

    def build_model(self, seed: int = 0) -> torch.nn.Module:
        h = hidden_width(params_from_env())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.nn.Sequential(torch.nn.Linear(FEATURES, h), torch.nn.ReLU(), torch.nn.Linear(h, CLASSES))

    def load_data(self, data_dir: Path) -> SiteData:
        seed = int.from_bytes(hashlib.sha256(Path(data_dir).name.encode()).digest()[:8], "little")
        gen = torch.Generator().manual_seed(seed)
        direction = torch.randn(FEATURES, generator=torch.Generator().manual_seed(0))  # one problem for all sites
        splits: dict[str, Dataset[tuple[torch.Tensor, torch.Tensor]]] = {}
        for split, n in RECORDS.items():
            x = torch.randn(n, FEATURES, generator=gen)
            y = (x @ direction > 0).long()
            splits[split] = TensorDataset(x, y)  # type: ignore[assignment]
        return SiteData(train=splits["train"], val=splits["val"], test=splits["test"])

    def train(self, model: torch.nn.Module, data: SiteData, settings: TrainSettings) -> TrainResult:
        train = data.train
        assert isinstance(train, TensorDataset)
        x, y = train.tensors
        gen = torch.Generator().manual_seed(settings.seed)
        batch = torch.randperm(len(x), generator=gen)[: settings.batch_size]
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x[batch])
        loss = torch.nn.functional.cross_entropy(logits, y[batch])
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        accuracy = float((logits.argmax(dim=1) == y[batch]).float().mean())
        return TrainResult(num_samples=len(x), loss=float(loss.detach()), accuracy=accuracy)

    def evaluate(
        self,
        model: torch.nn.Module,
        dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int = 256,
    ) -> EvalResult:
        assert isinstance(dataset, TensorDataset)
        x, y = dataset.tensors
        model.eval()
        with torch.no_grad():
            logits = model(x)
            loss = float(torch.nn.functional.cross_entropy(logits, y))
            accuracy = float((logits.argmax(dim=1) == y).float().mean())
        return EvalResult(num_samples=len(x), loss=loss, accuracy=accuracy)


TASK = MlpTask()
