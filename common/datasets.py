"""Demo data: scikit-learn's bundled data sets, divided over simulated sites, and reference trainings on them.

Nothing is downloaded: ``load_breast_cancer`` and ``load_digits`` ship inside scikit-learn, which is imported
only when a source data set is loaded, so participants and the coordinator never need it.

Site division (:func:`assign_sites`) comes in three flavours:

* IID (``alpha=None``): shuffle and deal the records evenly over the sites;
* quantity skew (``quantity_alpha > 0``): the sites' shares of the records are drawn from Dirichlet(quantity_alpha),
  and records are dealt at random, so sites differ in size but not in label mix;
* label skew (``alpha > 0``): for each class, the shares going to the sites are drawn from Dirichlet(alpha)
  (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"); the smaller alpha, the
  fewer classes a site sees. Draws are repeated, deterministically from the seed, until every site gets
  ``min_per_site`` training records.

Then each site's own records are split into train/val/test, stratified by label where the counts allow.
Everything is deterministic for a fixed seed (one ``np.random.default_rng(seed)`` per call).

Reference trainings: :func:`centralized_baseline` trains on pooled data (the yardstick that federated accuracy
is held to), and :func:`simulate_fedavg` runs FedAvg in one process without a network; the built-in tasks'
default hyper-parameters were chosen with them.
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from common.errors import ConfigError, DataError
from common.names import RULE, is_name
from common.tasks.base import SPLITS, DataSchema, EvalResult, SiteData, Task, TrainSettings, load_task, round_seed
from common.tasks.csv_split import FloatArray, LabelArray

IndexArray = npt.NDArray[np.int64]
Split = tuple[FloatArray, LabelArray]

SOURCES = ("breast_cancer", "digits")
DEFAULT_MIN_PER_SITE = 10
# Enough redraws for any setting with a realistic chance of success; beyond that the request is infeasible.
MAX_DIRICHLET_DRAWS = 10_000
MANIFEST = "manifest.json"


def snake_case(name: str) -> str:
    """``"mean concave points"`` -> ``"mean_concave_points"``: lower case, other character runs -> ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def load_source(name: str) -> tuple[FloatArray, LabelArray, DataSchema]:
    """Features (float32), labels (int64) and the built-in task's schema for source data set ``name``.

    Features are float32 because that is what a site's loader produces from its CSV files, so a pooled
    baseline sees exactly the values the sites see.
    """
    if name not in SOURCES:
        raise ConfigError(f"dataset: unknown source {name!r}; expected one of {', '.join(SOURCES)}")
    from sklearn import datasets as skd  # deferred: importing scikit-learn takes a second

    bunch = skd.load_breast_cancer() if name == "breast_cancer" else skd.load_digits()
    schema = load_task(name).schema
    if name == "breast_cancer":
        derived = tuple(snake_case(str(f)) for f in bunch.feature_names)
        if derived != schema.features:
            raise DataError(f"scikit-learn's {name} feature names no longer match the task schema")
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    if x.shape[1] != len(schema.features) or int(y.max()) >= schema.num_classes:
        raise DataError(f"scikit-learn's {name} data no longer fit the task schema")
    return x, y, schema


def check_site_names(sites: Sequence[str]) -> None:
    """Site names become folder names: they must be unique and made of letters, digits, '.', '_' and '-'."""
    if not sites:
        raise ConfigError("sites: at least one site is needed")
    for site in sites:
        if not is_name(site):
            raise ConfigError(f"sites: {site!r} is not a valid site name ({RULE})")
    if len(set(sites)) != len(sites):
        raise ConfigError("sites: site names must be unique")


def _count(n: int, fraction: float) -> int:
    return int(n * fraction + 0.5)  # round half up, the same for every caller


def train_count(n: int, val_fraction: float, test_fraction: float) -> int:
    """How many of a site's ``n`` records stay in its train split."""
    return n - _count(n, test_fraction) - _count(n, val_fraction)


def _allocate(counts: npt.NDArray[np.int64], total: int) -> npt.NDArray[np.int64]:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder); never above a count."""
    if total == 0 or counts.sum() == 0:
        return np.zeros_like(counts)
    quota = counts * total / counts.sum()
    take: npt.NDArray[np.int64] = np.floor(quota).astype(np.int64)
    # Stable sort: ties go to the lower class index, so the result is deterministic.
    for c in np.argsort(-(quota - take), kind="stable")[: total - int(take.sum())]:
        take[c] += 1
    return take


def _split_site(
    idx: IndexArray, y: LabelArray, rng: np.random.Generator, val_fraction: float, test_fraction: float
) -> dict[str, IndexArray]:
    """Stratified train/val/test split of one site's records (index array)."""
    idx = rng.permutation(idx)
    classes = np.unique(y[idx])
    by_class = [idx[y[idx] == c] for c in classes]
    counts = np.array([len(b) for b in by_class], dtype=np.int64)
    n_test = _allocate(counts, _count(len(idx), test_fraction))
    n_val = _allocate(counts - n_test, _count(len(idx), val_fraction))
    parts: dict[str, list[IndexArray]] = {split: [] for split in SPLITS}
    for members, t, v in zip(by_class, n_test, n_val, strict=True):
        parts["test"].append(members[:t])
        parts["val"].append(members[t : t + v])
        parts["train"].append(members[t + v :])
    # Shuffle within each split so that the files are not sorted by label.
    return {split: rng.permutation(np.concatenate(p)).astype(np.int64) for split, p in parts.items()}


def stratified_split(
    y: LabelArray, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.2
) -> dict[str, IndexArray]:
    """Indices of one site's records for train/val/test, stratified by label where the counts allow."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError("val_fraction, test_fraction: each must be in [0, 1) and their sum below 1")
    rng = np.random.default_rng(seed)
    return _split_site(np.arange(len(y), dtype=np.int64), y, rng, val_fraction, test_fraction)


def assign_sites(
    y: LabelArray,
    sites: Sequence[str],
    *,
    alpha: float | None,
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    min_per_site: int = DEFAULT_MIN_PER_SITE,
    quantity_alpha: float | None = None,
) -> dict[str, dict[str, IndexArray]]:
    """Indices of ``y`` for every site and split; every record lands in exactly one (site, split).

    ``alpha=None`` is IID (or quantity skew with ``quantity_alpha``); ``alpha > 0`` is Dirichlet label skew. Skewed
    draws are repeated until each site has at least ``min_per_site`` training records (ConfigError when that looks
    impossible).
    """
    check_site_names(sites)
    if alpha is not None and not alpha > 0:
        raise ConfigError("alpha: must be > 0 (or None for IID)")
    if quantity_alpha is not None and (not quantity_alpha > 0 or alpha is not None):
        raise ConfigError("quantity_alpha: must be > 0, and not combined with alpha (label skew)")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError("val_fraction, test_fraction: each must be in [0, 1) and their sum below 1")
    if min_per_site < 1:
        raise ConfigError("min_per_site: must be at least 1")
    n, k = len(y), len(sites)
    rng = np.random.default_rng(seed)

    def enough(parts: list[IndexArray]) -> bool:
        return all(train_count(len(p), val_fraction, test_fraction) >= min_per_site for p in parts)

    if alpha is None and quantity_alpha is None:
        parts = np.array_split(rng.permutation(n).astype(np.int64), k)
        if not enough(parts):
            raise ConfigError(f"sites: {n} records cannot give {k} sites {min_per_site} training records each")
    elif alpha is None:
        for _ in range(MAX_DIRICHLET_DRAWS):
            cuts = np.round(np.cumsum(rng.dirichlet(np.full(k, quantity_alpha)))[:-1] * n).astype(np.int64)
            parts = np.split(rng.permutation(n).astype(np.int64), cuts)
            if enough(parts):
                break
        else:
            raise ConfigError(
                f"quantity_alpha: no Dirichlet({quantity_alpha}) draw gave each of {k} sites {min_per_site} training "
                "records; use a larger value, fewer sites or a smaller minimum"
            )
    else:
        for _ in range(MAX_DIRICHLET_DRAWS):
            shares: list[list[IndexArray]] = [[] for _ in range(k)]
            for c in np.unique(y):
                members = rng.permutation(np.flatnonzero(y == c)).astype(np.int64)
                cuts = np.round(np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1] * len(members)).astype(np.int64)
                for share, piece in zip(shares, np.split(members, cuts), strict=True):
                    share.append(piece)
            parts = [np.concatenate(s) for s in shares]
            if enough(parts):
                break
        else:
            raise ConfigError(
                f"alpha: no Dirichlet({alpha}) draw gave each of {k} sites {min_per_site} training records; "
                "use a larger alpha, fewer sites or a smaller minimum"
            )
    return {site: _split_site(p, y, rng, val_fraction, test_fraction) for site, p in zip(sites, parts, strict=True)}


def split_sites(
    x: FloatArray,
    y: LabelArray,
    sites: Sequence[str],
    *,
    alpha: float | None,
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    min_per_site: int = DEFAULT_MIN_PER_SITE,
    quantity_alpha: float | None = None,
) -> dict[str, dict[str, Split]]:
    """``{site: {"train"|"val"|"test": (x, y)}}``; see :func:`assign_sites` for how records are divided."""
    if len(x) != len(y):
        raise ConfigError(f"x and y differ in length ({len(x)} and {len(y)})")
    assignment = assign_sites(
        y,
        sites,
        alpha=alpha,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        min_per_site=min_per_site,
        quantity_alpha=quantity_alpha,
    )
    return {site: {s: (x[i], y[i]) for s, i in splits.items()} for site, splits in assignment.items()}


def label_histogram(y: LabelArray, num_classes: int) -> list[int]:
    """Count of each class 0..num_classes-1."""
    return [int(c) for c in np.bincount(y, minlength=num_classes)[:num_classes]]


def write_split(path: Path, split: Split, schema: DataSchema) -> None:
    """One CSV file: the schema header, then one row per record; '%.9g' round-trips float32 exactly."""
    x, y = split
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(schema.columns())
        for row, label in zip(x.tolist(), y.tolist(), strict=True):
            writer.writerow([*(f"{v:.9g}" for v in row), str(label)])
    tmp.replace(path)  # a half-written file never carries the final name


def write_site_folders(
    out_dir: Path,
    splits: Mapping[str, Mapping[str, Split]],
    schema: DataSchema,
    *,
    dataset: str | None = None,
    overwrite: bool = False,
    extra: Mapping[str, object] | None = None,
) -> dict[str, Path]:
    """Write ``out_dir/<site>/{train,val,test}.csv`` and ``manifest.json`` (counts only) for every site.

    ``dataset`` names the data in the manifest; by default the built-in task whose schema this is, or
    ``"custom"``; ``extra`` adds entries to every manifest (the task to use, the label values). Refuses
    (ConfigError) to replace existing site files unless ``overwrite``. Returns each site's folder.
    """
    check_site_names(list(splits))
    name = dataset or next((s for s in SOURCES if load_task(s).schema == schema), "custom")
    out_dir = Path(out_dir)
    names = [f"{s}.csv" for s in SPLITS] + [MANIFEST]
    if not overwrite:
        for site in splits:
            clash = [n for n in names if (out_dir / site / n).exists()]
            if clash:
                raise ConfigError(f"out: {out_dir / site / clash[0]} already exists (use --force to replace)")
    folders: dict[str, Path] = {}
    for site, site_splits in splits.items():
        folder = out_dir / site
        folder.mkdir(parents=True, exist_ok=True)
        counts: dict[str, dict[str, object]] = {}
        for split in SPLITS:
            x, y = site_splits[split]
            write_split(folder / f"{split}.csv", (x, y), schema)
            counts[split] = {"count": len(y), "label_histogram": label_histogram(y, schema.num_classes)}
        manifest = {
            "dataset": name,
            "site": site,
            "columns": len(schema.columns()),
            "schema_fingerprint": schema.fingerprint(),
            "splits": counts,
            **(extra or {}),
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        folders[site] = folder
    return folders


def _pooled_site(task: Task, train: Split, test: Split) -> SiteData:
    """Load pooled arrays through the task's own loader, so they get the same (site-local) scaling rule."""
    empty = (train[0][:0], train[1][:0])
    with tempfile.TemporaryDirectory(prefix="cohort-pooled-") as tmp:
        folders = write_site_folders(Path(tmp), {"pooled": {"train": train, "val": empty, "test": test}}, task.schema)
        return task.load_data(folders["pooled"])


def centralized_baseline(
    task: Task,
    x_train: FloatArray,
    y_train: LabelArray,
    x_test: FloatArray,
    y_test: LabelArray,
    settings: TrainSettings,
    epochs: int,
) -> EvalResult:
    """Train ``task``'s model (seed ``settings.seed``) on pooled data for ``epochs``; evaluate on pooled test.

    The pooled set is treated as one big site: scaled with its own train statistics, like any site.
    """
    data = _pooled_site(task, (x_train, y_train), (x_test, y_test))
    model = task.build_model(settings.seed)
    task.train(model, data, replace(settings, local_epochs=epochs))
    return task.evaluate(model, data.test)


def fedavg(
    task: Task,
    sites: Mapping[str, SiteData],
    settings: TrainSettings,
    rounds: int,
    after_round: Callable[[torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """FedAvg without a network: each round every site trains from the global weights, and the new global
    model is the train-sample-weighted mean of the site models (every entry as float32, like the coordinator).

    Returns the final global model; ``after_round`` sees the global model after each round.
    """
    if rounds < 1:
        raise ConfigError("rounds: must be at least 1")
    model = task.build_model(settings.seed)
    global_state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    for number in range(1, rounds + 1):
        total = 0
        summed = {k: torch.zeros_like(v) for k, v in global_state.items()}
        round_settings = replace(settings, seed=round_seed(settings.seed, number))
        for data in sites.values():
            model.load_state_dict(global_state)
            result = task.train(model, data, round_settings)
            for k, v in model.state_dict().items():
                summed[k] += v.float() * result.num_samples
            total += result.num_samples
        global_state = {k: v / total for k, v in summed.items()}
        model.load_state_dict(global_state)
        if after_round is not None:
            after_round(model)
    return model


def simulate_fedavg(
    task: Task, sites: Mapping[str, SiteData], settings: TrainSettings, rounds: int
) -> list[EvalResult]:
    """:func:`fedavg`, returning for each round the global model's test result pooled over all sites' test splits."""
    history: list[EvalResult] = []
    fedavg(
        task,
        sites,
        settings,
        rounds,
        lambda model: history.append(pooled_evaluation(task, model, [d.test for d in sites.values()])),
    )
    return history


def pooled_evaluation(
    task: Task, model: torch.nn.Module, datasets: Sequence[Dataset[tuple[torch.Tensor, torch.Tensor]]]
) -> EvalResult:
    """Sample-weighted mean of ``task.evaluate`` over several test sets (each site evaluates its own)."""
    results = [task.evaluate(model, d) for d in datasets]
    n = sum(r.num_samples for r in results)
    if n == 0:
        return EvalResult(0, 0.0, 0.0)
    return EvalResult(
        num_samples=n,
        loss=sum(r.loss * r.num_samples for r in results) / n,
        accuracy=sum(r.accuracy * r.num_samples for r in results) / n,
    )
