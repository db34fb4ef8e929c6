"""breast_cancer with federated feature standardization against its fixed constants, over many split seeds.

The built-in ``breast_cancer`` task's fallback scaling is a set of published constants, computed from the whole
public data set (test records included). With the statistics phase, every site standardizes with the federation's
statistics of the sites' **training** splits instead (common/tasks/standardize.py): mean, std, and clipping at the
0.1 % / 99.9 % quantiles of the pooled histograms. This runs both, in one process (``common.datasets.fedavg``;
the federated scaling is what ``common.site_comparison.federated_scaling`` derives from the sum of the sites' statistics
vectors, exactly as the coordinator would from the secure sum), on 5 sites with Dirichlet label skew alpha 0.5,
the task's default recipe (20 rounds x 1 epoch), for each split seed; and the centralized baseline (same model,
pooled training data, 20 epochs) with the same scaling rule: constants, or the pooled training data's statistics.

    .venv/bin/python bench/standardization.py [--seeds 120] [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.datasets import load_source, simulate_fedavg, split_sites
from common.site_comparison import federated_scaling, pooled_site, train_on
from common.tasks import breast_cancer
from common.tasks.base import SiteData
from common.tasks.setup import TaskSetup, prepare

SITES = tuple(f"hospital-{i}" for i in range(1, 6))


def run(seed: int) -> dict[str, float]:
    task = breast_cancer.TASK
    x, y, _ = load_source("breast_cancer")
    splits = split_sites(x, y, SITES, alpha=0.5, seed=seed)
    sites: dict[str, SiteData] = {s: task.site_data(p["train"], p["val"], p["test"]) for s, p in splits.items()}
    shared = TaskSetup(scaling=federated_scaling(task, sites))
    standardized = {s: prepare(task, d, shared)[1] for s, d in sites.items()}
    settings = replace(task.default_settings, seed=seed)
    rounds = task.recommended_rounds
    out = {}
    for name, data in (("constants", sites), ("federated", standardized)):
        out[f"fed_{name}"] = simulate_fedavg(task, data, settings, rounds)[-1].accuracy
        pool = pooled_site(data)
        model = train_on(task, pool, settings, rounds * settings.local_epochs)
        out[f"central_{name}"] = task.evaluate(model, pool.test).accuracy
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.monotonic()
    rows = [run(seed) for seed in range(args.seeds)]
    lines = [
        f"### breast_cancer, 5 sites, Dirichlet alpha 0.5, split seeds 0-{args.seeds - 1}, 20 rounds x 1 epoch",
        "",
        "| scaling | federated test accuracy (mean) | central (mean) | seeds > 2 points below central | worst gap |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("constants", "fixed constants (fallback)"), ("federated", "federated statistics")):
        fed = [r[f"fed_{name}"] for r in rows]
        central = [r[f"central_{name}"] for r in rows]
        gaps = [c - f for f, c in zip(fed, central, strict=True)]
        lines.append(
            f"| {label} | {100 * statistics.mean(fed):.1f} % | {100 * statistics.mean(central):.1f} % | "
            f"{sum(g > 0.02 for g in gaps)} | {100 * max(gaps):.1f} points |"
        )
    lines += ["", f"({time.monotonic() - t0:.0f} s)"]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "standardization.md").write_text("\n".join(lines[:-2]) + "\n")


if __name__ == "__main__":
    main()
