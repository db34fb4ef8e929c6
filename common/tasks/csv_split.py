"""Reading a site's CSV split files, checked against the task schema.

A site's folder holds ``train.csv``, ``val.csv`` and ``test.csv``. Each starts with a header row equal to
the task schema's columns, in order (features first, the label last); every other row is one record of
numbers, the label being an integer class index.

Error messages name the file, the line and the schema column, but never a cell's value or any other record
content: raw records must not leave a site, and error text can end up in logs or be sent to the coordinator.
For the same reason a parse failure is raised outside the ``except`` block that caught it, so no exception
that quotes the value is chained onto the ``DataError``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.errors import DataError
from common.tasks.base import DataSchema

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]


def parse_finite(text: str) -> float | None:
    """The finite float in ``text``, or None; never raises, so no exception quoting the value escapes."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_split(path: Path, schema: DataSchema) -> tuple[FloatArray, LabelArray]:
    """Read one split file into ``(features float32 [n, f], labels int64 [n])``, checked against ``schema``.

    Raises DataError naming the file (and the line and column where they apply) when the file is missing, is
    not UTF-8 text, has the wrong header, a row of the wrong length, a non-numeric or non-finite feature, or a
    label that is not a class index below ``schema.num_classes``. Blank lines are skipped.
    """
    if not path.is_file():
        raise DataError(f"{path}: file is missing; expected a CSV file with the task schema's header")
    columns = schema.columns()
    width = len(columns)
    rows: list[list[float]] = []
    labels: list[int] = []
    lines: list[int] = []
    problem: str | None = None
    try:
        # utf-8-sig tolerates the byte-order mark that spreadsheets put at the start of exported CSV files.
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                problem = "file is empty; expected a header row"
            else:
                problem = _check_header([cell.strip() for cell in header], columns)
            if problem is None:
                for row in reader:
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    problem = _parse_row(row, columns, width, schema.num_classes, rows, labels)
                    if problem is not None:
                        problem = f"line {reader.line_num}: {problem}"
                        break
                    lines.append(reader.line_num)
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except csv.Error:
        problem = "is not a readable CSV file"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror})"
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    features = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(schema.features))
    # A value beyond float32's range would become infinite in the model's input.
    too_big = np.argwhere(np.abs(features) > np.finfo(np.float32).max)
    if len(too_big):
        row_index, column = too_big[0]
        raise DataError(f"{path}: line {lines[row_index]}: column '{columns[column]}' is too large for float32")
    return features.astype(np.float32), np.asarray(labels, dtype=np.int64)


def _check_header(header: list[str], columns: tuple[str, ...]) -> str | None:
    # The header cell found is never quoted back: in a file without a header, the first row is a record.
    for position, expected in enumerate(columns, start=1):
        if position > len(header):
            return f"header has only {len(header)} columns; column {position} should be '{expected}'"
        if header[position - 1] != expected:
            return f"header column {position} should be '{expected}' (the schema's columns, in order)"
    if len(header) > len(columns):
        return f"header has {len(header)} columns; the schema has {len(columns)} (last: '{columns[-1]}')"
    return None


def _parse_row(
    row: list[str],
    columns: tuple[str, ...],
    width: int,
    num_classes: int,
    rows: list[list[float]],
    labels: list[int],
) -> str | None:
    if len(row) != width:
        return f"expected {width} fields, found {len(row)}"
    values: list[float] = []
    for name, cell in zip(columns[:-1], row[:-1], strict=True):
        value = parse_finite(cell)
        if value is None:
            return f"column '{name}' is not a finite number"
        values.append(value)
    label = parse_finite(row[-1])
    if label is None or not label.is_integer() or not 0 <= label < num_classes:
        return f"label column '{columns[-1]}' must be an integer class index from 0 to {num_classes - 1}"
    rows.append(values)
    labels.append(int(label))
    return None
