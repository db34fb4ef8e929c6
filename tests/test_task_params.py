"""Task parameters: declared by the task, set by the job (``task_params``), checked when the job starts, sent to the
sites with every task, part of the job's identity; and the fraud task's federated imbalance metrics end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from support import (
    SITES,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    coordinator_config,
    job_config,
    participant_config,
    poll_until,
    runner_of,
)

from cohort_cli.admin_client import AdminEndpoint, format_status, get_status, start_job
from common import config as loader
from common.errors import ConfigError
from common.fraud_data import BANKS, FEATURES, write_bank_folders
from common.metrics import RECALL_KEY
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.tasks.base import configure, load_task
from common.tasks.params import Param, canonical_json, parse_json, validate
from common.tasks.setup import TaskSetup, prepare
from coordinator.config import JobConfig
from coordinator.jobspec import from_proto, to_proto
from coordinator.round.identity import JobIdentity

SCHEMA = {
    "hidden": Param("int", 32, low=4, high=64),
    "rate": Param("float", 0.5, low=0.0, high=1.0),
    "loss": Param("str", "weighted", choices=("weighted", "focal")),
    "deep": Param("bool", False),
}


def test_validation_fills_defaults_and_names_the_key() -> None:
    assert validate(SCHEMA, {"hidden": 8}) == {"hidden": 8, "rate": 0.5, "loss": "weighted", "deep": False}
    assert validate(SCHEMA, {"rate": 1})["rate"] == 1.0
    for values, message in (
        ({"width": 3}, "job.task_params.width: unknown task parameter (the task declares: deep, hidden, loss, rate)"),
        ({"hidden": 2}, "job.task_params.hidden: must be >= 4"),
        ({"hidden": 1.5}, "job.task_params.hidden: expected an integer"),
        ({"hidden": True}, "job.task_params.hidden: expected an integer"),
        ({"rate": math.nan}, "job.task_params.rate: expected a finite number"),
        ({"loss": "mse"}, "job.task_params.loss: expected one of 'weighted', 'focal'"),
        ({"deep": "yes"}, "job.task_params.deep: expected true or false"),
    ):
        with pytest.raises(ConfigError) as info:
            validate(SCHEMA, values, "job.task_params")
        assert str(info.value).startswith(message), info.value
    with pytest.raises(ConfigError, match="default"):
        Param("int", 100, high=10)


def test_json_form_is_canonical_and_flat() -> None:
    assert canonical_json({"b": 1, "a": "x"}) == '{"a":"x","b":1}'
    assert parse_json('{"hidden": 8, "loss": "focal"}') == {"hidden": 8, "loss": "focal"}
    assert parse_json("") == {}
    for bad in ("[1]", '{"a": {"b": 1}}', '{"a": NaN}', "{", '{"a": [1]}'):
        with pytest.raises(ConfigError):
            parse_json(bad)


def test_configure_builds_the_model_with_the_parameters() -> None:
    base = load_task("fraud")
    task = configure(base, {"hidden": 8})
    assert task is not base
    assert base.build_model().state_dict()["0.weight"].shape == (32, len(FEATURES))
    assert task.build_model().state_dict()["0.weight"].shape == (8, len(FEATURES))
    with pytest.raises(ConfigError, match=r"task_params\.width"):
        configure(base, {"width": 8})
    with pytest.raises(ConfigError, match="this task takes no parameters"):
        configure(load_task("breast_cancer"), {"hidden": 8})
    assert configure(load_task("breast_cancer"), {}) is load_task("breast_cancer")


def test_job_config_carries_parameters_through_yaml_and_the_admin_wire(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("task: fraud\ntask_params: {hidden: 8, loss: focal, positive_weight: 20}\n")
    job = loader.load(JobConfig, path)
    assert job.task_params == {"hidden": 8, "loss": "focal", "positive_weight": 20}
    spec = to_proto(job)
    assert json.loads(spec.task_params_json) == job.task_params
    assert from_proto(spec) == job
    path.write_text("task: fraud\ntask_params: {hidden: {nested: 1}}\n")
    with pytest.raises(ConfigError, match=r"job\.task_params\.hidden|task_params\.hidden"):
        loader.load(JobConfig, path)
    # The identity names the parameters: two jobs of the same task with other parameters differ.
    task = load_task("fraud")
    assert JobIdentity.of(task, {"hidden": 8}) != JobIdentity.of(task, {"hidden": 16})
    assert JobIdentity.of(task, {"hidden": 8}).task_digest == JobIdentity.of(task).task_digest


def test_a_site_builds_the_model_the_train_task_names(tmp_path: Path) -> None:
    folders = write_bank_folders(tmp_path, seed=1, scale=0.02)
    base = load_task("fraud")
    data = base.load_data(folders["bank-1"])
    setup = TaskSetup.of(pb.TrainTask(task_params_json='{"hidden":8}'))
    task, same = prepare(base, data, setup)
    assert same is data
    assert task.build_model().state_dict()["0.weight"].shape == (8, len(FEATURES))


async def test_the_coordinator_checks_parameters_when_a_job_starts(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory
) -> None:
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state"))
    ep = AdminEndpoint(address=coord.address, tls=pki.admin)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await start_job(ep, pb.JobSpec(task="fraud", rounds=1, task_params_json='{"hidden": 2}'))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job.task_params.hidden: must be >= 4" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await start_job(ep, pb.JobSpec(task="fraud", rounds=1, task_params_json="[1, 2]"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await get_status(ep)).jobs == []
    job = await start_job(ep, pb.JobSpec(task="fraud", rounds=1, min_sites=2, task_params_json='{"hidden": 8}'))
    assert json.loads(job.spec.task_params_json) == {"hidden": 8}
    runner = runner_of(coord)
    assert runner.machine.setup.identity.task_params == '{"hidden":8}'
    assert runner.global_tensors["0.weight"].shape == (8, len(FEATURES))


@pytest.mark.slow
async def test_fraud_federation_reports_auc_pr(
    pki: Pki,
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    """Three banks (small synthetic data) train the fraud task with a job parameter over mutual TLS; the
    coordinator sums their score histograms into AUC-PR and recall at 1 % FPR, in round records and status."""
    folders = write_bank_folders(tmp_path / "data", seed=2, scale=0.1, banks=BANKS[:3])
    job = replace(
        job_config(task="fraud", rounds=2, min_sites=3),
        task_params={"hidden": 8, "loss": "focal"},
    )
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    for site, folder in zip(SITES, folders.values(), strict=False):
        await participant_factory(participant_config(pki.site(site), coord.address, folder, task="fraud"))
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=240, what="the job to finish")
    assert runner.state == "finished", runner.detail
    row = coord.coordinator.store.job(runner.job_id)
    assert row is not None
    model = coord.coordinator.models.load(row["model_version"])
    assert model["0.weight"].shape == (8, len(FEATURES))
    status = (await get_status(AdminEndpoint(address=coord.address, tls=pki.admin))).jobs[-1]
    assert {"auc_pr", RECALL_KEY, "auc_roc", "positives", "negatives"} <= set(status.test_metrics)
    assert 0 <= status.test_metrics["auc_pr"] <= 1
    # The counts are those of every bank's test split together.
    expected = {"positives": 0, "negatives": 0}
    for folder in folders.values():
        splits = json.loads((folder / "manifest.json").read_text())["splits"]["test"]["label_histogram"]
        expected["negatives"] += splits[0]
        expected["positives"] += splits[1]
    assert status.test_metrics["positives"] == expected["positives"]
    assert status.test_metrics["negatives"] == expected["negatives"]
    assert all("auc_pr" in r.val_metrics for r in status.rounds if r.state == "completed")
    assert "AUC-PR" in format_status(pb.StatusReply(jobs=[status]))
    assert torch.isfinite(model["0.weight"]).all()
