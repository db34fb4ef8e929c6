"""The commands for bringing your own data and task: ``cohort data split --csv``, ``data describe`` inferring the
task, ``data fraud``, ``task check`` and ``privacy plan --record-level``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cohort_cli.main import main
from common.datasets import load_source, split_sites, write_site_folders
from common.tasks.base import load_task, task_digest
from participant.record_dp import SiteBudget, planned_training


def _csv(path: Path, rows: int, seed: int, label_name: str = "kind") -> None:
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["a", "b", label_name, "c"])  # the label need not be last in the source file
        for _ in range(rows):
            a, b, c = rng.normal(size=3)
            writer.writerow([f"{a:.6f}", f"{b:.6f}", "cat" if a + b > 0 else "dog", f"{c:.6f}"])


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_split_any_csv_with_a_separate_test_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _csv(tmp_path / "train.csv", 400, 0)
    _csv(tmp_path / "test.csv", 120, 1)
    out = tmp_path / "sites"
    code, printed, err = _run(
        capsys,
        *("data", "split", "--csv", str(tmp_path / "train.csv"), "--label", "kind"),
        *("--test-csv", str(tmp_path / "test.csv"), "--sites", "x,y,z", "--alpha", "0.8", "--out", str(out)),
    )
    assert code == 0, err
    assert "400 records" not in printed  # 400 train/val + 120 test
    assert "520 records over 3 sites (Dirichlet alpha=0.8, seed 42)" in printed
    manifests = {s: json.loads((out / s / "manifest.json").read_text()) for s in ("x", "y", "z")}
    assert all(m["label_values"] == ["cat", "dog"] for m in manifests.values())
    assert sum(m["splits"]["test"]["count"] for m in manifests.values()) == 120
    assert sum(m["splits"][s]["count"] for m in manifests.values() for s in ("train", "val")) == 400
    header = (out / "x" / "train.csv").read_text().splitlines()[0]
    assert header == "a,b,c,kind"  # features in the file's order, the label last
    # Each site's test share follows its own label mix (a site with no "dog" in training gets no dog to test on).
    for m in manifests.values():
        train, test = m["splits"]["train"]["label_histogram"], m["splits"]["test"]["label_histogram"]
        assert all(te == 0 for tr, te in zip(train, test, strict=True) if tr == 0)
    # describe: no task named, so the schema comes from the header and the manifest.
    code, printed, _ = _run(capsys, "data", "describe", str(out / "y"))
    assert code == 0
    assert "no task named; schema from the CSV header" in printed


def test_split_csv_quantity_skew_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _csv(tmp_path / "d.csv", 600, 2)
    code, printed, _ = _run(
        capsys,
        *("data", "split", "--csv", str(tmp_path / "d.csv"), "--label", "kind", "--num-sites", "4"),
        *("--quantity-alpha", "0.5", "--out", str(tmp_path / "q"), "--task", "my_tasks.model:TASK"),
    )
    assert code == 0
    assert "Dirichlet quantity skew alpha=0.5" in printed
    sizes = [json.loads((tmp_path / "q" / f"hospital-{i}" / "manifest.json").read_text()) for i in range(1, 5)]
    assert {m["task"] for m in sizes} == {"my_tasks.model:TASK"}
    assert len({m["splits"]["train"]["count"] for m in sizes}) > 1
    code, _, err = _run(capsys, "data", "split", "--csv", str(tmp_path / "d.csv"), "--num-sites", "2", "--out", "o")
    assert code == 2
    assert "--label: required with --csv" in err
    code, _, err = _run(
        capsys, "data", "split", "--csv", str(tmp_path / "d.csv"), "--label", "nope", "--num-sites", "2", "--out", "o"
    )
    assert code == 2
    assert "no column named 'nope'" in err
    (tmp_path / "bad.csv").write_text("a,kind\n1.5,x\nsecret-value,y\n")
    code, _, err = _run(
        capsys, "data", "split", "--csv", str(tmp_path / "bad.csv"), "--label", "kind", "--num-sites", "1", "--out", "o"
    )
    assert code == 2
    assert "line 3: column 'a' is not a finite number" in err
    assert "secret-value" not in err


def test_describe_infers_the_task_from_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y, schema = load_source("breast_cancer")
    folder = write_site_folders(tmp_path, split_sites(x, y, ["solo"], alpha=None, seed=0), schema, dataset="custom")
    code, printed, _ = _run(capsys, "data", "describe", str(folder["solo"]))
    assert code == 0
    assert "task breast_cancer (from the folder)" in printed  # from the CSV header: the built-in schema
    code, printed, _ = _run(capsys, "data", "fraud", "--out", str(tmp_path / "banks"), "--scale", "0.05")
    assert code == 0
    assert [line.split(":")[0] for line in printed.splitlines()] == ["bank-1", "bank-2", "bank-3", "bank-4"]
    code, printed, _ = _run(capsys, "data", "describe", str(tmp_path / "banks" / "bank-2"))
    assert code == 0
    assert "task fraud (from the folder)" in printed


def test_task_check_prints_the_digest_a_coordinator_expects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y, schema = load_source("breast_cancer")
    folder = write_site_folders(tmp_path, split_sites(x, y, ["solo"], alpha=None, seed=0), schema)["solo"]
    code, printed, err = _run(capsys, "task", "check", "breast_cancer", "--data", str(folder))
    assert code == 0, err
    assert f"digest a coordinator will expect: {task_digest(load_task('breast_cancer'))}" in printed
    assert re.search(r"model: Sequential, 1058 parameters", printed)
    assert "train: one step on 16 records" in printed
    assert "federated standardization: 2070 statistics lanes" in printed
    assert "DP-SGD: one step ok" in printed
    assert f"{x[0, 0]:.9g}" not in printed  # counts and digests only
    code, _, err = _run(capsys, "task", "check", "breast_cancer", "--data", str(folder), "--param", "hidden=3")
    assert code == 2
    assert "task_params.hidden: unknown task parameter" in err
    code, _, err = _run(capsys, "task", "check", "digits", "--data", str(folder), "--no-dp")
    assert code == 2
    assert "header column 1 should be 'px_0_0'" in err
    code, _, err = _run(capsys, "task", "check", "no.such:TASK", "--data", str(folder))
    assert code == 2
    assert "not installed here" in err


def test_task_check_with_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(capsys, "data", "fraud", "--out", str(tmp_path), "--scale", "0.05")
    code, printed, err = _run(
        capsys, "task", "check", "fraud", "--data", str(tmp_path / "bank-1"), "--params", '{"hidden": 8}', "--no-dp"
    )
    assert code == 0, err
    assert 'with task_params {"hidden": 8}' in printed
    assert "parameter hidden: int, default 32" in printed
    assert "AUC-PR" in printed


def test_record_level_plan_uses_the_sites_own_accountant(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--delta", "1e-5", "--rows", "3000", "--batch", "64", "--local-epochs", "2", "--rounds", "10")
    code, printed, err = _run(capsys, "privacy", "plan", "--record-level", "--epsilon", "4", *argv)
    assert code == 0, err
    match = re.search(r"noise multiplier ([\d.]+) gives epsilon ([\d.]+)", printed)
    assert match is not None
    sigma, eps = float(match.group(1)), float(match.group(2))
    one = planned_training(3000, 64, 2)
    assert "sample rate q=0.0212766" in printed
    # What the site's budget would say after the ten rounds it plans for: the same epsilon, within the target.
    budget = SiteBudget(100.0, 1e-5)
    for _ in range(10):
        budget.record(one.steps, one.sample_rate, sigma)
    assert budget.epsilon() == pytest.approx(eps, abs=1e-4)
    assert eps <= 4
    assert SiteBudget(100.0, 1e-5).epsilon_after(one.steps * 10, one.sample_rate, sigma * 0.99) > 4
    code, printed, _ = _run(capsys, "privacy", "epsilon", "--record-level", "--noise-multiplier", str(sigma), *argv)
    assert code == 0
    assert f"epsilon {eps:.4f}" in printed
    code, _, err = _run(
        capsys, "privacy", "plan", "--record-level", "--epsilon", "4", "--delta", "1e-5", "--rounds", "3"
    )
    assert code == 2
    assert "--rows" in err
