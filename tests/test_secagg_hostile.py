"""Issue 9 through real daemons over mutual TLS: a site that aborts every secure round cannot stop a job, and under
secure aggregation the coordinator keeps no per-site sample count, metric or timing (a canary site proves it)."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from support import (
    CoordinatorFactory,
    ParticipantFactory,
    Pki,
    coordinator_config,
    job_config,
    participant_config,
    poll_until,
    runner_of,
)

from common.proto.cohort.v1 import cohort_pb2 as pb
from coordinator.config import SecureAggregationConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.handlers.admin import job_status
from participant.daemon import ParticipantDaemon
from participant.secagg_session import SecAggSession
from participant.site import LocalUpdate

pytestmark = pytest.mark.slow

SECAGG = SecureAggregationConfig(enabled=True, clip=1.0, weight_cap=1000, stage_timeout_s=20, max_site_aborts=2)
HONEST = ("site-a", "site-b", "site-c")
HOSTILE = "site-d"


def make_hostile(daemon: ParticipantDaemon) -> list[int]:
    """Answer every secure instance (training and evaluation) with an abort, claiming tampering."""
    sessions = daemon.secagg
    assert sessions is not None
    aborted: list[int] = []

    async def abort_everything(task: pb.TrainTask | pb.EvaluateTask) -> None:
        session = SecAggSession.start(task, daemon.site_id, sessions._keys)
        await sessions._send(session, session.message(abort_reason="the coordinator tampered (a lie)"))
        aborted.append(task.round)

    sessions.start = abort_everything  # type: ignore[method-assign]
    return aborted


async def run_job(
    pki: Pki,
    site_data: dict[str, Path],
    state: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    sites: tuple[str, ...],
    hostile: bool,
) -> CoordinatorDaemon:
    job = replace(
        job_config(rounds=4, min_sites=2, min_available_sites=len(sites), evaluate_every=2, round_timeout_s=60),
        secure_aggregation=SECAGG,
    )
    coord = await coordinator_factory(coordinator_config(pki, state, sites=sites, job=job))
    for site in sites:
        daemon = await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
        if hostile and site == HOSTILE:
            make_hostile(daemon)
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=240, what="the job to end")
    return coord


async def test_a_site_aborting_every_secure_round_cannot_stop_the_job(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    honest = await run_job(
        pki, site_data, tmp_path / "honest", coordinator_factory, participant_factory, HONEST, hostile=False
    )
    want = runner_of(honest).machine
    assert want.state == "finished", want.detail

    coord = await run_job(
        pki, site_data, tmp_path / "hostile", coordinator_factory, participant_factory, (*HONEST, HOSTILE), hostile=True
    )
    runner = runner_of(coord)
    assert runner.state == "finished", runner.detail
    store = coord.coordinator.store
    rounds = store.rounds(runner.job_id)
    # Every round completed at its first attempt: the aborts made the hostile site a dropout, not a failed round.
    assert [(r.round, r.attempt, r.state) for r in rounds] == [(n, 0, "completed") for n in range(1, 5)]
    assert all(HOSTILE not in r.reported for r in rounds)
    # Suspended after max_site_aborts (2) aborts: rounds 1 and 2; rounds 3 and 4 did not ask it.
    assert [HOSTILE in r.cohort for r in rounds] == [True, True, False, False]
    aborts = store.audit_events("secagg_site_abort")
    assert {e["actor"] for e in aborts} == {HOSTILE}
    assert len(aborts) >= 2
    [suspended] = store.audit_events("site_suspended")
    assert suspended["actor"] == HOSTILE
    status = job_status(runner.job_id, coord.coordinator)
    assert HOSTILE in status.suspended_sites
    assert status.site_aborts[HOSTILE] >= 2
    # The same accuracy band as the federation without the hostile site.
    job = store.job(runner.job_id)
    assert job is not None
    honest_job = honest.coordinator.store.job(want.job_id)
    assert honest_job is not None
    assert job["test_accuracy"] >= 0.85
    assert abs(job["test_accuracy"] - honest_job["test_accuracy"]) <= 0.05


def canary_data(site_data: dict[str, Path], tmp_path: Path) -> tuple[str, Path, int]:
    """The largest honest site's folder, one training record short: a sample count that identifies the site."""
    sizes = {s: len((site_data[s] / "train.csv").read_text().splitlines()) - 1 for s in HONEST}
    site = max(sizes, key=lambda s: sizes[s])
    folder = tmp_path / "canary"
    shutil.copytree(site_data[site], folder)
    lines = (folder / "train.csv").read_text().splitlines()
    rows = sizes[site] - 1
    (folder / "train.csv").write_text("\n".join(lines[: rows + 1]) + "\n")
    return site, folder, rows


@pytest.mark.parametrize("secure", [True, False], ids=["secure-aggregation", "plaintext"])
async def test_a_canary_sites_count_and_metrics_are_kept_only_without_secure_aggregation(
    secure: bool,
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="cohort")
    name, folder, rows = canary_data(site_data, tmp_path)
    data = {**site_data, name: folder}
    job = job_config(rounds=2, min_sites=3, min_available_sites=3, evaluate_every=1, round_timeout_s=60)
    if secure:
        job = replace(job, secure_aggregation=SECAGG)
    state = tmp_path / "state"
    coord = await coordinator_factory(coordinator_config(pki, state, sites=HONEST, job=job))
    canary: list[LocalUpdate] = []
    for site in HONEST:
        daemon = await participant_factory(participant_config(pki.site(site), coord.address, data[site]))
        if site == name:
            assert daemon.site is not None
            train = daemon.site.train

            def recording(*args: object, _train: object = train) -> LocalUpdate:
                local = _train(*args)  # type: ignore[operator]
                canary.append(local)
                return local  # type: ignore[no-any-return]

            daemon.site.train = recording  # type: ignore[method-assign,assignment]
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=180, what="the job to end")
    assert runner.state == "finished", runner.detail
    assert [u.result.num_samples for u in canary] == [rows, rows]

    # What the coordinator keeps: its database (every table), every file in its state directory, its log.
    db = sqlite3.connect(state / "coordinator.db")
    uploads = db.execute("SELECT site, num_samples, metrics, train_seconds FROM uploads").fetchall()
    evaluations = db.execute("SELECT site, num_samples, loss, accuracy FROM evaluations").fetchall()
    tables = "\n".join(
        repr(row)
        for table in ("jobs", "rounds", "uploads", "evaluations", "audit")
        for row in db.execute(f"SELECT * FROM {table}")
    )
    db.close()
    files = b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file())
    log = caplog.text
    secrets = [json.dumps(u.result.loss) for u in canary] + [json.dumps(u.result.accuracy) for u in canary]
    secrets = [s for s in secrets if len(s) > 8]  # full-precision floats: no accidental match

    canary_rows = [u for u in uploads if u[0] == name]
    if secure:
        assert all(n == 0 and t == 0 for _, n, _, t in uploads)  # no count, no timing
        assert all(set(json.loads(m)) <= {"dp_epsilon", "dp_delta"} for _, _, m, _ in uploads)
        assert evaluations == []  # evaluations are secure sums: no per-site result
        for secret in secrets:
            assert secret not in tables
            assert secret.encode() not in files
            assert secret not in log
        # The totals are there: the rounds show the training loss and sample count of all three sites.
        rounds = [r for r in coord.coordinator.store.rounds(runner.job_id) if r.state == "completed"]
        assert all(r.train_samples and r.train_samples > rows for r in rounds)
        assert all(r.val_samples for r in rounds)
    else:
        assert {n for _, n, _, _ in canary_rows} == {rows}
        assert any(secret in tables for secret in secrets)
        assert [e for e in evaluations if e[0] == name]
