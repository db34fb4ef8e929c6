"""The task plug-in interface: what a site installs to take part in a job.

A task bundles a model factory, a data loader with a declared schema, and local train/evaluate loops. The
coordinator uses only ``build_model`` (to create the initial global model) and the task's identity (name, code
digest, schema fingerprint); participants use all of it, on data that never leaves the site.

Tasks are loaded by dotted path (``package.module:ATTR``) from code installed at the site; nothing is ever received
over the network and executed. docs/TASKS.md is the guide to writing one.

Optional attributes a task may have (the base class :class:`common.tasks.tabular.TabularTask` has them all):

* ``version`` (str): the task's declared version; part of its code digest and named in a mismatch at Join;
* ``params_schema`` (mapping of name to :class:`common.tasks.params.Param`) and ``with_params(values) -> Task``:
  parameters a job may set (``job.task_params``); see :func:`configure`;
* ``statistics_spec()``, ``site_statistics(data)`` and ``with_scaling(data, scaling)``: federated feature
  standardization (common/tasks/standardize.py).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import Dataset

from common.errors import ConfigError
from common.metrics import ScoreHistogram
from common.tasks.digest import compute as compute_digest
from common.tasks.params import validate

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DataSchema:
    """Columns a site's CSV files must have, in order; the label column comes last."""

    features: tuple[str, ...]
    label: str
    num_classes: int
    feature_dtype: str = "float32"

    def columns(self) -> tuple[str, ...]:
        return (*self.features, self.label)

    def fingerprint(self) -> str:
        """A stable digest of the schema, compared between a site and the job at join time."""
        canonical = json.dumps(
            {
                "features": list(self.features),
                "label": self.label,
                "num_classes": self.num_classes,
                "feature_dtype": self.feature_dtype,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class RecordDP:
    """Record-level differential privacy for one round of local training (DP-SGD).

    Each step samples records by Poisson sampling, clips every record's gradient to L2 norm ``max_grad_norm`` and
    adds Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` to their sum. ``delta`` is the
    delta the site's epsilon is stated for; the task does not use it (the site's accountant does).
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float


@dataclass(frozen=True)
class TrainSettings:
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.01
    seed: int = 0
    # None: ordinary training. Set: DP-SGD, and training is no longer reproducible from ``seed`` (its noise and
    # sampling come from OS entropy; see common.tasks.tabular).
    record_dp: RecordDP | None = None


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    loss: float
    accuracy: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    num_samples: int
    loss: float
    accuracy: float
    # Binary tasks that opt in: records per score bin and class, summed over sites for AUC-PR (common/metrics.py).
    scores: ScoreHistogram | None = None


@dataclass
class SiteData:
    """One site's private splits, loaded from its own folder only."""

    train: Dataset[tuple[torch.Tensor, torch.Tensor]]
    val: Dataset[tuple[torch.Tensor, torch.Tensor]]
    test: Dataset[tuple[torch.Tensor, torch.Tensor]]

    def split(self, name: str) -> Dataset[tuple[torch.Tensor, torch.Tensor]]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        ds: Dataset[tuple[torch.Tensor, torch.Tensor]] = getattr(self, name)
        return ds


@runtime_checkable
class Task(Protocol):
    """A federated learning task. Implementations must be deterministic given the seed in TrainSettings, except
    under ``TrainSettings.record_dp``, whose noise must come from OS entropy."""

    name: str
    schema: DataSchema

    def build_model(self, seed: int = 0) -> torch.nn.Module:
        """A fresh model. Every state-dict entry must be a floating-point tensor (no integer buffers)."""
        ...

    def load_data(self, data_dir: Path) -> SiteData:
        """Read train.csv, val.csv and test.csv from ``data_dir``; raise ``DataError`` naming the file and column
        when the header does not match the schema."""
        ...

    def train(self, model: torch.nn.Module, data: SiteData, settings: TrainSettings) -> TrainResult:
        """Train ``model`` in place on ``data.train``."""
        ...

    def evaluate(
        self,
        model: torch.nn.Module,
        dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int = 256,
    ) -> EvalResult:
        """Mean loss and accuracy of ``model`` on ``dataset`` (no gradient)."""
        ...


def round_seed(job_seed: int, number: int) -> int:
    """The training seed every site gets in round ``number`` (from 1): reproducible runs, and simulations that
    predict what the real federation does."""
    return (job_seed * 1_000_003 + number) % (1 << 63)


def task_digest(task: Task) -> str:
    """The "task code digest" a site declares: normalized source of the task's own modules, its declared version
    and the Cohort training code it uses (:mod:`common.tasks.digest`). Comments and formatting do not count."""
    return compute_digest(task).combined


def configure(task: Task, params: Mapping[str, object] | None, where: str = "task_params") -> Task:
    """``task`` with the job's parameters, checked against the task's own ``params_schema``.

    A task that declares no schema takes no parameters: any given is an error naming the key. The task object that
    was loaded stays as it was (its code digest does not depend on parameters).
    """
    schema = getattr(task, "params_schema", None) or {}
    values = validate(schema, params or {}, where)
    if not schema:
        return task
    with_params = getattr(task, "with_params", None)
    if not callable(with_params):
        raise ConfigError(f"{where}: task {task.name!r} declares params_schema but has no with_params method")
    configured = with_params(values)
    if not isinstance(configured, Task):
        raise ConfigError(f"{where}: task {task.name!r}'s with_params did not return a task")
    return configured


BUILTIN_TASKS = {
    "breast_cancer": "common.tasks.breast_cancer:TASK",
    "digits": "common.tasks.digits:TASK",
    "fraud": "common.tasks.fraud:TASK",
}


def load_task(ref: str) -> Task:
    """Load a task by built-in name (``breast_cancer``) or dotted path (``my_site.tasks:TASK``).

    Only code already installed at this site is imported.
    """
    target = BUILTIN_TASKS.get(ref, ref)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"task {ref!r} is neither a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) "
            "nor a dotted path of the form 'package.module:ATTR'"
        )
    if module_name.startswith("."):
        raise ValueError(f"task module {module_name!r}: give an absolute module path (package.module:ATTR)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task module {module_name!r} is not installed here: {exc}") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"task module {module_name!r} has no attribute {attr!r}")
    if not isinstance(obj, Task):
        raise ValueError(f"{target!r} does not implement the Task interface (common.tasks.base.Task)")
    return obj
