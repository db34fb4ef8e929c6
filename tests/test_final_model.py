"""The final model delivered to sites (issue 12 item 6): with ``keep_final_model`` a site that took part keeps the
job's final model as an owner-only safetensors file with the coordinator's checkpoint metadata; the coordinator
serves an ended job's final model by digest and nothing else of it. Real gRPC, mutual TLS, real training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from safetensors import safe_open
from safetensors.torch import load_file
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

from common import config as config_loader
from common import files
from common.errors import ConfigError
from common.serde import encode
from participant.config import ParticipantConfig
from participant.final_model import fetch_model

TWO = SITES[:2]


async def test_sites_keep_the_final_model_with_its_metadata(
    pki: Pki,
    site_data: dict[str, Path],
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    participant_factory: ParticipantFactory,
) -> None:
    job = job_config(rounds=2, min_sites=2, evaluate_every=0)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", sites=TWO, job=job))
    kept = {site: tmp_path / "kept" / site / "final.safetensors" for site in TWO}
    daemons = [
        await participant_factory(
            replace(participant_config(pki.site(site), coord.address, site_data[site]), keep_final_model=kept[site])
        )
        for site in TWO
    ]
    store = coord.coordinator.store
    await poll_until(lambda: store.jobs()[0]["state"] != "running", timeout=120, what="the job to end")
    [row] = store.jobs()
    assert row["state"] == "finished"
    await poll_until(lambda: all(p.exists() for p in kept.values()), timeout=30, what="the sites to keep the model")

    for site, path in kept.items():
        assert files.mode_of(path) == 0o600
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        order = json.loads(meta["cohort_order"])
        tensors = load_file(str(path))
        # The same model, tensor for tensor, as the coordinator committed: it hashes to the job's final version.
        assert encode({name: tensors[name] for name in order}).version == row["model_version"]
        assert meta["cohort_version"] == row["model_version"]
        assert (meta["job"], meta["round"], meta["cohort_task"]) == (row["job_id"], "2", "breast_cancer")
        assert meta["cohort_task_digest"] == row["spec"]["identity"]["task_digest"]
        assert meta["cohort_kept_by"] == site
        assert meta["cohort_job_end"] == "completed 2 rounds"

    # An ended job's final model is served by digest; nothing else of it is (its initial model, say).
    stub = daemons[0].connection.stub  # type: ignore[union-attr]
    assembler, metadata = await fetch_model(stub, row["job_id"], row["model_version"], 30)
    assert metadata["round"] == "2"
    assert encode(assembler.finish()).version == row["model_version"]
    initial = next(r.base_version for r in store.rounds(row["job_id"]) if r.round == 1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fetch_model(stub, row["job_id"], initial, 30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "only its final model" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await fetch_model(stub, "no-such-job", row["model_version"], 30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_keep_final_model_names_a_file_not_a_directory(tmp_path: Path) -> None:
    tree = {
        "tls": {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"},
        "data_dir": str(tmp_path),
        "task": "breast_cancer",
        "keep_final_model": str(tmp_path),
    }
    with pytest.raises(ConfigError, match=r"^keep_final_model: .* is a directory; name the file to write"):
        config_loader.build(ParticipantConfig, tree)
    tree["keep_final_model"] = str(tmp_path / "final.safetensors")
    assert config_loader.build(ParticipantConfig, tree).keep_final_model == tmp_path / "final.safetensors"
