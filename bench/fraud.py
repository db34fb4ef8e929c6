"""The banks' fraud use case: is the federated model better than each bank alone? AUC-PR over several seeds.

Everything runs in this process, on the project's own pieces: ``common.fraud_data`` generates the four banks'
transactions (one data set per seed), each bank's records are split train/val/test (stratified, 60/15/25), the
``fraud`` task trains and evaluates, and ``common.site_comparison.compare`` trains the three models with the same
recipe (``rounds`` x ``local_epochs`` epochs) and scores each on every bank's own test split by AUC-PR:

* **alone**: each bank on its own training split, standardized with its own statistics;
* **federated**: FedAvg over the four banks (every bank every round, sample-weighted), standardized with the
  federation's statistics (what the statistics phase gives; ``--scaling fallback`` uses the task's constants);
* **pooled**: one model on all banks' training records together (what no federation may build).

Two recipes: without DP (the task's defaults: batch 128, Adam lr 0.003, 15 rounds) and, with ``--dp``, the demo's
(``deploy/fraud``: batch 1024, lr 0.02, 15 rounds, DP-SGD with sigma 1.0 and clip 1.0 at every bank, also for the
bank alone and the pool). DP noise comes from OS entropy, so DP runs vary.

    .venv/bin/python bench/fraud.py [--seeds 0 1 2 3 4] [--dp] [--out bench/results]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.datasets import stratified_split
from common.fraud_data import BANKS, generate_bank
from common.site_comparison import Comparison, Scaling, compare
from common.tasks import fraud
from common.tasks.base import RecordDP, SiteData, TrainSettings

ROUNDS = 15
DP_SETTINGS = TrainSettings(
    local_epochs=1, batch_size=1024, learning_rate=0.02, seed=0, record_dp=RecordDP(1.0, 1.0, 1e-5)
)


def bank_data(seed: int) -> dict[str, SiteData]:
    """The four banks' splits for one seed, loaded as a site loads them (fallback scaling)."""
    task = fraud.TASK
    out = {}
    for i, bank in enumerate(BANKS):
        x, y = generate_bank(bank, seed)
        parts = stratified_split(y, seed * 1000 + i, 0.15, 0.25)
        out[bank.name] = task.site_data(*[(x[parts[s]], y[parts[s]]) for s in ("train", "val", "test")])
    return out


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def report(results: list[Comparison], title: str) -> list[str]:
    """A Markdown table: per bank alone / federated / pooled (mean ± sd over seeds), then medians and totals."""
    lines = [f"### {title}", "", "| bank | alone | federated | pooled |", "|---|---:|---:|---:|"]
    for bank in results[0].alone:
        lines.append(
            f"| {bank} | {_mean_sd([r.alone[bank] for r in results])} | "
            f"{_mean_sd([r.federated[bank] for r in results])} | {_mean_sd([r.pooled[bank] for r in results])} |"
        )
    medians = [statistics.median(r.federated.values()) for r in results]
    pooled_medians = [statistics.median(r.pooled.values()) for r in results]
    lines.append(
        f"| median of the banks | {_mean_sd([r.median_alone for r in results])} | {_mean_sd(medians)} | "
        f"{_mean_sd(pooled_medians)} |"
    )
    lines.append(
        f"| all banks' test data | | {_mean_sd([r.federated_all for r in results])} | "
        f"{_mean_sd([r.pooled_all for r in results])} |"
    )
    wins = sum(m > r.median_alone for m, r in zip(medians, results, strict=True))
    wins_all = sum(r.federated_all > r.median_alone for r in results)
    lines += [
        "",
        f"Federated median over the banks above the median bank alone in {wins} of {len(results)} seeds; "
        f"federated AUC-PR on all banks' test data above the median bank alone in {wins_all} of {len(results)}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--dp", action="store_true", help="the demo's recipe with DP-SGD at every bank")
    parser.add_argument("--scaling", choices=["federated", "fallback"], default="federated")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    settings = DP_SETTINGS if args.dp else fraud.TASK.default_settings
    scaling: Scaling = args.scaling
    results = []
    for seed in args.seeds:
        t0 = time.monotonic()
        result = compare(fraud.TASK, bank_data(seed), replace(settings, seed=seed), ROUNDS, scaling=scaling)
        results.append(result)
        print(f"seed {seed} ({time.monotonic() - t0:.0f}s)")
        for line in result.table():
            print(f"  {line}")
    dp = "DP-SGD sigma 1.0, clip 1.0, batch 1024, lr 0.02" if args.dp else "no DP, batch 128, lr 0.003"
    title = f"fraud, AUC-PR, {len(results)} seeds, {ROUNDS} rounds x 1 epoch, {dp}, {scaling} scaling"
    table = report(results, title)
    print("\n".join(table))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"fraud{'_dp' if args.dp else ''}{'' if scaling == 'federated' else '_fallback'}.md"
    (args.out / name).write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
