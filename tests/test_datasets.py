"""Source data sets, division over sites, site folders, and the ``cohort data`` command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cohort_cli import data_cmd
from common.datasets import (
    assign_sites,
    centralized_baseline,
    label_histogram,
    load_source,
    snake_case,
    split_sites,
    train_count,
    write_site_folders,
)
from common.errors import ConfigError, DataError
from common.tasks import breast_cancer as bc_task
from common.tasks.base import SPLITS, load_task
from common.tasks.csv_split import read_split

SITES = [f"hospital-{i}" for i in range(1, 6)]


@pytest.fixture(scope="module")
def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    x, y, _ = load_source("breast_cancer")
    return x, y


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y, _ = load_source("digits")
    return x, y


def test_sources_agree_with_task_schemas() -> None:
    for name, shape, classes in [("breast_cancer", (569, 30), 2), ("digits", (1797, 64), 10)]:
        x, y, schema = load_source(name)
        assert x.shape == shape
        assert x.dtype == np.float32
        assert y.shape == (shape[0],)
        assert y.dtype == np.int64
        assert schema == load_task(name).schema
        assert schema.num_classes == classes
        assert set(np.unique(y)) == set(range(classes))
    assert load_task("breast_cancer").schema.features[:2] == ("mean_radius", "mean_texture")
    assert load_task("digits").schema.features[9] == "px_1_1"


def test_snake_case_and_unknown_source() -> None:
    assert snake_case("mean concave points") == "mean_concave_points"
    assert snake_case("  Worst  Area (mm^2) ") == "worst_area_mm_2"
    with pytest.raises(ConfigError, match="unknown source"):
        load_source("iris")


def _flatten(assignment: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([idx for splits in assignment.values() for idx in splits.values()])


@pytest.mark.parametrize("alpha", [None, 0.5, 0.1])
def test_every_record_used_exactly_once(digits: tuple[np.ndarray, np.ndarray], alpha: float | None) -> None:
    _, y = digits
    assignment = assign_sites(y, SITES, alpha=alpha, seed=3)
    assert sorted(_flatten(assignment).tolist()) == list(range(len(y)))
    for splits in assignment.values():
        n = sum(len(i) for i in splits.values())
        assert len(splits["train"]) == train_count(n, 0.15, 0.2) >= 10


def test_split_is_deterministic(breast_cancer: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = breast_cancer
    first = split_sites(x, y, SITES, alpha=0.5, seed=42)
    again = split_sites(x, y, SITES, alpha=0.5, seed=42)
    other = split_sites(x, y, SITES, alpha=0.5, seed=43)
    for site in SITES:
        for split in SPLITS:
            assert np.array_equal(first[site][split][0], again[site][split][0])
            assert np.array_equal(first[site][split][1], again[site][split][1])
    assert any(len(first[s]["train"][1]) != len(other[s]["train"][1]) for s in SITES)


def _skew(assignment: dict[str, dict[str, np.ndarray]], y: np.ndarray, classes: int) -> float:
    """Mean total-variation distance between each site's label distribution and the global one."""
    overall = np.bincount(y, minlength=classes) / len(y)
    distances = []
    for splits in assignment.values():
        site_y = y[np.concatenate(list(splits.values()))]
        distances.append(0.5 * np.abs(np.bincount(site_y, minlength=classes) / len(site_y) - overall).sum())
    return float(np.mean(distances))


def test_dirichlet_skews_labels_more_than_iid(digits: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = digits
    iid = _skew(assign_sites(y, SITES, alpha=None, seed=0), y, 10)
    mild = _skew(assign_sites(y, SITES, alpha=5.0, seed=0), y, 10)
    strong = _skew(assign_sites(y, SITES, alpha=0.1, seed=0), y, 10)
    # Measured over seeds 0-4: IID about 0.05 (sampling noise), alpha=5 about 0.15, alpha=0.1 about 0.63.
    assert iid < 0.08 < mild < 0.3 < strong


def test_iid_sites_are_even_and_stratified(breast_cancer: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = breast_cancer
    assignment = assign_sites(y, SITES, alpha=None, seed=1)
    sizes = [sum(len(i) for i in s.values()) for s in assignment.values()]
    assert max(sizes) - min(sizes) <= 1
    for splits in assignment.values():
        n = sum(len(i) for i in splits.values())
        site_share = np.concatenate(list(splits.values()))
        # Stratified: each split's malignant count is within one record of its proportional share.
        malignant = int((y[site_share] == 0).sum())
        for idx in splits.values():
            assert abs(int((y[idx] == 0).sum()) - malignant * len(idx) / n) <= 1


def test_minimum_per_site_is_enforced(breast_cancer: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = breast_cancer
    assignment = assign_sites(y, SITES, alpha=0.3, seed=0, min_per_site=40)
    assert min(len(s["train"]) for s in assignment.values()) >= 40
    with pytest.raises(ConfigError, match="training records"):
        assign_sites(y, SITES, alpha=None, seed=0, min_per_site=100)
    with pytest.raises(ConfigError, match="alpha"):
        assign_sites(y, SITES, alpha=0.01, seed=0, min_per_site=60)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": None, "val_fraction": 0.5, "test_fraction": 0.5}, "fraction"),
        ({"alpha": None, "min_per_site": 0}, "min_per_site"),
    ],
)
def test_bad_split_arguments(
    breast_cancer: tuple[np.ndarray, np.ndarray], kwargs: dict[str, object], match: str
) -> None:
    _, y = breast_cancer
    with pytest.raises(ConfigError, match=match):
        assign_sites(y, SITES, seed=0, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("sites", [[], ["a", "a"], ["../etc"], ["has space"]])
def test_bad_site_names(breast_cancer: tuple[np.ndarray, np.ndarray], sites: list[str]) -> None:
    _, y = breast_cancer
    with pytest.raises(ConfigError, match="sites"):
        assign_sites(y, sites, alpha=None, seed=0)


def test_site_folders_round_trip(tmp_path: Path, breast_cancer: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = breast_cancer
    task = load_task("breast_cancer")
    splits = split_sites(x, y, SITES[:3], alpha=0.5, seed=7)
    folders = write_site_folders(tmp_path, splits, task.schema)  # the data set name is inferred
    assert sorted(folders) == SITES[:3]
    for site, folder in folders.items():
        assert sorted(p.name for p in folder.iterdir()) == [
            "manifest.json",
            "test.csv",
            "train.csv",
            "val.csv",
        ]
        for split in SPLITS:
            features, labels = read_split(folder / f"{split}.csv", task.schema)
            # Bit-exact: '%.9g' round-trips float32.
            assert np.array_equal(features, splits[site][split][0])
            assert np.array_equal(labels, splits[site][split][1])
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["dataset"] == "breast_cancer"
        assert manifest["schema_fingerprint"] == task.schema.fingerprint()
        assert manifest["splits"]["train"] == {
            "count": len(splits[site]["train"][1]),
            "label_histogram": label_histogram(splits[site]["train"][1], 2),
        }
        assert len(task.load_data(folder).train) == len(splits[site]["train"][1])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="already exists"):
        write_site_folders(tmp_path, splits, task.schema)
    write_site_folders(tmp_path, splits, task.schema, overwrite=True)


def test_centralized_baseline_learns(breast_cancer: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = breast_cancer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = centralized_baseline(
            bc_task.TASK, x[:450], y[:450], x[450:], y[450:], bc_task.DEFAULT_SETTINGS, epochs=5
        )
    finally:
        torch.set_num_threads(threads)
    assert result.num_samples == len(y) - 450
    assert result.accuracy > 0.9


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cohort")
    data_cmd.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_split_and_describe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    out = tmp_path / "sites"
    args = parser.parse_args(
        ["data", "split", "--dataset", "digits", "--out", str(out), "--num-sites", "3", "--alpha", "0.5"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("digits: 1797 records over 3 sites (Dirichlet alpha=0.5, seed 42)")
    assert [line.split(":")[0] for line in printed[1:]] == ["hospital-1", "hospital-2", "hospital-3"]
    assert sorted(p.name for p in out.iterdir()) == ["hospital-1", "hospital-2", "hospital-3"]
    counts = [
        json.loads((out / s / "manifest.json").read_text())["splits"] for s in sorted(p.name for p in out.iterdir())
    ]
    assert sum(c[s]["count"] for c in counts for s in SPLITS) == 1797

    args = parser.parse_args(["data", "describe", str(out / "hospital-2")])
    assert args.func(args) == 0
    described = capsys.readouterr().out
    assert "task digits" in described
    assert "train:" in described
    assert "test:" in described

    args = parser.parse_args(["data", "split", "--dataset", "digits", "--out", str(out), "--num-sites", "3"])
    with pytest.raises(ConfigError, match="already exists"):
        args.func(args)


def test_cli_named_sites_iid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    args = parser.parse_args(
        ["data", "split", "--dataset", "breast_cancer", "--out", str(tmp_path), "--sites", "a,b", "--iid"]
    )
    assert args.func(args) == 0
    assert "(IID, seed 42)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "split", "--dataset", "breast_cancer", "--out", "x", "--iid", "--alpha", "1"])
    capsys.readouterr()


def test_cli_describe_checks_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    args = parser.parse_args(["data", "describe", str(tmp_path)])
    with pytest.raises(ConfigError, match="--task"):
        args.func(args)
    x, y, schema = load_source("breast_cancer")
    splits = split_sites(x, y, ["solo"], alpha=None, seed=0)
    folder = write_site_folders(tmp_path, splits, schema, dataset="custom")["solo"]
    args = parser.parse_args(["data", "describe", str(folder), "--task", "breast_cancer"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    histogram = label_histogram(splits["solo"]["test"][1], 2)
    assert f"test: {len(splits['solo']['test'][1])} records, labels [0:{histogram[0]} 1:{histogram[1]}]" in out
    # Only counts are printed: no feature value of any record.
    assert f"{x[0, 0]:.9g}" not in out
    args = parser.parse_args(["data", "describe", str(folder), "--task", "digits"])
    with pytest.raises(DataError, match="header column 1 should be 'px_0_0'"):
        args.func(args)
    args = parser.parse_args(["data", "describe", str(folder), "--task", "no_such_task"])
    with pytest.raises(ConfigError, match="--task"):
        args.func(args)
