"""``cohort simulate JOB.yaml --sites N --data ...``: the job over N virtual sites on Ray (simulation/).

The job file is a job spec (what ``cohort job start`` takes) or a coordinator config with a ``job:`` section (the
demo's). The run directory gets what a real coordinator's state_dir holds (``state/coordinator.db`` with the round
records, ``state/models/*.safetensors``), the virtual sites' data folders, and ``summary.json``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from common import config as config_loader
from common.errors import ConfigError
from coordinator.config import JobConfig
from participant.config import RecordPrivacyConfig

log = logging.getLogger("cohort.simulation")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="run a job over N virtual sites on Ray (pip install 'cohort[sim]')",
        description="The job's rounds over virtual sites as Ray tasks, with the coordinator's own state machine, "
        "aggregation, strategies and privacy code and the participant's own training, clipping, DP and secure "
        "aggregation. Writes the round records, the models and summary.json like a real job.",
    )
    p.add_argument("job", type=Path, help="job YAML (a job spec, or a coordinator config with a job: section)")
    p.add_argument("--sites", type=int, default=None, help="number of virtual sites")
    p.add_argument(
        "--data",
        required=True,
        help="a directory of site folders (train/val/test.csv each), a built-in data set (breast_cancer, digits) or "
        "a CSV file with the task's columns, split over the sites on the fly",
    )
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet label skew (default: IID)")
    p.add_argument("--quantity-skew", type=float, default=0.0, help="log-normal sigma of site sizes (0: equal)")
    p.add_argument("--seed", type=int, default=42, help="seed of the on-the-fly split")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one job value (repeatable), e.g. rounds=3",
    )
    p.add_argument(
        "--site-config",
        type=Path,
        default=None,
        help="a participant YAML whose privacy section every virtual site uses (record-level DP budgets)",
    )
    p.add_argument("--run-dir", type=Path, default=Path("runs/simulate"))
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="Ray CPUs one site's task asks for")
    p.add_argument("--gpus-per-site", type=float, default=0.0, help="Ray GPUs one site's task asks for")
    p.add_argument("--max-in-flight", type=int, default=0, help="site tasks in flight at once (0: 2x CPUs)")
    p.set_defaults(func=_cmd_simulate)


def load_job(path: Path, overrides: list[str]) -> JobConfig:
    """A job spec file, or the ``job:`` section of a coordinator config, with ``--set`` overrides."""
    tree = config_loader.read_yaml(path)
    if isinstance(tree.get("job"), dict):
        tree = tree["job"]
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        node = tree
        *parents, leaf = key.strip().removeprefix("job.").split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {key} is not inside a section")
        node[leaf] = yaml.safe_load(raw)
    return config_loader.build(JobConfig, tree, "job")


def load_site_privacy(path: Path | None) -> RecordPrivacyConfig | None:
    if path is None:
        return None
    tree = config_loader.read_yaml(path)
    return config_loader.build(RecordPrivacyConfig, tree.get("privacy", {}), "privacy")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from simulation.run import run_simulation

    spec = load_job(args.job, args.overrides)
    summary = run_simulation(
        spec,
        data=args.data,
        sites=args.sites,
        run_dir=args.run_dir,
        alpha=args.alpha,
        quantity_skew=args.quantity_skew,
        seed=args.seed,
        site_privacy=load_site_privacy(args.site_config),
        address=args.address,
        num_cpus=args.num_cpus,
        cpus_per_site=args.cpus_per_site,
        gpus_per_site=args.gpus_per_site,
        max_in_flight=args.max_in_flight,
    )
    return 0 if summary["state"] == "finished" else 1
