"""Batch runs and benches: sites that exit when their job is over, a job without the final test evaluation."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
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

from common import config as loader
from common.errors import ConfigError
from coordinator.config import JobConfig
from coordinator.jobspec import from_proto, to_proto
from participant.config import ParticipantConfig


def test_final_evaluation_is_a_validated_job_key_that_crosses_the_admin_wire() -> None:
    job = loader.build(JobConfig, {"task": "breast_cancer", "final_evaluation": False}, "job")
    assert job.final_evaluation is False
    assert loader.build(JobConfig, {"task": "breast_cancer"}, "job").final_evaluation is True
    with pytest.raises(ConfigError, match=r"job\.final_evaluation"):
        loader.build(JobConfig, {"task": "breast_cancer", "final_evaluation": "no"}, "job")
    for value in (False, True):
        spec = to_proto(replace(job, final_evaluation=value))
        assert spec.HasField("final_evaluation")
        assert from_proto(spec).final_evaluation is value
    unset = to_proto(job)
    unset.ClearField("final_evaluation")  # an older admin client: the default, evaluate
    assert from_proto(unset).final_evaluation is True


def test_exit_after_job_comes_from_the_file_or_the_command_line(tmp_path: Path, pki: Pki) -> None:
    from cohort_cli.main import build_parser

    files = pki.site(SITES[0])
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "tls": {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)},
                "data_dir": str(tmp_path),
                "task": "breast_cancer",
            }
        )
    )
    assert loader.load(ParticipantConfig, path).exit_after_job is False
    assert loader.load(ParticipantConfig, path, overrides=["exit_after_job=true"]).exit_after_job is True
    args = build_parser().parse_args(["participant", "--config", str(path), "--exit-after-job"])
    assert args.exit_after_job is True
    assert build_parser().parse_args(["participant", "--config", str(path)]).exit_after_job is False


async def test_sites_exit_after_a_job_without_final_evaluation(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    job = job_config(rounds=1, min_sites=2, evaluate_every=0, final_evaluation=False)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    daemons = []
    for site in SITES[:2]:
        config = replace(participant_config(pki.site(site), coord.address, site_data[site]), exit_after_job=True)
        daemons.append(await participant_factory(config))
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=60, what="the job to finish")
    assert runner.state == "finished", runner.detail
    # Every site stops on its own once it hears that the job finished, without an error.
    await asyncio.wait_for(asyncio.gather(*(d.wait_stopped() for d in daemons)), timeout=30)
    assert [d.error for d in daemons] == [None, None]
    store = coord.coordinator.store
    row = store.job(runner.job_id)
    assert row is not None
    assert row["test_samples"] is None
    assert row["test_accuracy"] is None
    assert [r.state for r in store.rounds(runner.job_id)] == ["completed"]
