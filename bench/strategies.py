"""Strategies under strong label skew: federated test accuracy per round for FedAvg, FedProx, FedAdam and FedYogi.

Not a test: the table and plot go into the README (issue 11). Everything runs in this process on the code a
federation runs, without the transport: ``participant.site.Site.train`` trains each site from the global model with
the round's ``pb.TrainParams`` (the job's local options: optimizer, FedProx's ``proximal_mu``); the round's update is
the sample-weighted mean of the sites' updates (float64, as the coordinator's fold up to float32 rounding); the
server optimizer is ``coordinator.strategy.server_opt.server_step``, the coordinator's own. Accuracy is the global
model's accuracy on every site's test split pooled, after each round.

Data: ``common.datasets.split_sites`` with Dirichlet label skew alpha = 0.1 (most sites see one or two classes),
split seeds 0, 1, 2; breast_cancer over 10 sites, digits over 20 (at least 4 training records a site). Local
training: each task's measured defaults (breast_cancer: SGD, lr 0.5, 1 epoch, batch 16; digits: Adam, lr 0.01,
2 epochs, batch 32), every site every round.

    .venv/bin/python bench/strategies.py [--out bench/results] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.datasets import load_source, split_sites, write_site_folders
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import decode, state_dict_float32
from common.tasks.base import Task, TrainSettings, load_task, round_seed
from coordinator.round.aggregation import apply_flat
from coordinator.strategy.config import StrategyConfig
from coordinator.strategy.server_opt import OptimizerState, server_step
from participant.site import Site

ALPHA = 0.1
MIN_PER_SITE = 4  # alpha 0.1 leaves some of 10 breast_cancer sites with few records: allow small sites


@dataclass(frozen=True)
class Setup:
    task: str
    sites: int
    rounds: int


@dataclass(frozen=True)
class Arm:
    label: str
    strategy: StrategyConfig
    proximal_mu: float = 0.0


SETUPS = (Setup("breast_cancer", 10, 30), Setup("digits", 20, 20))
ARMS = (
    Arm("FedAvg", StrategyConfig()),
    Arm("FedProx (mu 0.1)", StrategyConfig(), proximal_mu=0.1),
    Arm("FedAdam (eta 0.03)", StrategyConfig(name="fedadam", server_lr=0.03)),
    Arm("FedYogi (eta 0.03)", StrategyConfig(name="fedyogi", server_lr=0.03)),
)


def run(setup: Setup, arm: Arm, seed: int, root: Path) -> list[float]:
    task: Task = load_task(setup.task)
    x, y, schema = load_source(setup.task)
    names = [f"site-{i:02d}" for i in range(setup.sites)]
    splits = split_sites(x, y, names, alpha=ALPHA, seed=seed, min_per_site=MIN_PER_SITE)
    folders = write_site_folders(root / f"{setup.task}-{seed}", splits, schema)
    sites = {name: Site(task, task.load_data(folder)) for name, folder in folders.items()}
    settings: TrainSettings = task.default_settings  # type: ignore[attr-defined]
    model = task.build_model(seed=0)
    tensors = state_dict_float32(model)
    specs = None
    optimizer = OptimizerState()
    accuracy = []
    for number in range(1, setup.rounds + 1):
        params = pb.TrainParams(
            local_epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=round_seed(0, number),
            proximal_mu=arm.proximal_mu,
        )
        total, weighted = 0, None
        for name in sorted(sites):
            site = sites[name]
            if site.num_train_samples == 0:
                continue
            local = site.train(tensors, params)
            specs = local.update.specs
            update = decode(local.update.specs, local.update.data)
            flat = np.concatenate([update[s.name].numpy().astype(np.float64).ravel() for s in local.update.specs])
            n = local.result.num_samples
            weighted = n * flat if weighted is None else weighted + n * flat
            total += n
        assert weighted is not None
        assert specs is not None
        change, optimizer = server_step(arm.strategy, weighted / total, optimizer)
        tensors = apply_flat(tensors, specs, change)
        model.load_state_dict(tensors)
        correct = records = 0
        for site in sites.values():
            result = task.evaluate(model, site.data.test)
            correct += round(result.accuracy * result.num_samples)
            records += result.num_samples
        accuracy.append(correct / records)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    curves: dict[str, dict[str, list[list[float]]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cohort-strategies-") as tmp:
        for setup in SETUPS:
            for arm in ARMS:
                for seed in args.seeds:
                    acc = run(setup, arm, seed, Path(tmp) / arm.label.split()[0])
                    curves.setdefault(setup.task, {}).setdefault(arm.label, []).append(acc)
                    print(f"{setup.task} {arm.label} seed {seed}: final {acc[-1]:.4f} best {max(acc):.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "strategies.json").write_text(json.dumps(curves, indent=1) + "\n")
    lines = [
        f"Federated test accuracy under label skew alpha {ALPHA} (mean over seeds {args.seeds}; "
        f"{time.perf_counter() - started:.0f} s in all)",
        "",
        "| task | sites | strategy | round 5 | round 10 | final | best | final, worst seed |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for setup in SETUPS:
        for arm in ARMS:
            runs = curves[setup.task][arm.label]

            def mean_at(r: int, runs: list[list[float]] = runs) -> float:
                return statistics.mean(run[r - 1] for run in runs)

            lines.append(
                f"| {setup.task} | {setup.sites} | {arm.label} | {mean_at(5):.3f} | {mean_at(10):.3f} | "
                f"{mean_at(setup.rounds):.3f} | {statistics.mean(max(r) for r in runs):.3f} | "
                f"{min(r[-1] for r in runs):.3f} |"
            )
    (args.out / "strategies.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(curves, args.out / "strategies.png")


def plot(curves: dict[str, dict[str, list[list[float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(11, 4))
    for ax, (task, arms) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        for label, runs in arms.items():
            mean = np.mean(np.array(runs), axis=0)
            ax.plot(range(1, len(mean) + 1), mean, label=label)
        ax.set_title(f"{task}, label skew alpha {ALPHA}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
