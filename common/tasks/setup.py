"""What a job tells a site's task beyond the model: its parameters and the federation's feature scaling.

Both arrive with every train and evaluate task (``task_params_json``, ``feature_scaling``), so a site that joins
late, or restarts, builds the same model and scales its data the same way as every other site. :func:`prepare`
turns the task and the data the site loaded at start-up into the configured task and the scaled data for one job.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError, DataError, InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.tasks.base import SiteData, Task, configure
from common.tasks.params import ParamValue, canonical_json, parse_json
from common.tasks.standardize import FeatureScaling


@dataclass(frozen=True)
class TaskSetup:
    """A job's task parameters (canonical JSON) and feature scaling (None: the task's fallback)."""

    params_json: str = ""
    scaling: FeatureScaling | None = None

    @classmethod
    def of(cls, message: pb.TrainTask | pb.EvaluateTask) -> TaskSetup:
        """From a train or evaluate task; a malformed one raises InvalidArgument."""
        try:
            params = parse_json(message.task_params_json)
            scaling = FeatureScaling.from_proto(message.feature_scaling)
        except ConfigError as exc:
            raise InvalidArgument(f"the task's parameters: {exc}") from None
        return cls(canonical_json(params) if params else "", scaling)

    @property
    def params(self) -> dict[str, ParamValue]:
        return parse_json(self.params_json)


def prepare(task: Task, data: SiteData, setup: TaskSetup) -> tuple[Task, SiteData]:
    """The task configured with the job's parameters and the data scaled with the federation's scaling.

    Raises ConfigError when the parameters do not fit the task's schema, DataError when the scaling does not fit
    the task (or the task cannot apply one).
    """
    configured = configure(task, setup.params)
    if setup.scaling is None:
        return configured, data
    with_scaling = getattr(configured, "with_scaling", None)
    if not callable(with_scaling):
        raise DataError(f"task {task.name!r} cannot apply a federated feature scaling (it has no with_scaling)")
    scaled = with_scaling(data, setup.scaling)
    if not isinstance(scaled, SiteData):
        raise DataError(f"task {task.name!r}'s with_scaling did not return site data")
    return configured, scaled
