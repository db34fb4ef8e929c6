"""Federated breast_cancer over 5 non-IID hospitals reaches the accuracy of central training on pooled data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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

from common.datasets import centralized_baseline, load_source, split_sites, write_site_folders
from common.settings import TrainParamsConfig
from common.tasks import breast_cancer
from common.tasks.base import TrainSettings

pytestmark = pytest.mark.slow

HOSPITALS = ("site-a", "site-b", "site-c", "site-d", "site-e")


async def test_federated_accuracy_within_two_points_of_central(
    pki: Pki, tmp_path: Path, coordinator_factory: CoordinatorFactory, participant_factory: ParticipantFactory
) -> None:
    x, y, schema = load_source("breast_cancer")
    splits = split_sites(x, y, HOSPITALS, alpha=0.5, seed=42)
    folders = write_site_folders(tmp_path / "data", splits, schema)
    defaults = breast_cancer.DEFAULT_SETTINGS
    rounds = breast_cancer.RECOMMENDED_ROUNDS
    params = TrainParamsConfig(
        local_epochs=defaults.local_epochs,
        batch_size=defaults.batch_size,
        learning_rate=defaults.learning_rate,
        seed=defaults.seed,
    )
    job = job_config(rounds=rounds, min_sites=5, evaluate_every=0, params=params)
    coord = await coordinator_factory(coordinator_config(pki, tmp_path / "state", job=job))
    for site in HOSPITALS:
        await participant_factory(participant_config(pki.site(site), coord.address, folders[site]))
    runner = runner_of(coord)
    await poll_until(lambda: runner.state != "running", timeout=240, what="the federated job to finish")
    assert runner.state == "finished", runner.detail
    [record] = coord.coordinator.store.jobs()
    federated = record["test_accuracy"]

    # The same model trained centrally on the pooled training data, for the same number of epochs,
    # evaluated on the same pooled test set (the union of the hospitals' test splits).
    x_train = np.concatenate([splits[s]["train"][0] for s in HOSPITALS])
    y_train = np.concatenate([splits[s]["train"][1] for s in HOSPITALS])
    x_test = np.concatenate([splits[s]["test"][0] for s in HOSPITALS])
    y_test = np.concatenate([splits[s]["test"][1] for s in HOSPITALS])
    assert record["test_samples"] == len(y_test)
    central = centralized_baseline(
        breast_cancer.TASK,
        x_train,
        y_train,
        x_test,
        y_test,
        TrainSettings(batch_size=defaults.batch_size, learning_rate=defaults.learning_rate, seed=defaults.seed),
        epochs=rounds * defaults.local_epochs,
    )
    assert federated >= central.accuracy - 0.02, f"federated {federated:.4f} vs central {central.accuracy:.4f}"
