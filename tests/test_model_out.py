"""The trained model out: `cohort model download` returns the committed file byte for byte, with its metadata;
retention keeps the last N rounds' models plus the best; the README's torch example loads the file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
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

from cohort_cli.admin_client import AdminEndpoint
from cohort_cli.model_cmd import download
from common.serde import encode
from coordinator.config import StateConfig
from coordinator.state import retention

ROOT = Path(__file__).resolve().parent.parent


def readme_torch_example() -> str:
    """The README's example, between its markers."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- model-example -->\n```python\n(.*?)```", text, re.S)
    assert match is not None, "README.md has no model example"
    return match.group(1)


async def test_model_download_is_the_committed_file_and_retention_keeps_last_and_best(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    sites = SITES[:3]
    job = job_config(rounds=4, min_sites=3, evaluate_every=1)
    config = replace(
        coordinator_config(pki, tmp_path / "state", sites=sites, job=job), state=StateConfig(keep_models=1)
    )
    coord = await coordinator_factory(config)
    for site in sites:
        await participant_factory(participant_config(pki.site(site), coord.address, site_data[site]))
    runner = runner_of(coord)
    await poll_until(lambda: runner.state.value != "running", timeout=180, what="the job to end")
    assert runner.state.value == "finished", runner.detail
    store = coord.coordinator.store
    rows = [r for r in store.rounds(runner.job_id) if r.state == "completed"]
    assert [r.round for r in rows] == [1, 2, 3, 4]
    endpoint = AdminEndpoint(address=coord.address, tls=pki.admin)

    # The final model: the exact bytes of the committed checkpoint.
    out = tmp_path / "model.safetensors"
    info = await download(endpoint, out)
    committed = coord.coordinator.models.path_for(runner.global_model.version)
    assert out.read_bytes() == committed.read_bytes()
    assert info.file_sha256 == "sha256:" + hashlib.sha256(committed.read_bytes()).hexdigest()
    assert info.model_version == store.job(runner.job_id)["model_version"]  # type: ignore[index]
    assert (info.job_id, info.round) == (runner.job_id, 4)
    # Its metadata says what it is, without the coordinator's database.
    meta = info.metadata
    assert meta["job"] == runner.job_id
    assert meta["round"] == "4"
    assert meta["cohort_task"] == "breast_cancer"
    assert meta["cohort_task_digest"] == runner.machine.setup.identity.task_digest
    assert json.loads(meta["cohort_strategy"])["name"] == "fedavg"
    assert float(meta["cohort_delta"]) == job.privacy.delta
    assert json.loads(meta["cohort_metrics"])["train_loss"] == pytest.approx(rows[-1].train_loss)

    # Retention (keep_models 1), applied at each commit: the last round's model, the initial model, the best round's,
    # and the one that was best when round 4 committed (its evaluation comes after the commit).
    best = retention.best_round(store.rounds(runner.job_id))
    best_at_commit = retention.best_round(rows[:-1])
    assert best is not None
    assert best_at_commit is not None
    kept = {rows[-1].model_version, best.model_version, rows[0].base_version, best_at_commit.model_version}
    on_disk = {"sha256:" + p.name.removesuffix(".safetensors") for p in coord.coordinator.models.root.iterdir()}
    assert on_disk == kept
    pruned = [r for r in rows if r.model_version not in kept]
    assert pruned, "four rounds with keep_models 1 leave at least one model to remove"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await download(endpoint, tmp_path / "gone.safetensors", runner.job_id, pruned[0].round)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no longer kept" in (err.value.details() or "")
    assert not (tmp_path / "gone.safetensors").exists()
    # A round that does not exist is named.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await download(endpoint, tmp_path / "none.safetensors", runner.job_id, 9)
    assert "no completed round 9 (completed: 1, 2, 3, 4)" in (err.value.details() or "")

    # --round 0: the initial model; the best round's model by number.
    initial = await download(endpoint, tmp_path / "initial.safetensors", runner.job_id, 0)
    assert initial.model_version == rows[0].base_version
    assert initial.metadata["round"] == "0"
    best_info = await download(endpoint, tmp_path / "best.safetensors", runner.job_id, best.round)
    assert best_info.model_version == best.model_version
    assert encode(coord.coordinator.models.load(best.model_version)).version == best.model_version

    # The README's three lines load the downloaded file into the task's torch model.
    namespace: dict[str, object] = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(readme_torch_example(), "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    model = namespace["model"]
    import torch

    assert isinstance(model, torch.nn.Module)
    loaded = coord.coordinator.models.load(info.model_version)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded[name])

    # The command line, as an operator runs it.
    cli_out = tmp_path / "cli.safetensors"
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "cohort_cli",
            "model",
            "download",
            runner.job_id,
            "--out",
            str(cli_out),
            "--coordinator",
            coord.address,
            "--tls-dir",
            str(pki.admin.cert.parent),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert cli_out.read_bytes() == committed.read_bytes()
    assert f"job {runner.job_id} round 4, task breast_cancer" in result.stdout
    assert info.file_sha256 in result.stdout
