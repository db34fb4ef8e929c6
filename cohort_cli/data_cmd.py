"""``cohort data``: prepare demo site folders and check a site's data.

* ``cohort data split --dataset breast_cancer --out DIR --num-sites 5 --alpha 0.5 --seed 42`` divides one
  of the bundled source data sets over simulated sites and writes one folder per site (see
  :mod:`common.datasets`).
* ``cohort data describe DIR [--task NAME]`` loads one site folder with the task's own loader (so the files
  are checked against the schema) and prints per-split record counts and label histograms. It prints counts
  only, never records, so it is safe to run at a site and to share the output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
from common.tasks.base import SPLITS, load_task
from common.tasks.tabular import dataset_tensors


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``data split`` and ``data describe`` to the ``cohort`` command line."""
    data = subparsers.add_parser("data", help="prepare demo site data and check a site's data folder")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    split = commands.add_parser(
        "split",
        help="divide a bundled data set over simulated sites",
        description="Divide one of scikit-learn's bundled data sets over sites, one folder per site "
        "with train.csv, val.csv, test.csv and manifest.json. Nothing is downloaded.",
    )
    split.add_argument("--dataset", required=True, choices=SOURCES, help="source data set")
    split.add_argument("--out", required=True, type=Path, help="folder to create the site folders in")
    who = split.add_mutually_exclusive_group(required=True)
    who.add_argument("--sites", help="comma-separated site names, e.g. a,b,c")
    who.add_argument("--num-sites", type=int, help="number of sites, named PREFIX1 .. PREFIXN")
    split.add_argument("--prefix", default="hospital-", help="name prefix with --num-sites (default: hospital-)")
    skew = split.add_mutually_exclusive_group()
    skew.add_argument("--iid", action="store_true", help="deal records evenly at random (the default)")
    skew.add_argument("--alpha", type=float, help="Dirichlet label skew; smaller means more skewed (e.g. 0.5)")
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
    x, y, schema = load_source(args.dataset)
    splits = split_sites(
        x,
        y,
        sites,
        alpha=args.alpha,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        min_per_site=args.min_train,
    )
    folders = write_site_folders(args.out, splits, schema, dataset=args.dataset, overwrite=args.force)
    how = "IID" if args.alpha is None else f"Dirichlet alpha={args.alpha:g}"
    print(f"{args.dataset}: {len(y)} records over {len(sites)} sites ({how}, seed {args.seed})")
    for site, folder in folders.items():
        counts = " ".join(f"{s}={len(splits[site][s][1])}" for s in SPLITS)
        labels = _histogram_text(label_histogram(splits[site]["train"][1], schema.num_classes))
        print(f"{site}: {counts} train-labels [{labels}] -> {folder}")
    return 0


def _histogram_text(histogram: list[int]) -> str:
    return " ".join(f"{label}:{count}" for label, count in enumerate(histogram))


def _task_ref(args: argparse.Namespace) -> str:
    if args.task:
        return str(args.task)
    manifest = Path(args.dir) / MANIFEST
    try:
        dataset = json.loads(manifest.read_text(encoding="utf-8")).get("dataset")
    except (OSError, ValueError, AttributeError):
        dataset = None
    if not isinstance(dataset, str) or not dataset or dataset == "custom":
        raise ConfigError(f"--task: required, since {manifest} does not name a built-in data set")
    return dataset


def run_describe(args: argparse.Namespace) -> int:
    """``cohort data describe``: validate one site folder with its task's loader and print counts only."""
    ref = _task_ref(args)
    try:
        task = load_task(ref)
    except ValueError as exc:
        raise ConfigError(f"--task: {exc}") from exc
    data = task.load_data(Path(args.dir))
    print(f"{args.dir}: task {task.name}, schema {task.schema.fingerprint()[:19]}... ok")
    for split in SPLITS:
        _, y = dataset_tensors(data.split(split))
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= task.schema.num_classes):
            raise DataError(f"{args.dir}: {split} labels outside 0..{task.schema.num_classes - 1}")
        histogram = label_histogram(y.numpy(), task.schema.num_classes)
        print(f"  {split}: {len(y)} records, labels [{_histogram_text(histogram)}]")
    return 0
