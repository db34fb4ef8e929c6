"""Flower's simulation engine on bench/simulation.py's workload: for the ratio in the README, not part of Cohort.

Runs in a separate virtual environment with Flower (never a Cohort dependency), e.g.::

    python3.11 -m venv /tmp/flwr-venv
    /tmp/flwr-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /tmp/flwr-venv/bin/pip install -c <(echo torch==2.13.0) 'flwr[simulation]'
    /tmp/flwr-venv/bin/python bench/flower_simulation.py --workload breast_cancer --sites 100 --rounds 3 \
        --train-records 15

The same workload as Cohort's cell: N virtual clients (Flower's Message API: a ``ClientApp`` per SuperNode on Ray,
one CPU each, the ``ServerApp`` with ``FedAvg`` over all of them every round, no evaluation rounds), each training
the same model (the built-in task's architecture, or the wide MLP of bench/wide_mlp_task.py) for one local epoch of SGD
(batch 16, lr 0.05) on ``--train-records`` records of the task's shape. The records are random (the timing does not
depend on their values; Flower's clients make them at start, as Cohort's sites load theirs once). Prints one JSON
line: seconds of each round (the time between consecutive aggregations), the driver's peak RSS and the versions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
from typing import Any

import flwr
import numpy as np
import ray
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

# workload -> (features, classes, hidden width; 0 for the digits CNN)
SHAPES = {
    "breast_cancer": (30, 2, 32),
    "digits": (64, 10, 0),
    "mlp1e5": (30, 2, 3030),  # bench/wide_mlp_task.py: hidden_for(10**5)
    "mlp1e6": (30, 2, 30303),  # hidden_for(10**6)
}
BATCH, LR = 16, 0.05


class DigitsNet(torch.nn.Module):
    """The built-in digits task's network (common/tasks/digits.py), copied: this environment has no Cohort."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, kernel_size=3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, kernel_size=3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x.view(-1, 1, 8, 8)))
        return out


def make_model(workload: str) -> torch.nn.Module:
    features, classes, hidden = SHAPES[workload]
    torch.manual_seed(0)
    if hidden == 0:
        return DigitsNet()
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


def client_app(workload: str, records: int) -> ClientApp:
    app = ClientApp()
    features, classes, _ = SHAPES[workload]

    @app.train()  # type: ignore[untyped-decorator]
    def train(msg: Message, context: Context) -> Message:
        rng = np.random.default_rng(int(context.node_config["partition-id"]))
        x = torch.from_numpy(rng.standard_normal((records, features), dtype=np.float32))
        y = torch.from_numpy(rng.integers(0, classes, records))
        model = make_model(workload)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        torch.set_num_threads(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        order = torch.from_numpy(rng.permutation(records))
        for start in range(0, records, BATCH):
            idx = order[start : start + BATCH]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": records})}
        )
        return Message(content=content, reply_to=msg)

    return app


class TimedFedAvg(FedAvg):  # type: ignore[misc]
    """FedAvg that notes when each round's aggregation is done."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.times: list[float] = []

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        out = super().aggregate_train(server_round, replies)
        self.times.append(time.perf_counter())
        return out


def server_app(workload: str, sites: int, rounds: int, strategy: TimedFedAvg) -> ServerApp:
    app = ServerApp()

    @app.main()  # type: ignore[untyped-decorator]
    def main(grid: Grid, context: Context) -> None:
        arrays = ArrayRecord(make_model(workload).state_dict())
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds, train_config=ConfigRecord({}))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", choices=sorted(SHAPES), required=True)
    parser.add_argument("--sites", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-records", type=int, required=True)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    n = args.sites
    strategy = TimedFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_evaluate_nodes=0, min_available_nodes=n
    )
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": args.num_cpus}}
    started = time.perf_counter()
    run_simulation(
        server_app=server_app(args.workload, n, args.rounds, strategy),
        client_app=client_app(args.workload, args.train_records),
        num_supernodes=n,
        backend_config=backend,
    )
    times = [started, *strategy.times]
    rounds = [b - a for a, b in itertools.pairwise(times)]
    out = {
        "engine": "flower",
        "workload": args.workload,
        "sites": n,
        "rounds": len(strategy.times),
        "round_seconds": [round(r, 3) for r in rounds],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": {"flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__},
        "python": sys.version.split()[0],
    }
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
