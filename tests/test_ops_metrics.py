"""Prometheus /metrics of both daemons during a real federation, checked against the round records; the dashboard's
JSON against `cohort status --json`; the run report the coordinator writes when the job ends; operator log lines."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import (
    SITES,
    UNLISTED,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    channel,
    coordinator_config,
    job_config,
    join_request,
    participant_config,
    poll_until,
    runner_of,
)

from cohort_cli.admin_client import AdminEndpoint, get_status, to_json
from common.ops_http import probe
from common.proto.cohort.v1 import cohort_pb2_grpc as pb_grpc
from common.settings import HttpConfig

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(address: str) -> Samples:
    status, body = probe(f"http://{address}/metrics", timeout=10)
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.slow
async def test_metrics_match_the_round_records(
    pki: Pki,
    tmp_path: Path,
    site_data: dict[str, Path],
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cohort.coordinator.ops")
    sites = SITES[:3]
    job = job_config(rounds=3, min_sites=3)
    config = coordinator_config(pki, tmp_path / "state", sites=sites, job=job)
    coordinator = await coordinator_factory(replace(config, http=HttpConfig("127.0.0.1:0", dashboard=True)))
    assert coordinator.ops_http is not None
    http = coordinator.ops_http.address
    before = await asyncio.to_thread(scrape, http)
    assert value(before, "cohort_sites_allowed") == 3
    assert value(before, "cohort_rounds_started_total") == 0
    assert value(before, "process_resident_memory_bytes") > 10 << 20  # the coordinator's RSS

    # A site that is not on the allow-list is refused: counted by method and status, and audited once.
    async with channel(coordinator.address, pki.site(UNLISTED), pki.coordinator.ca) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.FederationStub(ch).Join(join_request(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    participants = []
    for site in sites:
        pconfig = participant_config(pki.site(site), coordinator.address, site_data[site])
        participants.append(await participant_factory(replace(pconfig, http=HttpConfig("127.0.0.1:0"))))
    runner = runner_of(coordinator)

    # During the federation: a scrape after the first commit never counts more than the records hold.
    await poll_until(lambda: runner.completed_rounds >= 1, timeout=120, what="the first round")
    during = await asyncio.to_thread(scrape, http)
    rows = coordinator.coordinator.store.rounds(runner.job_id)
    assert 1 <= value(during, "cohort_rounds_completed_total") <= len([r for r in rows if r.state == "completed"])
    assert value(during, "cohort_rounds_started_total") <= len(rows)
    assert value(during, "cohort_sites_connected") == 3

    await poll_until(lambda: runner.state.value != "running", timeout=180, what="the job to end")
    assert runner.state.value == "finished"
    after = await asyncio.to_thread(scrape, http)
    rows = coordinator.coordinator.store.rounds(runner.job_id)
    completed = [r for r in rows if r.state == "completed"]
    failed = [r for r in rows if r.state == "failed"]
    assert len(completed) == 3
    assert value(after, "cohort_rounds_started_total") == len(rows)
    assert value(after, "cohort_rounds_completed_total") == len(completed)
    assert value(after, "cohort_rounds_failed_total") == len(failed)
    assert value(after, "cohort_round_duration_seconds_count", outcome="completed") == len(completed)
    assert (
        value(after, "cohort_round_duration_seconds_sum", outcome="completed")
        <= sum(r.finished - r.started for r in completed if r.finished) + 1.0
    )
    reported = sum(len(r.reported) for r in rows)
    assert value(after, "cohort_uploads_accepted_total", kind="train") == reported
    assert value(after, "cohort_round_sites_dropped_total") == sum(len(r.cohort) - len(r.reported) for r in rows)
    assert value(after, "cohort_round_sites_selected") == len(rows[-1].cohort)
    assert value(after, "cohort_job_completed_rounds") == 3
    for phase in ("dispatch", "training_wait", "upload", "aggregate", "commit"):
        assert value(after, "cohort_round_phase_seconds_count", phase=phase) == len(completed), phase
    assert value(after, "cohort_round_phase_seconds_count", phase="unmask") == 0  # secure aggregation off
    assert value(after, "cohort_site_joins_total") >= 3
    assert value(after, "cohort_job_audit_events_total", kind="round_completed") == len(completed)
    model_bytes = len(coordinator.coordinator.models.load_encoded(completed[0].model_version)[1].data)
    # Every site downloaded at least the initial model and each new one before evaluating or training on it.
    assert value(after, "cohort_model_bytes_sent_total") >= 3 * model_bytes * len(completed)
    assert value(after, "cohort_upload_bytes_received_total") == reported * model_bytes  # float32 deltas
    assert value(after, "cohort_privacy_epsilon_budget") == 0  # no differential privacy in this job

    # Each site's own metrics: its trainings are the rounds it was counted in.
    for site, participant in zip(sites, participants, strict=True):
        assert participant.ops_http is not None
        mine = await asyncio.to_thread(scrape, participant.ops_http.address)
        counted = sum(1 for r in rows if site in r.reported)
        assert value(mine, "cohort_site_trainings_total") == counted
        assert value(mine, "cohort_site_update_bytes_sent_total") == counted * model_bytes
        assert value(mine, "cohort_site_model_bytes_received_total") >= model_bytes
        assert value(mine, "cohort_site_joins_total") >= 1
        assert value(mine, "cohort_site_train_seconds_total") > 0

    # Refused calls, by method and status, as the audit log has them.
    refusals = coordinator.coordinator.store.audit_events("join_refused")
    assert len(refusals) == 1
    assert value(after, "cohort_rpcs_refused_total", method="Join", code="PERMISSION_DENIED") == len(refusals)
    assert value(after, "cohort_uploads_refused_total", reason="FAILED_PRECONDITION") == 0

    # The dashboard's JSON carries exactly what `cohort status --json` prints.
    status, body = await asyncio.to_thread(probe, f"http://{http}/api/dashboard", 10)
    assert status == 200
    snap = json.loads(body)
    cli = json.loads(to_json(await get_status(AdminEndpoint(coordinator.address, pki.admin))))
    # The sites are still connected and beating: when each was last seen moves between the two reads.
    for view in (snap["status"], cli):
        for site in view["sites"]:
            assert site.pop("last_seen_unix") > 0
    assert snap["status"] == cli
    assert snap["job"]["completed_rounds"] == 3
    assert snap["ops"]["rounds_completed"] == 3
    assert [t["round"] for t in snap["ops"]["round_times"]] == [r.round for r in rows]
    assert any(e["kind"] == "job_finished" for e in snap["audit"])
    status, page = await asyncio.to_thread(probe, f"http://{http}/dashboard", 10)
    assert status == 200
    assert "/api/dashboard" in page

    # The run report, written when the job ended.
    report = tmp_path / "state" / "reports" / runner.job_id / "report.html"
    await poll_until(report.exists, timeout=60, what="the run report")
    text = report.read_text()
    assert f"{completed[-1].val_accuracy:.4f}" in text
    for png in ("accuracy_loss.png", "round_time.png"):
        assert (report.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Operator log lines: one per round attempt with secure aggregation on or off, tagged with job and round.
    starts = [r for r in caplog.records if "secure aggregation off" in r.getMessage()]
    assert [(getattr(r, "job", None), getattr(r, "round", None)) for r in starts] == [
        (runner.job_id, r.round) for r in rows
    ]
    joined = {getattr(r, "site", None) for r in caplog.records if r.getMessage().endswith(" joined")}
    assert joined == set(sites)


@pytest.mark.slow
async def test_record_level_epsilon_logged_and_exposed_per_site(
    pki: Pki,
    tmp_path: Path,
    site_data: dict[str, Path],
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DP-SGD at each site under secure aggregation: each site's record-level epsilon (which it publishes in the
    clear) is logged per round and exposed on both sides; secure aggregation is logged as on for every round."""
    from coordinator.config import PrivacyConfig, SecureAggregationConfig
    from participant.config import RecordPrivacyConfig

    caplog.set_level(logging.INFO, logger="cohort.coordinator.ops")
    sites = SITES[:3]
    job = replace(
        job_config(rounds=2, min_sites=3, evaluate_every=0),
        privacy=PrivacyConfig(unit="record", delta=1e-5),
        secure_aggregation=SecureAggregationConfig(enabled=True, clip=1.0, weight_cap=1000, stage_timeout_s=30),
    )
    config = coordinator_config(pki, tmp_path / "state", sites=sites, job=job)
    coordinator = await coordinator_factory(replace(config, http=HttpConfig("127.0.0.1:0")))
    assert coordinator.ops_http is not None
    participants = []
    for site in sites:
        cfg = participant_config(pki.site(site), coordinator.address, site_data[site])
        privacy = RecordPrivacyConfig(
            enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, target_epsilon=1e9,
            state_file=tmp_path / f"{site}.json",
        )  # fmt: skip
        http = HttpConfig("127.0.0.1:0")
        participants.append(await participant_factory(replace(cfg, privacy=privacy, http=http)))
    runner = runner_of(coordinator)
    await poll_until(lambda: runner.state.value != "running", timeout=180, what="the job to end")
    assert runner.state.value == "finished", runner.detail
    [row] = coordinator.coordinator.store.jobs()
    site_eps = json.loads(row["site_epsilon"])
    after = await asyncio.to_thread(scrape, coordinator.ops_http.address)
    for site, participant in zip(sites, participants, strict=True):
        assert value(after, "cohort_site_record_epsilon", site=site) == pytest.approx(site_eps[site])
        assert participant.ops_http is not None
        mine = await asyncio.to_thread(scrape, participant.ops_http.address)
        assert value(mine, "cohort_site_record_epsilon") == pytest.approx(site_eps[site])
        assert value(mine, "cohort_site_record_epsilon_budget") == 1e9
        logged = [r for r in caplog.records if getattr(r, "site", None) == site and "record-level epsilon" in r.msg]
        assert [getattr(r, "round", None) for r in logged] == [1, 2]
    assert value(after, "cohort_privacy_epsilon") == pytest.approx(max(site_eps.values()))
    # Secure aggregation on: per-site sample counts, losses and times never reach a metric; unmasking is timed.
    assert value(after, "cohort_round_phase_seconds_count", phase="unmask") == 2
    starts = [r.getMessage() for r in caplog.records if "secure aggregation on" in r.getMessage()]
    assert len(starts) == len(coordinator.coordinator.store.rounds(runner.job_id))
