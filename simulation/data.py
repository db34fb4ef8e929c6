"""Where a simulation's virtual sites get their data: a directory of site folders, or a data set split on the fly.

Every virtual site ends up with a folder ``<site>/{train,val,test}.csv`` that the task's own loader reads, exactly as
a real site's daemon reads its ``data_dir``. A data set split on the fly is written in the same format as
``cohort data split``:

- while every site can have its own records (at least ``min_per_site`` training records each), the records are
  partitioned with :func:`common.datasets.split_sites` (IID, or Dirichlet label skew ``alpha``), the very split a
  real federation's sites would be given;
- beyond that (1,000 sites over breast_cancer's 569 records), each site draws its records with replacement from the
  pooled data: its label mix from Dirichlet(``alpha``) (uniform without ``alpha``) and its size from a log-normal
  around the mean share (``quantity_skew`` is the log-normal's sigma; 0: equal sizes). Sites then share records, which
  a partition cannot give that many sites; the run's ``data.json`` says which kind of split was used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.datasets import (
    DEFAULT_MIN_PER_SITE,
    SOURCES,
    Split,
    load_source,
    split_sites,
    train_count,
    write_site_folders,
)
from common.errors import ConfigError
from common.tasks.base import DataSchema
from common.tasks.csv_split import read_split

VAL_FRACTION, TEST_FRACTION = 0.15, 0.2


@dataclass(frozen=True)
class DataPlan:
    """How the virtual sites' data came about (written to ``data.json`` beside the site folders)."""

    source: str
    sites: int
    kind: str  # "folders" (given), "partition" (disjoint split) or "resampled" (drawn with replacement)
    alpha: float | None
    quantity_skew: float
    seed: int
    records_per_site: float


def site_names(n: int) -> list[str]:
    """``site-00000`` ... : names that sort in site order and are valid folder and certificate names."""
    width = max(5, len(str(n - 1)))
    return [f"site-{i:0{width}d}" for i in range(n)]


def given_folders(root: Path, n: int | None) -> dict[str, Path]:
    """The site folders under ``root`` (each with train.csv, val.csv, test.csv), the first ``n`` in name order."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / "train.csv").exists())
    if not folders:
        raise ConfigError(f"--data {root}: no site folders with train.csv, val.csv and test.csv")
    if n is not None:
        if n > len(folders):
            raise ConfigError(f"--sites {n}: {root} has only {len(folders)} site folders")
        folders = folders[:n]
    return {p.name: p for p in folders}


def load_pool(source: str, schema: DataSchema) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a built-in data set (by name) or of one CSV file with the task's columns."""
    if source in SOURCES:
        x, y, source_schema = load_source(source)
        if source_schema != schema:
            raise ConfigError(f"--data {source}: that data set does not fit the job's task schema")
        return x, y
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--data {source}: neither a built-in data set ({', '.join(SOURCES)}) nor a CSV file")
    return read_split(path, schema)


def split_on_the_fly(
    out: Path,
    source: str,
    schema: DataSchema,
    n: int,
    *,
    alpha: float | None,
    quantity_skew: float,
    seed: int,
    min_per_site: int = DEFAULT_MIN_PER_SITE,
) -> tuple[dict[str, Path], DataPlan]:
    """Write ``n`` site folders under ``out`` from ``source``; see the module docstring for how."""
    if n < 1:
        raise ConfigError("--sites: at least one site")
    if quantity_skew < 0:
        raise ConfigError("--quantity-skew: must be >= 0")
    x, y = load_pool(source, schema)
    names = site_names(n)
    share = len(y) / n
    if train_count(int(share), VAL_FRACTION, TEST_FRACTION) >= min_per_site and quantity_skew == 0:
        splits = split_sites(x, y, names, alpha=alpha, seed=seed, min_per_site=min_per_site)
        kind = "partition"
    else:
        splits = _resampled(x, y, names, schema.num_classes, alpha, quantity_skew, seed, min_per_site)
        kind = "resampled"
    folders = write_site_folders(out, splits, schema, overwrite=True)
    records = sum(len(s["train"][1]) + len(s["val"][1]) + len(s["test"][1]) for s in splits.values()) / n
    plan = DataPlan(source, n, kind, alpha, quantity_skew, seed, round(records, 2))
    (out / "data.json").write_text(json.dumps(asdict(plan), indent=2) + "\n")
    return folders, plan


def _resampled(
    x: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    num_classes: int,
    alpha: float | None,
    quantity_skew: float,
    seed: int,
    min_per_site: int,
) -> dict[str, dict[str, Split]]:
    """Each site draws its own records with replacement: label mix Dirichlet(alpha), size log-normal(sigma)."""
    if alpha is not None and not alpha > 0:
        raise ConfigError("--alpha: must be > 0")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in range(num_classes)]
    present = [c for c in range(num_classes) if len(by_class[c])]
    prior = np.array([len(by_class[c]) for c in present], dtype=np.float64)
    prior /= prior.sum()
    # At least enough records for min_per_site training records after the val/test split.
    smallest = min_per_site
    while train_count(smallest, VAL_FRACTION, TEST_FRACTION) < min_per_site:
        smallest += 1
    mean = max(smallest, len(y) // len(names))
    out: dict[str, dict[str, Split]] = {}
    for site in names:
        size = mean if quantity_skew == 0 else int(rng.lognormal(np.log(mean), quantity_skew))
        size = max(smallest, size)
        mix = prior if alpha is None else rng.dirichlet(alpha * len(present) * prior)
        counts = rng.multinomial(size, mix)
        idx = np.concatenate([rng.choice(by_class[c], k) for c, k in zip(present, counts, strict=True) if k])
        idx = rng.permutation(idx)
        n_test = int(size * TEST_FRACTION + 0.5)
        n_val = int(size * VAL_FRACTION + 0.5)
        parts = {"test": idx[:n_test], "val": idx[n_test : n_test + n_val], "train": idx[n_test + n_val :]}
        out[site] = {split: (x[i], y[i]) for split, i in parts.items()}
    return out


def site_folders(
    data: str,
    out: Path,
    schema: DataSchema,
    n: int | None,
    *,
    alpha: float | None,
    quantity_skew: float,
    seed: int,
) -> tuple[dict[str, Path], DataPlan]:
    """Site folders for ``--data``: a directory of site folders as it is, or a data set split into ``n`` sites."""
    path = Path(data)
    if path.is_dir():
        folders = given_folders(path, n)
        return folders, DataPlan(str(path), len(folders), "folders", None, 0.0, seed, 0.0)
    if n is None:
        raise ConfigError("--sites: how many virtual sites to split the data set over")
    return split_on_the_fly(out, data, schema, n, alpha=alpha, quantity_skew=quantity_skew, seed=seed)


def describe(plan: DataPlan, folders: Mapping[str, Path]) -> str:
    how = {"folders": "site folders", "partition": "a disjoint split", "resampled": "records drawn with replacement"}
    skew = f"Dirichlet alpha={plan.alpha}" if plan.alpha is not None else "IID labels"
    return f"{len(folders)} virtual sites from {plan.source} ({how[plan.kind]}; {skew})"
