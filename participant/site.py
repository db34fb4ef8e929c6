"""What a site does with a task, off the event loop: train from the global model, compute the update, evaluate,
and the feature statistics of the statistics phase.

Runs in a worker thread. The data stays in this process: only the update (local - global), sample counts, aggregate
metrics and (masked, under secure aggregation) the train split's feature statistics leave it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from common.errors import DataError, InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.lanes import LaneLayout
from common.serde import EncodedTensors, UpdateBuffer, specs_of
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
    """One site's task and data, and the model object and update buffer it reuses from round to round.

    Every round loads the global weights into the same model (``load_state_dict`` copies into its parameters)
    instead of building a freshly initialised model only to overwrite it, and writes ``local - global`` straight
    into the same update buffer, from which the upload streams. A task's model must therefore be fully described by
    its state dict (what FedAvg averages anyway). The model is rebuilt when the job's task setup changes. Calls are
    serialized: the daemon runs one task at a time.
    """

    def __init__(self, task: Task, data: SiteData) -> None:
        self.task = task
        self.data = data
        # keep_optimizer_state: the local optimizer's state from this site's previous round (of the current job).
        self.optimizer_state: dict[str, Any] = {}
        # The task configured with the job's parameters and the data scaled for it: the last setup seen.
        self._prepared: tuple[TaskSetup, Task, SiteData] = (TaskSetup(), task, data)
        self._net: tuple[Task, torch.nn.Module] | None = None  # the model, for the prepared task it was built by
        self._update: UpdateBuffer | None = None
        self._lock = threading.Lock()

    @property
    def num_train_samples(self) -> int:
        return len(self.data.train)  # type: ignore[arg-type]

    def prepared(self, setup: TaskSetup) -> tuple[Task, SiteData]:
        """The task and data for a job's parameters and feature scaling (common/tasks/setup.py), cached."""
        if self._prepared[0] != setup:
            self._prepared = (setup, *prepare(self.task, self.data, setup))
        return self._prepared[1], self._prepared[2]

    def _model(self, task: Task, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        if self._net is None or self._net[0] is not task:
            self._net = None  # free the old model before building one for the new setup
            self._net = (task, task.build_model(seed=0))
        model = self._net[1]
        model.load_state_dict(tensors, strict=True)
        model.zero_grad(set_to_none=True)  # as a fresh model: no gradient left from the last round
        return model

    def _update_buffer(self, global_tensors: dict[str, torch.Tensor]) -> UpdateBuffer:
        if self._update is None or not self._update.fits(global_tensors):
            self._update = None  # free the old buffer before allocating one of the new shape
            self._update = UpdateBuffer(specs_of({k: v.float() for k, v in global_tensors.items()}))
        return self._update

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

        The update's buffer is reused by the next call: upload it before training again.
        """
        with self._lock:
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
                    "task %s has its own train(): the job's optimizer/proximal_mu settings apply only if it reads "
                    "them from TrainSettings (docs/TASKS.md)",
                    task.name,
                )
            result = task.train(model, data, settings)
            update = self._update_buffer(global_tensors)
            update.write_delta(model.state_dict(), global_tensors)
            if clip_norm > 0:
                norm = update.l2_norm()
                factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
                # Scale in float64, then round down in magnitude by a hair so float32 rounding cannot push the norm
                # above the bound the coordinator checks.
                update.scale(factor, 1 - 1e-6)
                # Adaptive clipping: the coordinator learns one bit (was the norm within the bound?), never the norm.
                result = replace(result, extra={**result.extra, "clip_bit": 1.0 if norm <= clip_norm else -1.0})
            return LocalUpdate(update.encoded(), result, time.perf_counter() - started)

    def evaluate(
        self, global_tensors: dict[str, torch.Tensor], split: str, setup: TaskSetup | None = None
    ) -> tuple[EvalResult, float]:
        with self._lock:
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
