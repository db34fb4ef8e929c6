"""What a site does with a task, off the event loop: train from the global model, compute the update, evaluate,
and the feature statistics of the statistics phase.

Runs in a worker thread. The data stays in this process: only the update (local - global), sample counts, aggregate
metrics and (masked, under secure aggregation) the train split's feature statistics leave it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from common.errors import DataError, InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.lanes import LaneLayout
from common.serde import EncodedTensors, encode, state_dict_float32
from common.tasks.base import EvalResult, RecordDP, SiteData, Task, TrainResult, TrainSettings
from common.tasks.setup import TaskSetup, prepare
from common.tasks.standardize import MAX_STATISTICS_ROWS, statistics_lane_values, statistics_lanes
from common.tasks.tabular import TabularTask

log = logging.getLogger("cohort.participant.site")


@dataclass(frozen=True)
class LocalUpdate:
    update: EncodedTensors
    result: TrainResult
    seconds: float


class Site:
    def __init__(self, task: Task, data: SiteData) -> None:
        self.task = task
        self.data = data
        # keep_optimizer_state: the local optimizer's state from this site's previous round (of the current job).
        self.optimizer_state: dict[str, Any] = {}
        # The task configured with the job's parameters and the data scaled for it: the last setup seen.
        self._prepared: tuple[TaskSetup, Task, SiteData] = (TaskSetup(), task, data)

    @property
    def num_train_samples(self) -> int:
        return len(self.data.train)  # type: ignore[arg-type]

    def prepared(self, setup: TaskSetup) -> tuple[Task, SiteData]:
        """The task and data for a job's parameters and feature scaling (common/tasks/setup.py), cached."""
        if self._prepared[0] != setup:
            self._prepared = (setup, *prepare(self.task, self.data, setup))
        return self._prepared[1], self._prepared[2]

    def _model(self, task: Task, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = task.build_model(seed=0)
        model.load_state_dict(tensors, strict=True)
        return model

    def train(
        self,
        global_tensors: dict[str, torch.Tensor],
        params: pb.TrainParams,
        clip_norm: float = 0.0,
        record_dp: RecordDP | None = None,
        setup: TaskSetup | None = None,
    ) -> LocalUpdate:
        """Train from the global model and return the update (local - global).

        ``clip_norm`` > 0 (site-level DP): the whole update is scaled down to L2 norm at most ``clip_norm`` before it
        leaves, so one site's influence on the sum is bounded whatever its data.
        """
        started = time.perf_counter()
        task, data = self.prepared(setup or TaskSetup())
        model = self._model(task, global_tensors)
        settings = TrainSettings(
            local_epochs=params.local_epochs,
            batch_size=params.batch_size,
            learning_rate=params.learning_rate,
            seed=params.seed,
            record_dp=record_dp,
            optimizer=params.optimizer or "task",
            momentum=params.momentum,
            weight_decay=params.weight_decay,
            proximal_mu=params.proximal_mu,
            optimizer_state=self.optimizer_state if params.keep_optimizer_state else None,
        )
        if not isinstance(task, TabularTask) and (settings.optimizer != "task" or settings.proximal_mu > 0):
            log.warning(
                "task %s has its own train(): the job's optimizer/proximal_mu settings apply only if it reads them "
                "from TrainSettings (docs/TASKS.md)",
                task.name,
            )
        result = task.train(model, data, settings)
        local = state_dict_float32(model)
        delta = {name: local[name] - global_tensors[name] for name in global_tensors}
        if clip_norm > 0:
            norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in delta.values()))
            factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
            # Scale in float64, then round down in magnitude by a hair so float32 rounding cannot push the norm
            # above the bound the coordinator checks.
            delta = {k: (t.double() * factor * (1 - 1e-6)).float() for k, t in delta.items()}
            # Adaptive clipping: the coordinator learns one bit (was the norm within the bound?), never the norm.
            result = replace(result, extra={**result.extra, "clip_bit": 1.0 if norm <= clip_norm else -1.0})
        return LocalUpdate(encode(delta), result, time.perf_counter() - started)

    def evaluate(
        self, global_tensors: dict[str, torch.Tensor], split: str, setup: TaskSetup | None = None
    ) -> tuple[EvalResult, float]:
        started = time.perf_counter()
        task, data = self.prepared(setup or TaskSetup())
        result = task.evaluate(self._model(task, global_tensors), data.split(split))
        return result, time.perf_counter() - started

    def statistics(self, setup: TaskSetup, layout: LaneLayout | None) -> dict[str, float]:
        """This site's feature statistics (its raw train split only) as the lanes of the statistics phase's secure
        sum (common/tasks/standardize.py). Refused when the task declares no feature ranges or the coordinator's lane
        layout is not the one this site's task gives."""
        task, _ = self.prepared(TaskSetup(setup.params_json))
        spec_of = getattr(task, "statistics_spec", None)
        spec = spec_of() if callable(spec_of) else None
        if spec is None:
            raise DataError(f"task {task.name!r} declares no feature_ranges; it cannot take part in a statistics phase")
        if layout is None or layout.lanes != statistics_lanes(spec, MAX_STATISTICS_ROWS):
            raise InvalidArgument(
                "the coordinator's statistics lanes do not match this site's task (its feature ranges or histogram "
                "bins differ)"
            )
        vector = task.site_statistics(self.data)  # type: ignore[attr-defined]
        return statistics_lane_values(vector, spec, MAX_STATISTICS_ROWS)
