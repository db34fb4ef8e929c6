"""The simulator's inputs without Ray: site data split on the fly (a partition while the data suffice, resampled
beyond), given site folders, and job files (a job spec or a coordinator config's job section, with --set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cohort_cli.simulate_cmd import load_job
from common.errors import ConfigError
from common.tasks.base import load_task
from simulation import data as site_data

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = load_task("breast_cancer").schema


def test_few_sites_get_a_disjoint_partition(tmp_path: Path) -> None:
    folders, plan = site_data.split_on_the_fly(
        tmp_path, "breast_cancer", SCHEMA, 5, alpha=0.5, quantity_skew=0.0, seed=1
    )
    assert plan.kind == "partition"
    assert sorted(folders) == site_data.site_names(5)
    total = sum(
        len((f / s).read_text().splitlines()) - 1
        for f in folders.values()
        for s in ("train.csv", "val.csv", "test.csv")
    )
    assert total == 569  # every breast_cancer record at exactly one site
    assert json.loads((tmp_path / "data.json").read_text())["kind"] == "partition"


def test_many_sites_draw_their_records_with_replacement(tmp_path: Path) -> None:
    folders, plan = site_data.split_on_the_fly(
        tmp_path, "breast_cancer", SCHEMA, 200, alpha=0.3, quantity_skew=1.0, seed=1
    )
    assert plan.kind == "resampled"
    sizes = [len((f / "train.csv").read_text().splitlines()) - 1 for f in folders.values()]
    assert min(sizes) >= 10
    assert max(sizes) > 2 * min(sizes)  # quantity skew


def test_given_folders_and_bad_inputs(tmp_path: Path) -> None:
    site_data.split_on_the_fly(tmp_path, "breast_cancer", SCHEMA, 4, alpha=None, quantity_skew=0.0, seed=1)
    assert len(site_data.given_folders(tmp_path, 3)) == 3
    with pytest.raises(ConfigError, match="only 4 site folders"):
        site_data.given_folders(tmp_path, 5)
    with pytest.raises(ConfigError, match="neither a built-in data set"):
        site_data.load_pool("no-such-data", SCHEMA)


def test_job_files_load_with_overrides() -> None:
    demo = load_job(ROOT / "deploy" / "demo" / "coordinator.yaml", ["rounds=2", "params.learning_rate=0.1"])
    assert (demo.task, demo.rounds, demo.params.learning_rate) == ("breast_cancer", 2, 0.1)
    assert demo.secure_aggregation.enabled
    digits = load_job(ROOT / "deploy" / "demo" / "job-digits.yaml", [])
    assert digits.task == "digits"
    with pytest.raises(ConfigError, match="rounds"):
        load_job(ROOT / "deploy" / "demo" / "job-digits.yaml", ["rounds=0"])
