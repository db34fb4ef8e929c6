"""Any CSV file as a source data set for ``cohort data split --csv``: numeric features, one label column.

The file needs a header row. The label column (``--label``) may hold class indices 0..K-1 or any other values
(strings, other integers), which become class indices in sorted order; the mapping is written to each site's
``manifest.json`` (``label_values``). Every other column is a feature and must be a finite number in every row. The
schema written to the site folders has the features in the file's order and the label last, as tasks expect.

Errors name the file, line and column, never a cell's value (the file may be a site's private data).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.errors import DataError
from common.tasks.base import DataSchema
from common.tasks.csv_split import FloatArray, LabelArray, parse_finite

MAX_CLASSES = 1000
IndexArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class CsvSource:
    x: FloatArray
    y: LabelArray
    schema: DataSchema
    label_values: tuple[str, ...]  # label_values[i] is the file's text for class index i


def read_csv_source(path: Path, label: str, label_values: tuple[str, ...] | None = None) -> CsvSource:
    """Read ``path``; ``label_values`` (from the training file) fixes the class order of a separate test file."""
    if not path.is_file():
        raise DataError(f"{path}: file is missing")
    rows: list[list[float]] = []
    labels: list[str] = []
    problem = None
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = [c.strip() for c in next(reader, [])]
            if not header:
                raise DataError(f"{path}: file is empty; expected a header row")
            if label not in header:
                raise DataError(f"{path}: no column named {label!r} in the header")
            if len(set(header)) != len(header) or not all(header):
                raise DataError(f"{path}: header has empty or repeated column names")
            at = header.index(label)
            features = [c for i, c in enumerate(header) if i != at]
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    problem = f"line {reader.line_num}: expected {len(header)} fields, found {len(row)}"
                    break
                values = []
                for i, cell in enumerate(row):
                    if i == at:
                        continue
                    value = parse_finite(cell)
                    if value is None:
                        problem = f"line {reader.line_num}: column '{header[i]}' is not a finite number"
                        break
                    values.append(value)
                if problem is not None:
                    break
                rows.append(values)
                labels.append(row[at].strip())
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except csv.Error:
        problem = "is not a readable CSV file"
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    if not rows:
        raise DataError(f"{path}: has no records")
    classes = label_values or _label_order(labels)
    index = {v: i for i, v in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{path}: label column '{label}' has {len(unknown)} values the training file does not have")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{path}: label column '{label}' has more than {MAX_CLASSES} distinct values")
    x = np.asarray(rows, dtype=np.float64)
    if np.abs(x).max() > np.finfo(np.float32).max:
        raise DataError(f"{path}: a value is too large for float32")
    y = np.asarray([index[v] for v in labels], dtype=np.int64)
    schema = DataSchema(features=tuple(features), label=label, num_classes=len(classes))
    return CsvSource(x.astype(np.float32), y, schema, classes)


def _label_order(labels: list[str]) -> tuple[str, ...]:
    """Class indices for the label texts: themselves if they are 0..K-1 already, else sorted (numbers by value)."""
    distinct = set(labels)
    numbers = {v: parse_finite(v) for v in distinct}
    if all(n is not None and n.is_integer() for n in numbers.values()):
        by_value = sorted(distinct, key=lambda v: float(numbers[v] or 0.0))
        return tuple(by_value)
    return tuple(sorted(distinct))


def divide_like(y_test: LabelArray, train_labels: Mapping[str, LabelArray], seed: int) -> dict[str, IndexArray]:
    """Indices of a separate test file's records for each site: each class is shared out in proportion to the sites'
    training records of that class (largest remainder; equal shares for a class no site trains on), so every site
    is tested on its own label mix. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    sites = list(train_labels)
    taken: dict[str, list[IndexArray]] = {s: [] for s in sites}
    for c in np.unique(y_test):
        members = rng.permutation(np.flatnonzero(y_test == c)).astype(np.int64)
        weights = np.array([np.count_nonzero(train_labels[s] == c) for s in sites], dtype=np.float64)
        if weights.sum() == 0:
            weights[:] = 1.0
        quota = weights / weights.sum() * len(members)
        counts = np.floor(quota).astype(np.int64)
        for i in np.argsort(-(quota - counts), kind="stable")[: len(members) - int(counts.sum())]:
            counts[i] += 1
        for site, piece in zip(sites, np.split(members, np.cumsum(counts)[:-1]), strict=True):
            taken[site].append(piece)
    return {
        s: rng.permutation(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for s, p in taken.items()
    }
