"""``cohort data``: prepare demo site folders and check a site's data.

* ``cohort data split --dataset breast_cancer --out DIR --num-sites 5 --alpha 0.5 --seed 42`` divides one
  of the bundled source data sets over simulated sites and writes one folder per site (see
  :mod:`common.datasets`); ``--csv FILE --label COLUMN [--test-csv FILE]`` does the same for any CSV file
  (:mod:`common.csv_source`), with label skew (``--alpha``), quantity skew (``--quantity-alpha``) or IID.
* ``cohort data fraud --out DIR`` writes the four banks' synthetic transactions (:mod:`common.fraud_data`).
* ``cohort data describe DIR [--task NAME]`` loads one site folder with the task's own loader (so the files
  are checked against the schema) and prints per-split record counts and label histograms. Without ``--task``
  it uses the task named in the folder's ``manifest.json``, or the built-in task whose schema the CSV header
  matches, or (for a folder written by ``split --csv``) the schema in the header itself. It prints counts
  only, never records, so it is safe to run at a site and to share the output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.csv_source import divide_like, read_csv_source
from common.datasets import (
    DEFAULT_MIN_PER_SITE,
    MANIFEST,
    SOURCES,
    label_histogram,
    load_source,
    split_sites,
    write_site_folders,
)
from common.errors import ConfigError, DataError
from common.tasks.base import BUILTIN_TASKS, SPLITS, DataSchema, SiteData, load_task
from common.tasks.tabular import TabularTask, dataset_tensors


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``data split`` and ``data describe`` to the ``cohort`` command line."""
    data = subparsers.add_parser("data", help="prepare demo site data and check a site's data folder")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    split = commands.add_parser(
        "split",
        help="divide a bundled data set or any CSV file over simulated sites",
        description="Divide one of scikit-learn's bundled data sets, or any CSV file with numeric features and a "
        "label column, over sites, one folder per site with train.csv, val.csv, test.csv and manifest.json. "
        "Nothing is downloaded.",
    )
    source = split.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=SOURCES, help="bundled source data set")
    source.add_argument("--csv", type=Path, help="a CSV file with a header row: numeric features and a label column")
    split.add_argument("--label", help="with --csv: the label column (class indices 0..K-1, or any values)")
    split.add_argument(
        "--test-csv",
        type=Path,
        help="with --csv: a separate test file; it becomes the sites' test splits (each site's share follows its "
        "own label mix) and --csv gives train and val only",
    )
    split.add_argument("--task", help="with --csv: the task that will read these folders (written to manifest.json)")
    split.add_argument("--out", required=True, type=Path, help="folder to create the site folders in")
    who = split.add_mutually_exclusive_group(required=True)
    who.add_argument("--sites", help="comma-separated site names, e.g. a,b,c")
    who.add_argument("--num-sites", type=int, help="number of sites, named PREFIX1 .. PREFIXN")
    split.add_argument("--prefix", default="hospital-", help="name prefix with --num-sites (default: hospital-)")
    skew = split.add_mutually_exclusive_group()
    skew.add_argument("--iid", action="store_true", help="deal records evenly at random (the default)")
    skew.add_argument("--alpha", type=float, help="Dirichlet label skew; smaller means more skewed (e.g. 0.5)")
    skew.add_argument(
        "--quantity-alpha", type=float, help="Dirichlet quantity skew: site sizes differ, label mix does not"
    )
    split.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    split.add_argument("--val-fraction", type=float, default=0.15, help="share of each site's records (0.15)")
    split.add_argument("--test-fraction", type=float, default=0.2, help="share of each site's records (0.2)")
    split.add_argument(
        "--min-train",
        type=int,
        default=DEFAULT_MIN_PER_SITE,
        help=f"minimum training records per site (default: {DEFAULT_MIN_PER_SITE})",
    )
    split.add_argument("--force", action="store_true", help="replace existing site files")
    split.set_defaults(func=run_split)

    fraud = commands.add_parser(
        "fraud",
        help="write the four banks' synthetic card transactions (the fraud use case)",
        description="Generate the synthetic transactions of bank-1 .. bank-4 (common/fraud_data.py) and write one "
        "folder per bank for the fraud task. Nothing is downloaded.",
    )
    fraud.add_argument("--out", required=True, type=Path, help="folder to create the bank folders in")
    fraud.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    fraud.add_argument("--scale", type=float, default=1.0, help="multiply every bank's transactions (default: 1)")
    fraud.add_argument("--force", action="store_true", help="replace existing bank files")
    fraud.set_defaults(func=run_fraud)

    describe = commands.add_parser(
        "describe",
        help="check one site folder against its task and print counts",
        description="Load DIR with the task's loader (checking every file against the schema) and print "
        "per-split record counts and label histograms. Only counts are printed, never records.",
    )
    describe.add_argument("dir", type=Path, help="site folder holding train.csv, val.csv and test.csv")
    describe.add_argument("--task", help="task name or package.module:ATTR (default: the dataset in manifest.json)")
    describe.set_defaults(func=run_describe)


def site_names(args: argparse.Namespace) -> list[str]:
    """The site list from ``--sites`` or ``--num-sites``/``--prefix``."""
    if args.sites is not None:
        return [s.strip() for s in str(args.sites).split(",") if s.strip()]
    if args.num_sites < 1:
        raise ConfigError("--num-sites: must be at least 1")
    return [f"{args.prefix}{i}" for i in range(1, args.num_sites + 1)]


def run_split(args: argparse.Namespace) -> int:
    """``cohort data split``: write the site folders and print one line of counts per site."""
    sites = site_names(args)
    extra: dict[str, object] = {}
    if args.csv is None:
        for flag in ("label", "test_csv", "task"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')}: only with --csv")
        x, y, schema = load_source(args.dataset)
        name = args.dataset
    else:
        if not args.label:
            raise ConfigError("--label: required with --csv (the label column's name)")
        csv_data = read_csv_source(args.csv, args.label)
        x, y, schema, name = csv_data.x, csv_data.y, csv_data.schema, "custom"
        extra = {"source": args.csv.name, "label_values": list(csv_data.label_values)}
        if args.task:
            extra["task"] = args.task
    splits = split_sites(
        x,
        y,
        sites,
        alpha=args.alpha,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=0.0 if args.test_csv is not None else args.test_fraction,
        min_per_site=args.min_train,
        quantity_alpha=args.quantity_alpha,
    )
    if args.test_csv is not None:
        test = read_csv_source(args.test_csv, args.label, csv_data.label_values)
        if test.schema.features != schema.features:
            raise DataError(f"{args.test_csv}: its columns differ from {args.csv}'s")
        shares = divide_like(test.y, {s: splits[s]["train"][1] for s in sites}, args.seed)
        for site, idx in shares.items():
            splits[site]["test"] = (test.x[idx], test.y[idx])
    folders = write_site_folders(args.out, splits, schema, dataset=name, overwrite=args.force, extra=extra)
    how = "IID"
    if args.alpha is not None:
        how = f"Dirichlet alpha={args.alpha:g}"
    elif args.quantity_alpha is not None:
        how = f"Dirichlet quantity skew alpha={args.quantity_alpha:g}"
    total = sum(len(part[1]) for site in splits.values() for part in site.values())
    print(f"{args.csv or args.dataset}: {total} records over {len(sites)} sites ({how}, seed {args.seed})")
    for site, folder in folders.items():
        counts = " ".join(f"{s}={len(splits[site][s][1])}" for s in SPLITS)
        labels = _histogram_text(label_histogram(splits[site]["train"][1], schema.num_classes))
        print(f"{site}: {counts} train-labels [{labels}] -> {folder}")
    return 0


def _histogram_text(histogram: list[int]) -> str:
    return " ".join(f"{label}:{count}" for label, count in enumerate(histogram))


def run_fraud(args: argparse.Namespace) -> int:
    """``cohort data fraud``: the four banks' folders, and one line of counts per bank."""
    from common.fraud_data import write_bank_folders

    folders = write_bank_folders(args.out, args.seed, scale=args.scale, overwrite=args.force)
    for bank, folder in folders.items():
        counts = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["splits"]
        text = " ".join(f"{s}={counts[s]['count']} (fraud {counts[s]['label_histogram'][1]})" for s in SPLITS)
        print(f"{bank}: {text} -> {folder}")
    return 0


def _manifest(folder: Path) -> dict[str, object]:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _header(folder: Path) -> list[str]:
    try:
        with (folder / "train.csv").open(encoding="utf-8-sig") as fh:
            return [c.strip() for c in fh.readline().strip().split(",")]
    except (OSError, UnicodeDecodeError):
        return []


def infer_task(folder: Path) -> str | None:
    """The task for a site folder: named in its manifest, its built-in data set, or the built-in task whose schema
    its CSV header matches; None when none of these says."""
    manifest = _manifest(folder)
    for key in ("task", "dataset"):
        value = manifest.get(key)
        if isinstance(value, str) and value and value != "custom":
            return value
    header = tuple(_header(folder))
    for name in sorted(BUILTIN_TASKS):
        if load_task(name).schema.columns() == header:
            return name
    return None


def _header_schema(folder: Path) -> DataSchema | None:
    """A folder written by ``split --csv`` without a task: the schema its header and manifest give."""
    manifest, header = _manifest(folder), _header(folder)
    values = manifest.get("label_values")
    if not isinstance(values, list) or len(header) < 2:
        return None
    return DataSchema(features=tuple(header[:-1]), label=header[-1], num_classes=len(values))


def run_describe(args: argparse.Namespace) -> int:
    """``cohort data describe``: validate one site folder with its task's loader and print counts only."""
    folder = Path(args.dir)
    ref = args.task or infer_task(folder)
    if ref is not None:
        try:
            task = load_task(ref)
        except ValueError as exc:
            raise ConfigError(f"--task: {exc}") from exc
        schema = task.schema
        data = task.load_data(folder)
        how = f"task {task.name}" + ("" if args.task else " (from the folder)")
    else:
        found = _header_schema(folder)
        if found is None:
            raise ConfigError(f"--task: required, since {folder} names no task and matches no built-in task")
        schema = found
        data = _raw_site(folder, schema)
        how = "no task named; schema from the CSV header"
    print(f"{args.dir}: {how}, schema {schema.fingerprint()[:19]}... ok")
    for split in SPLITS:
        _, y = dataset_tensors(data.split(split))
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= schema.num_classes):
            raise DataError(f"{args.dir}: {split} labels outside 0..{schema.num_classes - 1}")
        histogram = label_histogram(y.numpy(), schema.num_classes)
        print(f"  {split}: {len(y)} records, labels [{_histogram_text(histogram)}]")
    return 0


def _raw_site(folder: Path, schema: DataSchema) -> SiteData:
    """The folder read with the generic tabular loader for ``schema`` (no scaling)."""
    reader = TabularTask()
    reader.name, reader.schema = "csv", schema
    return reader.load_data(folder)
