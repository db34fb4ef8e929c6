"""The coordinator killed with SIGKILL in every phase of a round resumes its job and ends where an uninterrupted run
ends: the same final model given the same accepted updates, the same epsilon, no upload lost or counted twice.

The coordinator runs as a real process (``cohort coordinator --exit-when-done``) and is killed by a failpoint
(common/failpoints.py) at an exact point; the three sites are in-process daemons that reconnect to the restarted
coordinator on their own, over mutual TLS. The store, the spool and the checkpoints are the real files on disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from support import Pki, participant_config, poll_until

from common import config as config_loader
from common.privacy.accounting import Accountant, PrivacyEvent
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.state.model_store import ModelStore
from coordinator.state.resume import RESTART_DETAIL
from participant.daemon import ParticipantDaemon

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SITES = ("site-a", "site-b", "site-c")
ROUNDS = 2

PLAIN: dict[str, Any] = {}
SECURE: dict[str, Any] = {"secure_aggregation": {"enabled": True, "stage_timeout_s": 20, "clip": 1.0}}
FEDADAM: dict[str, Any] = {"strategy": {"name": "fedadam", "server_lr": 0.05}}
CENTRAL_DP: dict[str, Any] = {"privacy": {"unit": "site", "clip_norm": 1.0, "noise_multiplier": 1.2, "delta": 1e-5}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    directory: Path
    port: int
    config: Path
    trainings: dict[str, int] = field(default_factory=dict)  # local trainings per site, over every coordinator life

    @property
    def state(self) -> Path:
        return self.directory / "state"

    def db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.state / "coordinator.db")
        db.row_factory = sqlite3.Row
        return db

    def job(self) -> dict[str, Any]:
        with self.db() as db:
            return dict(db.execute("SELECT * FROM jobs").fetchone())

    def rounds(self) -> list[dict[str, Any]]:
        with self.db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM rounds ORDER BY round, attempt")]

    def uploads(self) -> list[dict[str, Any]]:
        with self.db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM uploads ORDER BY round, attempt, site")]

    def audit_kinds(self) -> list[str]:
        with self.db() as db:
            return [r["kind"] for r in db.execute("SELECT kind FROM audit ORDER BY seq")]

    def final_model(self) -> dict[str, torch.Tensor]:
        return ModelStore(self.state / "models").load(self.job()["model_version"])


def make_run(directory: Path, pki: Pki, job: dict[str, Any]) -> Run:
    directory.mkdir(parents=True)
    port = free_port()
    coord = pki.coordinator
    spec = {
        "name": "crash",
        "task": "breast_cancer",
        "rounds": ROUNDS,
        "fraction": 1.0,
        "min_sites": 3,
        "round_timeout_s": 40,
        "wait_for_sites_s": 40,
        "evaluate_every": 1,
        "params": {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.05, "seed": 3},
    } | job
    config = {
        "federation": {"name": "test", "sites": list(SITES)},
        "server": {
            "listen": f"127.0.0.1:{port}",
            "tls": {"ca": str(coord.ca), "cert": str(coord.cert), "key": str(coord.key)},
            "heartbeat_interval_s": 1.0,
            "shutdown_grace_s": 1.0,
        },
        "state_dir": str(directory / "state"),
        "job": spec,
    }
    path = directory / "coordinator.yaml"
    path.write_text(yaml.safe_dump(config))
    return Run(directory, port, path)


async def coordinator_process(run: Run, failpoint: str | None) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k != "COHORT_FAILPOINTS"}
    if failpoint:
        env["COHORT_FAILPOINTS"] = failpoint
    with (run.directory / "coordinator.log").open("ab") as log:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cohort_cli",
            "coordinator",
            "--config",
            str(run.config),
            "--exit-when-done",
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=log,
        )


async def wait_exit(proc: asyncio.subprocess.Process, run: Run, timeout: float = 120) -> int:
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log = (run.directory / "coordinator.log").read_text()[-4000:]
        raise AssertionError("coordinator did not finish:\n" + log) from None


async def federate(
    run: Run,
    pki: Pki,
    site_data: dict[str, Path],
    crashes: tuple[str, ...] = (),
    between: Callable[[Run], None] | None = None,
) -> None:
    """Run the job to its end; each entry of ``crashes`` arms one failpoint for one coordinator life."""
    address = f"127.0.0.1:{run.port}"
    sites = [ParticipantDaemon(participant_config(pki.site(s), address, site_data[s])) for s in SITES]
    for name, daemon in zip(SITES, sites, strict=True):
        await daemon.start()
        count_trainings(run, daemon, name)
    try:
        await _lives(run, crashes, between)
    finally:
        for daemon in sites:
            await daemon.close("test done")


async def _lives(run: Run, crashes: tuple[str, ...], between: Callable[[Run], None] | None) -> None:
    for failpoint in crashes:
        proc = await coordinator_process(run, failpoint)
        code = await wait_exit(proc, run)
        log = (run.directory / "coordinator.log").read_text()
        assert code == -signal.SIGKILL, f"failpoint {failpoint} was not hit (exit {code}):\n{log[-3000:]}"
        if between is not None:
            between(run)
    proc = await coordinator_process(run, None)
    code = await wait_exit(proc, run)
    assert code == 0, (run.directory / "coordinator.log").read_text()[-4000:]


def count_trainings(run: Run, daemon: ParticipantDaemon, name: str) -> None:
    """Count each local training of ``daemon``'s site in ``run.trainings`` (a retrain after a restart shows)."""
    site = daemon.site
    assert site is not None
    train = site.train

    def counted(*args: Any, **kwargs: Any) -> Any:
        run.trainings[name] = run.trainings.get(name, 0) + 1
        return train(*args, **kwargs)

    site.train = counted  # type: ignore[method-assign]


_baselines: dict[str, Run] = {}


async def baseline(kind: str, tmp_path_factory: pytest.TempPathFactory, pki: Pki, site_data: dict[str, Path]) -> Run:
    """The uninterrupted run of the same job with the same sites (computed once per job kind)."""
    if kind not in _baselines:
        run = make_run(
            tmp_path_factory.mktemp("baseline") / kind,
            pki,
            {"plain": PLAIN, "secure": SECURE, "fedadam": FEDADAM}[kind],
        )
        await federate(run, pki, site_data)
        _baselines[kind] = run
    return _baselines[kind]


def assert_same_model(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert list(got) == list(want)
    for name in want:
        diff = float((got[name] - want[name]).abs().max())
        assert diff <= atol, f"{name}: max difference {diff:g} > {atol:g}"


def assert_each_round_counted_once(run: Run) -> None:
    rounds = run.rounds()
    completed = [r for r in rounds if r["state"] == "completed"]
    assert [r["round"] for r in completed] == list(range(1, ROUNDS + 1))
    for r in completed:
        ups = [u for u in run.uploads() if u["round"] == r["round"] and u["attempt"] == r["attempt"]]
        assert sorted(u["site"] for u in ups) == list(SITES)  # each site's update exactly once
        assert r["train_samples"] == sum(u["num_samples"] for u in ups)


PHASES = [
    pytest.param("coordinator.model_streaming@2", id="streaming-model"),
    pytest.param("coordinator.upload_accepted@2", id="collecting-uploads"),
    pytest.param("coordinator.checkpoint_writing@2", id="writing-checkpoint"),
    pytest.param("coordinator.checkpoint_saved@2", id="checkpoint-written-not-committed"),
    pytest.param("coordinator.round_committed@1", id="between-rounds"),
    pytest.param("coordinator.evaluating@2", id="evaluating"),
]


@pytest.mark.parametrize("failpoint", PHASES)
async def test_plaintext_round_resumes_to_the_same_model(
    failpoint: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pki: Pki,
    site_data: dict[str, Path],
) -> None:
    want = await baseline("plain", tmp_path_factory, pki, site_data)
    run = make_run(tmp_path / "run", pki, PLAIN)
    await federate(run, pki, site_data, crashes=(failpoint,))

    job = run.job()
    assert job["state"] == "finished", job["detail"]
    assert "job_resumed" in run.audit_kinds()
    # Bit for bit: updates are folded in site order, so the model depends on the accepted updates alone.
    assert job["model_version"] == want.job()["model_version"]
    assert_same_model(run.final_model(), want.final_model())
    assert_each_round_counted_once(run)
    assert job["test_accuracy"] == pytest.approx(want.job()["test_accuracy"])
    assert not list((run.state / "models").glob("*.tmp"))  # a torn checkpoint write leaves nothing behind
    # Every round's validation evaluation is there, as in the uninterrupted run (one the crash cut off ran again).
    assert evaluations(run) == evaluations(want)


@pytest.mark.parametrize(
    "failpoint", ["coordinator.round_committed@1", "coordinator.checkpoint_saved@2"], ids=["between", "uncommitted"]
)
async def test_a_fedadam_job_resumes_with_its_moments_to_the_same_model(
    failpoint: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pki: Pki,
    site_data: dict[str, Path],
) -> None:
    want = await baseline("fedadam", tmp_path_factory, pki, site_data)
    run = make_run(tmp_path / "run", pki, FEDADAM)
    await federate(run, pki, site_data, crashes=(failpoint,))
    job = run.job()
    assert job["state"] == "finished", job["detail"]
    assert "job_resumed" in run.audit_kinds()
    # The server optimizer's moments were committed with round 1 and read back: the same model, bit for bit.
    assert job["model_version"] == want.job()["model_version"]
    committed = [r for r in run.rounds() if r["state"] == "completed"]
    assert [r["round"] for r in committed] == [1, 2]


def evaluations(run: Run) -> list[tuple[int, int | None, float | None]]:
    return [(r["round"], r["val_samples"], r["val_accuracy"]) for r in run.rounds() if r["state"] == "completed"]


async def test_uploads_in_flight_at_a_crash_are_taken_by_the_reopened_round_without_retraining(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki, site_data: dict[str, Path]
) -> None:
    """Restart gap a): the coordinator dies while round 2's first upload streams in. The sites retry the uploads
    they finished; the reopened round takes them at once (it does not wait for the federation first), so no site
    trains a round twice (with record-level DP a retrain would spend its budget twice)."""
    want = await baseline("plain", tmp_path_factory, pki, site_data)
    run = make_run(tmp_path / "run", pki, PLAIN)
    await federate(run, pki, site_data, crashes=("coordinator.upload_receiving@2",))
    job = run.job()
    assert job["state"] == "finished", job["detail"]
    assert run.trainings == dict.fromkeys(SITES, ROUNDS)
    assert job["model_version"] == want.job()["model_version"]
    assert_each_round_counted_once(run)


async def test_a_fedbuff_buffer_keeps_its_accepted_updates_across_a_crash(
    tmp_path: Path, pki: Pki, site_data: dict[str, Path]
) -> None:
    """Asynchronous rounds: the coordinator dies right after the first update of version 2's buffer is accepted. The
    buffer is reopened with that update (counted once, with its recorded staleness) and the job finishes; which sites
    fill a buffer depends on timing, so there is no bit-identical twin run to compare with."""
    fedbuff = {"strategy": {"mode": "async", "buffer_size": 2, "max_staleness": 2}, "min_sites": 2, "evaluate_every": 0}
    run = make_run(tmp_path / "run", pki, fedbuff)
    await federate(run, pki, site_data, crashes=("coordinator.upload_accepted@2",))
    job = run.job()
    assert job["state"] == "finished", job["detail"]
    assert "job_resumed" in run.audit_kinds()
    completed = [r for r in run.rounds() if r["state"] == "completed"]
    assert [r["round"] for r in completed] == [1, 2]
    for r in completed:
        ups = [u for u in run.uploads() if (u["round"], u["attempt"]) == (r["round"], r["attempt"])]
        assert len(ups) >= 2
        assert len({u["site"] for u in ups}) == len(ups)  # each site once in a buffer
        assert sorted(json.loads(r["reported"])) == sorted(u["site"] for u in ups)
        assert all("staleness" in json.loads(u["metrics"]) for u in ups)
    assert not list((run.state / "spool").rglob("*.part"))


async def test_an_evaluation_after_a_damaged_checkpoint_counts_the_reports_it_had(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki, site_data: dict[str, Path]
) -> None:
    """Restart gap c): the coordinator dies after the first report of round 2's evaluation, and round 2's checkpoint
    is found damaged. Round 2 runs again from round 1's model and yields the same model; its evaluation counts the
    report recorded before the crash (that site will not evaluate the same model twice) and asks the others, so it
    completes with every site instead of waiting out the round deadline with a partial score."""
    want = await baseline("plain", tmp_path_factory, pki, site_data)
    run = make_run(tmp_path / "run", pki, PLAIN)

    def damage_latest(r: Run) -> None:
        path = ModelStore(r.state / "models").path_for(r.job()["model_version"])
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))

    await federate(run, pki, site_data, crashes=("coordinator.evaluation_recorded@2",), between=damage_latest)
    job = run.job()
    assert job["state"] == "finished", job["detail"]
    states = [(r["round"], r["attempt"], r["state"]) for r in run.rounds()]
    assert states == [(1, 0, "completed"), (2, 0, "discarded"), (2, 1, "completed")]
    assert job["model_version"] == want.job()["model_version"]
    assert evaluations(run) == evaluations(want)


@pytest.mark.parametrize(
    "failpoint",
    [
        pytest.param("coordinator.upload_accepted@2", id="collecting-masked-inputs"),
        pytest.param("coordinator.unmasking@2", id="unmasking"),
    ],
)
async def test_secure_round_is_retried_with_fresh_keys(
    failpoint: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pki: Pki,
    site_data: dict[str, Path],
) -> None:
    want = await baseline("secure", tmp_path_factory, pki, site_data)
    run = make_run(tmp_path / "run", pki, SECURE)
    await federate(run, pki, site_data, crashes=(failpoint,))

    job = run.job()
    assert job["state"] == "finished", job["detail"]
    rounds = [(r["round"], r["attempt"], r["state"], r["detail"]) for r in run.rounds()]
    assert rounds[0][:3] == (1, 0, "completed")
    assert rounds[1][:3] == (2, 0, "failed")
    assert rounds[1][3] == RESTART_DETAIL
    assert rounds[2][:3] == (2, 1, "completed")
    # The retried attempt trains from the same model with the same seed; the masks cancel exactly, so the models
    # differ only by the encoding's stochastic rounding (a step of clip / 2**29 per coordinate and site here).
    assert_same_model(run.final_model(), want.final_model(), atol=1e-5)
    assert not (run.state / "spool" / job["job_id"]).exists() or not any(
        (run.state / "spool" / job["job_id"]).iterdir()
    )


async def test_epsilon_survives_crashes_exactly(tmp_path: Path, pki: Pki, site_data: dict[str, Path]) -> None:
    """Two crashes (mid-uploads of round 1, checkpoint written but not committed in round 2): the accountant's state
    comes back from the store, so epsilon is what an uninterrupted run of two rounds spends, to the last digit."""
    run = make_run(tmp_path / "run", pki, CENTRAL_DP)
    await federate(run, pki, site_data, crashes=("coordinator.upload_accepted@1", "coordinator.checkpoint_saved@2"))
    job = run.job()
    assert job["state"] == "finished", job["detail"]
    assert_each_round_counted_once(run)

    p = CENTRAL_DP["privacy"]
    uninterrupted = Accountant("pld", p["delta"])
    per_round = []
    for _ in range(ROUNDS):
        uninterrupted.compose(PrivacyEvent("gaussian", p["noise_multiplier"], "full", 1.0, 1))
        per_round.append(uninterrupted.epsilon())
    completed = [r for r in run.rounds() if r["state"] == "completed"]
    assert [r["epsilon"] for r in completed] == pytest.approx(per_round, rel=1e-12)
    assert job["epsilon"] == pytest.approx(per_round[-1], rel=1e-12)


async def test_damaged_checkpoint_is_reported_and_the_previous_one_used(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki, site_data: dict[str, Path]
) -> None:
    want = await baseline("plain", tmp_path_factory, pki, site_data)
    run = make_run(tmp_path / "run", pki, PLAIN)
    damaged: list[str] = []

    def damage_latest(r: Run) -> None:
        version = r.job()["model_version"]
        path = ModelStore(r.state / "models").path_for(version)
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF  # one flipped bit pattern in the tensor bytes
        path.write_bytes(bytes(data))
        damaged.append(version)

    await federate(run, pki, site_data, crashes=("coordinator.round_committed@2",), between=damage_latest)

    job = run.job()
    assert job["state"] == "finished", job["detail"]
    with run.db() as db:
        corrupt = [r["detail"] for r in db.execute("SELECT detail FROM audit WHERE kind = 'checkpoint_corrupt'")]
    assert len(corrupt) == 1
    assert damaged[0] in corrupt[0]
    states = [(r["round"], r["attempt"], r["state"]) for r in run.rounds()]
    assert states == [(1, 0, "completed"), (2, 0, "discarded"), (2, 1, "completed")]
    # Round 2 ran again from round 1's verified model: the same model as the uninterrupted run.
    assert job["model_version"] == want.job()["model_version"] == damaged[0]
    assert_same_model(run.final_model(), want.final_model())


async def test_graceful_shutdown_interrupts_and_the_next_start_resumes(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, pki: Pki, site_data: dict[str, Path]
) -> None:
    """SIGTERM (close) mid-round leaves the job `interrupted` with its accepted uploads; the next start resumes it."""
    want = await baseline("plain", tmp_path_factory, pki, site_data)
    run = make_run(tmp_path / "run", pki, PLAIN)
    config = config_loader.load(CoordinatorConfig, run.config)
    address = f"127.0.0.1:{run.port}"
    sites = [ParticipantDaemon(participant_config(pki.site(s), address, site_data[s])) for s in SITES]
    first = CoordinatorDaemon(config)
    await first.start()
    for daemon in sites:
        await daemon.start()
    try:
        await poll_until(lambda: any(u["round"] == 2 for u in run.uploads()), timeout=60, what="an upload in round 2")
        await first.close("test: graceful restart")
        job = run.job()
        assert job["state"] == "interrupted"
        assert "resumes" in job["detail"]
        second = CoordinatorDaemon(config)
        await second.start()
        try:
            await poll_until(
                lambda: run.job()["state"] in ("finished", "failed"), timeout=90, what="the resumed job to end"
            )
        finally:
            await second.close("test done")
    finally:
        for daemon in sites:
            await daemon.close("test done")
    assert run.job()["state"] == "finished"
    assert run.job()["model_version"] == want.job()["model_version"]
    assert_each_round_counted_once(run)


async def test_a_crash_after_the_statistics_phase_resumes_with_the_stored_scaling(
    tmp_path: Path, pki: Pki, site_data: dict[str, Path]
) -> None:
    """job.standardize: killed after the scaling is stored and before round 1, the restarted coordinator does not
    run the statistics phase again; every round trains with the scaling on the job row."""
    job = SECURE | {"standardize": {"enabled": True}}
    run = make_run(tmp_path / "run", pki, job)
    await federate(run, pki, site_data, crashes=("coordinator.standardized",))

    row = run.job()
    assert row["state"] == "finished", row["detail"]
    kinds = run.audit_kinds()
    assert "job_resumed" in kinds
    assert kinds.count("features_standardized") == 1  # the phase ran once, in the first life
    assert kinds.index("job_resumed") < kinds.index("round_completed")
    scaling = json.loads(row["feature_scaling"])
    assert len(scaling["mean"]) == 30
    assert [r["round"] for r in run.rounds() if r["state"] == "completed"] == list(range(1, ROUNDS + 1))
