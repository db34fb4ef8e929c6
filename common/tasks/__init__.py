"""Task plug-ins: the interface (``common.tasks.base``) and the built-in tasks ``breast_cancer``, ``digits``."""

from common.tasks.base import (
    BUILTIN_TASKS,
    SPLITS,
    DataSchema,
    EvalResult,
    SiteData,
    Task,
    TrainResult,
    TrainSettings,
    load_task,
    task_digest,
)

__all__ = [
    "BUILTIN_TASKS",
    "SPLITS",
    "DataSchema",
    "EvalResult",
    "SiteData",
    "Task",
    "TrainResult",
    "TrainSettings",
    "load_task",
    "task_digest",
]
