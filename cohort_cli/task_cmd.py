"""``cohort task check MODULE:ATTR --data DIR``: try a task on one site's data before any federation runs.

It does, in order, what a participant and a coordinator will do with the task, and stops at the first problem with
its message: load the task from code installed here (``--param``/``--params`` as a job's ``task_params`` would
give them), compute the code digest a site will declare at Join, load the site folder with the task's loader
(schema against the CSV headers), build the model (float32 state, parameter count), train one step, evaluate, and,
where the task supports them, compute its federated statistics and apply a scaling derived from them, and take
one DP-SGD step. It prints counts and digests only, never records.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from torch.utils.data import Subset

from common.errors import ConfigError, TaskError
from common.metrics import RECALL_KEY, imbalance_metrics
from common.tasks.base import RecordDP, SiteData, Task, TrainSettings, configure, load_task
from common.tasks.digest import compute
from common.tasks.params import describe, parse_json
from common.tasks.setup import TaskSetup, prepare
from common.tasks.standardize import derive_scaling
from common.tasks.tabular import TabularTask


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    task = subparsers.add_parser("task", help="check a task before a federation runs it")
    commands = task.add_subparsers(dest="task_command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="load a task, check it against a site folder, build, train one step, evaluate, print its digest",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    check.add_argument("task", help="built-in task name or package.module:ATTR (installed here)")
    check.add_argument("--data", type=Path, required=True, help="one site folder: train.csv, val.csv, test.csv")
    check.add_argument("--params", default="", help="task parameters as a JSON object, e.g. '{\"hidden\": 64}'")
    check.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one task parameter (repeatable; VALUE read as JSON, else as a string)",
    )
    check.add_argument("--no-dp", action="store_true", help="skip the DP-SGD step (it imports Opacus: ~2 s)")
    check.set_defaults(func=run_check)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = dict(parse_json(args.params, "--params"))
    for item in args.param:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        try:
            values[name] = json.loads(raw)
        except ValueError:
            values[name] = raw
    return values


def _one_batch(data: SiteData, size: int) -> SiteData:
    n = len(data.train)  # type: ignore[arg-type]
    return SiteData(train=Subset(data.train, range(min(n, size))), val=data.val, test=data.test)


def _metrics_text(result: Any) -> str:
    text = f"loss {result.loss:.4f}, accuracy {result.accuracy:.4f}"
    if result.scores is not None:
        m = imbalance_metrics(result.scores)
        if "auc_pr" in m:
            text += f", AUC-PR {m['auc_pr']:.4f}, recall@1%FPR {m[RECALL_KEY]:.4f}"
    return text


def run_check(args: argparse.Namespace) -> int:
    try:
        base = load_task(args.task)
    except ValueError as exc:
        raise ConfigError(f"task: {exc}") from None
    params = _params(args)
    task = configure(base, params, "task_params")
    schema = getattr(base, "params_schema", None) or {}
    print(f"task {base.name!r} from {args.task}: loaded")
    for line in describe(schema):
        print(f"  parameter {line}")
    if params:
        print(f"  with task_params {json.dumps(params, sort_keys=True)}")
    code = compute(base)
    print(f"  version {code.version!r}; its code: {', '.join(code.task_modules)}")
    print(f"  Cohort training code it uses: {', '.join(code.training_modules) or 'none'}")
    data = task.load_data(args.data)
    sizes = {s: len(data.split(s)) for s in ("train", "val", "test")}  # type: ignore[arg-type]
    print(
        f"data {args.data}: schema matches ({len(base.schema.features)} features, label {base.schema.label!r}); "
        + ", ".join(f"{s} {n} records" for s, n in sizes.items())
    )
    data = _check_statistics(task, data)
    model = task.build_model(seed=0)
    numel = sum(t.numel() for t in model.state_dict().values())
    print(f"model: {type(model).__name__}, {numel} parameters (float32 state: ok)")
    settings = getattr(task, "default_settings", TrainSettings())
    result = task.train(model, _one_batch(data, settings.batch_size), _one_step(settings))
    if not math.isfinite(result.loss):
        raise TaskError(f"one training step gave a non-finite loss ({result.loss})")
    print(f"train: one step on {min(sizes['train'], settings.batch_size)} records, loss {result.loss:.4f}")
    split = "val" if sizes["val"] else "test"
    evaluation = task.evaluate(model, data.split(split))
    print(f"evaluate ({split}, {evaluation.num_samples} records): {_metrics_text(evaluation)}")
    if not args.no_dp:
        _check_dp(task, data, settings)
    print(f"digest a coordinator will expect: {code.combined}")
    print(f"  task code {code.task_code} (version {code.version!r}); training code {code.training_code}")
    print(f"schema fingerprint: {base.schema.fingerprint()}")
    return 0


def _one_step(settings: TrainSettings) -> TrainSettings:
    return TrainSettings(1, settings.batch_size, settings.learning_rate, settings.seed)


def _check_statistics(task: Task, data: SiteData) -> SiteData:
    """Federated standardization, where the task declares ranges: this site's statistics, and a scaling from them."""
    spec_of, statistics = getattr(task, "statistics_spec", None), getattr(task, "site_statistics", None)
    spec = spec_of() if callable(spec_of) else None
    if spec is None or not callable(statistics):
        print("federated standardization: not declared (no feature_ranges); the task's own scaling applies")
        return data
    vector = statistics(data)
    outside = int(sum(vector[f * spec.block + 3] + vector[f * spec.block + 4] for f in range(spec.features)))
    scaling = derive_scaling(vector, spec)
    print(
        f"federated standardization: {spec.length} statistics lanes ({spec.bins} bins per feature); "
        f"{outside} values outside the declared ranges"
    )
    return prepare(task, data, TaskSetup(scaling=scaling))[1]


def _check_dp(task: Task, data: SiteData, settings: TrainSettings) -> None:
    model = task.build_model(seed=0)
    dp = TrainSettings(1, settings.batch_size, settings.learning_rate, settings.seed, RecordDP(1.0, 1.0, 1e-5))
    try:
        task.train(model, _one_batch(data, settings.batch_size), dp)
    except ConfigError as exc:
        print(f"DP-SGD: not possible: {exc}")
        return
    if type(task).train is not TabularTask.train:
        print("DP-SGD: ran, but this task has its own train(): check that it honours settings.record_dp")
        return
    print("DP-SGD: one step ok (Opacus)")
