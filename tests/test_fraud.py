"""The banks' fraud use case: the synthetic transactions, the fraud task's losses and scores, and
``cohort demo --use-case fraud`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from common.fraud_data import BANKS, FEATURES, MERCHANTS, generate_bank
from common.metrics import imbalance_metrics
from common.tasks import fraud
from common.tasks.base import configure

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def banks() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {b.name: generate_bank(b, seed=11, scale=0.5) for b in BANKS}


def _col(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, FEATURES.index(name)]


def test_fraud_is_rare_and_its_rate_differs_by_bank(banks: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    rates = {name: float(y.mean()) for name, (_, y) in banks.items()}
    assert all(0.002 <= r <= 0.02 for r in rates.values()), rates
    assert max(rates.values()) / min(rates.values()) > 5
    for name, (x, _) in banks.items():
        assert x.shape[1] == len(FEATURES) == len(fraud.SCHEMA.features)
        assert x.dtype == np.float32
        assert np.isfinite(x).all()
        onehot = x[:, [FEATURES.index(f"mcc_{m}") for m in MERCHANTS]]
        assert (onehot.sum(axis=1) == 1).all(), name


def test_banks_differ_in_their_customers_not_only_in_labels(banks: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Feature shift: among legitimate transactions alone, the banks' populations differ."""
    legit = {name: x[y == 0] for name, (x, y) in banks.items()}
    age = {n: _col(x, "customer_age").mean() for n, x in legit.items()}
    present = {n: _col(x, "card_present").mean() for n, x in legit.items()}
    foreign = {n: _col(x, "foreign").mean() for n, x in legit.items()}
    amount = {n: np.median(_col(x, "amount")) for n, x in legit.items()}
    assert age["bank-4"] - age["bank-2"] > 25  # the savings bank's customers are older than the neobank's
    assert present["bank-4"] - present["bank-2"] > 0.4
    assert foreign["bank-3"] > 3 * foreign["bank-1"]
    assert amount["bank-3"] > 3 * amount["bank-1"]


def test_fraud_carries_the_documented_signals(banks: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    x = np.concatenate([b[0] for b in banks.values()])
    y = np.concatenate([b[1] for b in banks.values()])
    for signal in ("new_device", "new_merchant", "velocity_1h", "amount_vs_usual"):
        assert _col(x[y == 1], signal).mean() > 1.5 * _col(x[y == 0], signal).mean(), signal
    # ... and none gives it away alone: every flag is also common among legitimate transactions.
    assert _col(x[y == 0], "new_merchant").mean() > 0.15
    assert _col(x[y == 1], "new_device").mean() < 0.6


def test_generation_is_deterministic() -> None:
    a = generate_bank(BANKS[0], seed=3, scale=0.05)
    b = generate_bank(BANKS[0], seed=3, scale=0.05)
    c = generate_bank(BANKS[0], seed=4, scale=0.05)
    assert np.array_equal(a[0], b[0])
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("loss", ["weighted", "focal", "plain"])
def test_losses_are_batch_means_that_weight_fraud(loss: str) -> None:
    task = configure(fraud.TASK, {"loss": loss, "positive_weight": 10.0})
    logits = torch.zeros(4, 2)
    legit = task.loss(logits, torch.tensor([0, 0, 0, 0]))  # type: ignore[attr-defined]
    mixed = task.loss(logits, torch.tensor([0, 0, 0, 1]))  # type: ignore[attr-defined]
    assert torch.isfinite(mixed)
    if loss == "plain":
        assert mixed == pytest.approx(float(legit))
    else:
        # One fraud record of four, weighted 10: (3 + 10) / 4 times the per-record loss.
        assert float(mixed) == pytest.approx(float(legit) * 13 / 4, rel=1e-6)


def test_the_fraud_task_reports_scores(banks: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    x, y = banks["bank-2"]
    task = fraud.TASK.with_params({"hidden": 8})
    n = len(y)
    data = task.site_data((x[: n // 2], y[: n // 2]), (x[:0], y[:0]), (x[n // 2 :], y[n // 2 :]))
    model = task.build_model(seed=1)
    task.train(model, data, replace(task.default_settings, local_epochs=3))
    result = task.evaluate(model, data.test)
    assert result.scores is not None
    metrics = imbalance_metrics(result.scores)
    assert metrics["positives"] == int(y[n // 2 :].sum())
    assert metrics["auc_pr"] > 2 * y.mean()  # far better than a random ranking (whose AUC-PR is the fraud rate)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fraud_demo_compares_banks_alone_with_the_federation(tmp_path: Path) -> None:
    """``cohort demo --use-case fraud``: four bank daemons, secure aggregation and DP-SGD over mutual TLS; then each
    bank alone and pooled, trained with the same recipe; AUC-PR of all on each bank's test split."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cohort_cli",
            "demo",
            "--use-case",
            "fraud",
            "--rounds",
            "3",
            "--run-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "secure aggregation: on" in out
    assert "differential privacy (record level)" in out
    assert "AUC-PR alone  federated   pooled" in out
    for bank in ("bank-1", "bank-2", "bank-3", "bank-4"):
        assert any(line.strip().startswith(bank) and len(line.split()) == 4 for line in out.splitlines()), bank
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["state"] == "finished"
    assert summary["use_case"] == "fraud"
    comparison = summary["comparison"]
    assert set(comparison["alone"]) == set(comparison["federated"]) == {b.name for b in BANKS}
    assert 0 <= comparison["federated_all_banks"] <= 1
    # The coordinator's own federated test AUC-PR (summed histograms) is the all-banks value of the same model.
    assert summary["final_test_metrics"]["auc_pr"] == pytest.approx(comparison["federated_all_banks"], abs=1e-9)
    assert set(summary["differential_privacy"]["site_epsilon"]) == {b.name for b in BANKS}
