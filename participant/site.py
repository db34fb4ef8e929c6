"""What a site does with a task, off the event loop: train from the global model, compute the update, evaluate.

Runs in a worker thread. The data stays in this process: only the update (local - global), sample counts and
aggregate metrics leave it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

import torch

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import EncodedTensors, UpdateBuffer, specs_of
from common.tasks.base import EvalResult, RecordDP, SiteData, Task, TrainResult, TrainSettings
from common.tasks.setup import TaskSetup, prepare


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
