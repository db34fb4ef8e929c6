"""What runs inside Ray's workers: a virtual site loads its data, trains and evaluates with a real site's code.

Each function is a Ray task. A site's data is loaded once (:func:`load_site`, whose result stays in Ray's object store
and is handed to every later task of that site by reference); a global model is put into the object store once per
version and shared by every task that trains or evaluates it. Training and evaluation are
:class:`participant.site.Site`'s, the task's own ``load_data``/``train``/``evaluate``: what a participant daemon runs.
"""

from __future__ import annotations

import functools
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg.lanes import LaneLayout
from common.tasks.base import EvalResult, RecordDP, SiteData, Task, load_task
from common.tasks.setup import TaskSetup
from participant.site import LocalUpdate, Site

ray: Any
try:
    ray = importlib.import_module("ray")
except ImportError:  # the base install has no Ray: ray_or_error says how to get it
    ray = None

NumpyModel = dict[str, np.ndarray]


def ray_or_error() -> Any:
    """The ray module, or a clear error naming the extra that installs it."""
    from common.errors import ConfigError

    if ray is None:
        raise ConfigError("cohort simulate needs Ray: pip install 'cohort[sim]' (ray is pinned in constraints.txt)")
    return ray


@functools.cache
def _task(ref: str) -> Task:
    return load_task(ref)


def _tensors(model: NumpyModel) -> dict[str, torch.Tensor]:
    # The object store hands numpy arrays out read-only and shared; the site trains on its own copy.
    return {name: torch.from_numpy(np.array(a, copy=True)) for name, a in model.items()}


def _node() -> str:
    return str(ray.get_runtime_context().get_node_id()) if ray is not None and ray.is_initialized() else ""


@dataclass(frozen=True)
class TrainOutcome:
    update: LocalUpdate
    node: str
    seconds: float  # the site's own time: what the virtual clock advances by


@dataclass(frozen=True)
class EvalOutcome:
    result: EvalResult
    seconds: float
    node: str


@dataclass(frozen=True)
class StatsOutcome:
    lanes: dict[str, float]
    seconds: float
    node: str


def load_site(task_ref: str, folder: str, threads: int) -> SiteData:
    """Read the site's folder with the task's own loader (as a participant daemon does at start-up)."""
    torch.set_num_threads(threads)
    return _task(task_ref).load_data(Path(folder))


def train_site(
    task_ref: str,
    data: SiteData,
    model: NumpyModel,
    params: pb.TrainParams,
    clip: float,
    record_dp: RecordDP | None,
    setup: TaskSetup,
    threads: int,
) -> TrainOutcome:
    """``setup``: the job's task parameters and feature scaling, as the train task carries them to a daemon."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    local = Site(_task(task_ref), data).train(_tensors(model), params, clip, record_dp, setup)
    return TrainOutcome(local, _node(), time.perf_counter() - started)


def evaluate_site(
    task_ref: str, data: SiteData, model: NumpyModel, split: str, setup: TaskSetup, threads: int
) -> EvalOutcome:
    torch.set_num_threads(threads)
    result, seconds = Site(_task(task_ref), data).evaluate(_tensors(model), split, setup)
    return EvalOutcome(result, seconds, _node())


def statistics_site(task_ref: str, data: SiteData, setup: TaskSetup, layout: LaneLayout | None) -> StatsOutcome:
    """The statistics phase (job.standardize): the site's feature statistics as the lanes of the secure sum."""
    started = time.perf_counter()
    lanes = Site(_task(task_ref), data).statistics(setup, layout)
    return StatsOutcome(lanes, time.perf_counter() - started, _node())


@dataclass(frozen=True)
class RemoteFunctions:
    """The Ray tasks of a virtual site, with the per-site resources (``ray.remote`` options)."""

    load: Any
    train: Any
    evaluate: Any
    statistics: Any


def remote_functions(num_cpus: float, num_gpus: float) -> RemoteFunctions:
    r = ray_or_error()
    opts = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": 0}
    return RemoteFunctions(
        r.remote(load_site).options(**opts),
        r.remote(train_site).options(**opts),
        r.remote(evaluate_site).options(**opts),
        r.remote(statistics_site).options(**opts),
    )
