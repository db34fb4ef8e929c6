"""The job queue and the job commands (issue 12 item 7), through real gRPC with mutual TLS and real training:
a start while a job runs queues it; the queue survives a restart and runs in order; a queued job is cancelled; a job
whose task no site runs says so while it waits and when it fails; `cohort job list|show`, `status --last` and
`--json` as an operator reads them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from support import (
    SITES,
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    coordinator_config,
    job_config,
    participant_config,
    poll_until,
)

from cohort_cli.admin_client import AdminEndpoint, cancel_job, get_status, start_job
from cohort_cli.main import main
from common.proto.cohort.v1 import cohort_pb2 as pb
from coordinator.daemon import CoordinatorDaemon
from coordinator.jobspec import to_proto

TWO = SITES[:2]


def admin_args(pki: Pki, address: str) -> list[str]:
    return ["--coordinator", address, "--tls-dir", str(pki.admin.ca.parent)]


async def job_states(ep: AdminEndpoint) -> dict[str, str]:
    return {j.job_id: j.state for j in (await get_status(ep)).jobs}


async def test_queue_survives_a_restart_and_runs_in_order(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    config = coordinator_config(pki, tmp_path / "state", sites=TWO)
    first: CoordinatorDaemon = await coordinator_factory(config)
    ep = AdminEndpoint(address=first.address, tls=pki.admin)
    one_round = job_config(rounds=1, min_sites=2)
    a = await start_job(ep, to_proto(one_round))
    b = await start_job(ep, to_proto(job_config(rounds=1, min_sites=2, name="second")))
    c = await start_job(ep, to_proto(job_config(rounds=1, min_sites=2, name="third")))
    assert (a.state, b.state, c.state) == ("running", "queued", "queued")
    assert c.waiting == f"queued: position 2, starts after job {b.job_id}"
    assert (await cancel_job(ep, c.job_id, "not needed")).detail == "not needed"

    # A restart keeps the queue: the interrupted job resumes, the queued one still waits its turn.
    await first.close("test: restart with a queue")
    second: CoordinatorDaemon = await coordinator_factory(config)
    ep = AdminEndpoint(address=second.address, tls=pki.admin)
    assert await job_states(ep) == {a.job_id: "running", b.job_id: "queued", c.job_id: "cancelled"}

    for site in TWO:
        await participant_factory(participant_config(pki.site(site), second.address, site_data[site]))

    async def both_ended() -> bool:
        states = await job_states(ep)
        return states[a.job_id] != "running" and states[b.job_id] not in ("queued", "running")

    await poll_until(both_ended, timeout=120, what="the running job, then the queued one, to end")
    assert await job_states(ep) == {a.job_id: "finished", b.job_id: "finished", c.job_id: "cancelled"}
    store = second.coordinator.store
    order = [(e["kind"], e["detail"].get("job_id")) for e in store.audit_events()]
    assert order.index(("job_finished", a.job_id)) < order.index(("job_dequeued", b.job_id))
    assert store.rounds(c.job_id) == []  # a cancelled job never ran


async def test_a_job_no_site_can_run_waits_visibly_then_fails_with_the_reason(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", sites=TWO))
    ep = AdminEndpoint(address=coord.address, tls=pki.admin)
    await participant_factory(participant_config(pki.site(TWO[0]), coord.address, site_data[TWO[0]]))
    await poll_until(lambda: coord.coordinator.registry.connected() != [], what="the site to connect")

    # The site runs breast_cancer; the job needs digits. Nothing proves that no allow-listed site ever will (an
    # offline site may be set up for it), so the job is accepted and waits, saying why.
    digits = job_config(task="digits", rounds=1, min_sites=1, wait_for_sites_s=4.0, max_round_retries=0)
    wrong = await start_job(ep, to_proto(digits))
    behind = await start_job(ep, to_proto(job_config(rounds=1, min_sites=1, evaluate_every=0, name="fits")))
    mismatch = f"{TWO[0]}: task name: site runs 'breast_cancer', the job needs 'digits'"

    async def waiting_shown() -> bool:
        [job] = [j for j in (await get_status(ep)).jobs if j.job_id == wrong.job_id]
        return mismatch in job.waiting and job.waiting.endswith(
            "1 allow-listed site not connected; the job fails at " + job.waiting.rsplit("fails at ", 1)[-1]
        )

    await poll_until(waiting_shown, timeout=10, what="the waiting reason in the status")

    async def ended() -> bool:
        states = await job_states(ep)
        return states[wrong.job_id] == "failed" and states[behind.job_id] not in ("queued", "running")

    await poll_until(ended, timeout=90, what="the job to fail and the queued one to run")
    status = await get_status(ep)
    failed, fits = status.jobs
    assert failed.rounds == []  # it failed before any round, and still says why
    assert mismatch in failed.detail
    assert "job.wait_for_sites_s (4s)" in failed.detail
    assert failed.waiting == ""
    assert fits.state == "finished"  # the queue moves on after a failed job

    # The operator's view: the list, one job, the last rounds, and JSON with numbers and zero fields.
    args = admin_args(pki, coord.address)
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["job", "list", *args]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in listed] == [[wrong.job_id, "failed"], [behind.job_id, "finished"]]
    assert mismatch in listed[0]
    assert await asyncio.to_thread(main, ["job", "show", wrong.job_id, *args]) == 0
    shown = capsys.readouterr().out
    assert f"job {wrong.job_id} [test] task=digits state=failed" in shown
    assert mismatch in shown
    assert await asyncio.to_thread(main, ["status", "--json", "--last", "1", *args]) == 0
    data = json.loads(capsys.readouterr().out)
    first_json, fits_json = data["jobs"]
    assert (first_json["test_loss"], first_json["current_round"], first_json["rounds"]) == (0, 0, [])
    assert [r["round"] for r in fits_json["rounds"]] == [fits.rounds[-1].round]
    assert fits_json["created_unix"] == pytest.approx(fits.created_unix)
    assert all(type(site["last_seen_unix"]) is float for site in data["sites"])


async def test_job_stop_prints_the_state_reached(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", sites=TWO))
    ep = AdminEndpoint(address=coord.address, tls=pki.admin)
    job = await start_job(ep, to_proto(job_config(rounds=5, min_sites=2)))
    queued = await start_job(ep, pb.JobSpec(task="breast_cancer", rounds=1, min_sites=2))
    args = admin_args(pki, coord.address)
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["job", "cancel", queued.job_id, *args]) == 0
    assert capsys.readouterr().out == f"job {queued.job_id}: cancelled (cancelled by admin admin while queued)\n"
    assert await asyncio.to_thread(main, ["job", "stop", job.job_id, *args]) == 0
    assert capsys.readouterr().out == f"job {job.job_id}: stopped\n"
    assert await asyncio.to_thread(main, ["job", "cancel", job.job_id, *args]) == 3
    assert "only a queued job can be cancelled" in capsys.readouterr().err


async def test_the_readme_job_file_starts_on_a_two_site_federation(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cohort job start deploy/demo/job-digits.yaml` as the README's Operate section writes it, on 2 sites."""
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", sites=TWO))
    job_file = Path(__file__).parent.parent / "deploy" / "demo" / "job-digits.yaml"
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["job", "start", str(job_file), *admin_args(pki, coord.address)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("started job ")
    assert "(digits, 20 rounds)" in out
    assert [j.state for j in (await get_status(AdminEndpoint(address=coord.address, tls=pki.admin))).jobs] == [
        "running"
    ]
