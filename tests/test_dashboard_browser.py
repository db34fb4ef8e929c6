"""The dashboard in headless Chromium during a live federation: the numbers the page renders are those of
`cohort status --json`. Skipped, with the reason, where no Chromium is installed (Debian: apt-get install chromium).

Chromium is driven by its own command line (``--dump-dom`` prints the DOM after the page's script ran; ``--screenshot``
writes a PNG): no WebDriver, no extra Python package. Set ``COHORT_DASHBOARD_SCREENSHOT=path.png`` to keep the
screenshot of the finished job (the README's docs/dashboard.png is made that way).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from dataclasses import replace
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
    runner_of,
)

from cohort_cli.admin_client import AdminEndpoint, get_status, to_json
from common.settings import HttpConfig
from coordinator.config import PrivacyConfig, SecureAggregationConfig

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)"),
]


async def chromium(profile: Path, *args: str) -> str:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return re.sub(r"<script.*?</script>", "", out.decode(), flags=re.S)  # the rendered page, not its source


def fields(dom: str) -> dict[str, str]:
    """The page's ``data-k`` values outside the rounds and sites tables."""
    return {k: v for k, v in re.findall(r'<(?:span|b)[^>]* data-k="([a-z_]+)"[^>]*>([^<]*)<', dom)}


def round_rows(dom: str) -> dict[int, dict[str, str]]:
    rows = {}
    for number, body in re.findall(r'<tr data-round="(\d+)" data-state="completed">(.*?)</tr>', dom):
        rows[int(number)] = dict(re.findall(r'<td data-k="([a-z_]+)"[^>]*>([^<]*)</td>', body))
    return rows


async def test_dashboard_in_chromium_matches_cohort_status(
    pki: Pki,
    tmp_path: Path,
    site_data: dict[str, Path],
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    privacy = PrivacyConfig(
        unit="site", target_epsilon=60.0, delta=1e-5, noise_multiplier=1.0, clip_norm=0.5, refuse_over_budget=False
    )
    secagg = SecureAggregationConfig(enabled=True, bits=32, stage_timeout_s=60)
    job = replace(job_config(rounds=6, min_sites=3), privacy=privacy, secure_aggregation=secagg)
    config = coordinator_config(pki, tmp_path / "state", job=job)
    coordinator = await coordinator_factory(replace(config, http=HttpConfig("127.0.0.1:0", dashboard=True)))
    assert coordinator.ops_http is not None
    url = f"http://{coordinator.ops_http.address}/dashboard"
    for site in SITES:
        await participant_factory(participant_config(pki.site(site), coordinator.address, site_data[site]))
    runner = runner_of(coordinator)
    admin = AdminEndpoint(coordinator.address, pki.admin)

    # Live: the page during the job, then `cohort status --json`; completed rounds do not change after their
    # evaluation, so every evaluated round the page shows must read the same in the status.
    await poll_until(lambda: runner.completed_rounds >= 2, timeout=180, what="two rounds")
    live_state = runner.state.value
    dom = await chromium(tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", url)
    status = json.loads(to_json(await get_status(admin)))
    assert live_state == "running"
    job_status = status["jobs"][-1]
    shown = fields(dom)
    assert shown["federation"] == status["federation"] == "test"
    assert shown["job_id"] == job_status["job_id"]
    assert shown["rounds"] == str(job.rounds)
    assert shown["sites_allowed"] == str(len(SITES))
    assert shown["sites_connected"] == str(sum(1 for s in status["sites"] if s.get("connected")))
    assert shown["secure_aggregation"] == "on (SecAgg+, 32-bit ring)"
    assert shown["epsilon_budget"] == "60"
    assert shown["strategy"].startswith("fedavg")
    rows = round_rows(dom)
    by_round = {r["round"]: r for r in job_status["rounds"] if r["state"] == "completed"}
    evaluated = {n: row for n, row in rows.items() if row["val_accuracy"] != "-"}
    assert evaluated, f"the page showed no evaluated round: {dom}"
    for number, row in evaluated.items():
        truth = by_round[number]
        assert row["val_accuracy"] == f"{truth['val_accuracy']:.4f}"
        assert row["train_loss"] == f"{truth['train_loss']:.4f}"
        assert row["epsilon"] == f"{truth['epsilon']:.3f}"
        assert row["sites"] == f"{len(truth['reported'])}/{len(truth['cohort'])}"

    # Finished: every number on the page is final; keep a screenshot.
    await poll_until(lambda: runner.state.value != "running", timeout=240, what="the job to end")
    dom = await chromium(tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", url)
    status = json.loads(to_json(await get_status(admin)))
    job_status = status["jobs"][-1]
    shown = fields(dom)
    assert shown["job_state"] == job_status["state"] == "finished"
    assert shown["completed_rounds"] == str(job.rounds)
    assert shown["epsilon"] == f"{job_status['epsilon']:.3f}"
    assert shown["test_accuracy"] == f"{job_status['test_accuracy']:.4f}"
    rows = round_rows(dom)
    assert sorted(rows) == [r["round"] for r in job_status["rounds"] if r["state"] == "completed"]
    for truth in job_status["rounds"]:
        if truth["state"] == "completed":
            assert rows[truth["round"]]["val_accuracy"] == f"{truth['val_accuracy']:.4f}"
    shot = tmp_path / "dashboard.png"
    await chromium(
        tmp_path / "profile", "--virtual-time-budget=5000", "--window-size=1400,1200", f"--screenshot={shot}", url
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("COHORT_DASHBOARD_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
