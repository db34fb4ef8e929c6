"""``cohort demo --use-case fraud``: four banks train one fraud model; is it better than each bank alone?

The federation itself is the generic demo (cohort_cli/demo.py) with the configs in ``deploy/fraud/``: four
participant daemons on synthetic transactions (common/fraud_data.py), secure aggregation and record-level DP-SGD at
every bank. Afterwards this module trains the two references in this process, with the same recipe (the job's
hyper-parameters, task parameters, rounds x local epochs, and the banks' DP-SGD settings): each bank alone on its own
training split, and one model on all banks' training records pooled. It scores all of them, and the federation's
final model, by AUC-PR on each bank's own test split (common/site_comparison.py). The demo process reads every
bank's data only to report this comparison; the federation never does.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from cohort_cli.demo import UseCase
from common import config as config_loader
from common.fraud_data import BANKS, write_bank_folders
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.site_comparison import compare
from common.tasks.base import RecordDP, TrainSettings, configure, load_task
from common.tasks.params import parse_json
from coordinator.state.model_store import ModelStore
from participant.config import ParticipantConfig

SEED = 7
SITES = tuple(bank.name for bank in BANKS)


def _write_data(data_dir: Path) -> None:
    write_bank_folders(data_dir, SEED)


def _settings(deploy: Path, job: pb.JobStatus) -> TrainSettings:
    """The job's recipe, with the banks' DP-SGD settings (every bank in deploy/fraud uses the same ones)."""
    site = config_loader.load(ParticipantConfig, deploy / f"{SITES[0]}.yaml")
    dp = site.privacy
    p = job.spec.params
    return TrainSettings(
        local_epochs=p.local_epochs,
        batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        seed=p.seed,
        record_dp=RecordDP(dp.noise_multiplier, dp.max_grad_norm, dp.delta) if dp.enabled else None,
    )


def report(run_dir: Path, deploy: Path, job: pb.JobStatus, model_path: Path) -> dict[str, Any]:
    """Print each bank alone vs the federated model vs pooled data (AUC-PR); the entries for summary.json."""
    task = configure(load_task(job.spec.task), parse_json(job.spec.task_params_json))
    sites = {bank: task.load_data(run_dir / "data" / bank) for bank in SITES}
    model = task.build_model(seed=0)
    model.load_state_dict(ModelStore(model_path.parent).load(job.model_version), strict=True)
    settings = _settings(deploy, job)
    rounds = sum(1 for r in job.rounds if r.state == "completed")
    dp = "with the same DP-SGD" if settings.record_dp is not None else "without DP"
    print(
        f"  comparing: each bank alone and all banks pooled, trained here with the same recipe ({rounds} epochs, "
        f"{dp}); AUC-PR on each bank's own test split:"
    )
    result = compare(task, sites, settings, rounds, scaling="fallback", federated_model=model)
    for line in result.table():
        print(f"    {line}")
    fed_median = statistics.median(result.federated.values())
    verdict = "beats" if fed_median > result.median_alone else "does not beat"
    print(
        f"  the federated model (median AUC-PR {fed_median:.4f} over the banks) {verdict} the median bank alone "
        f"({result.median_alone:.4f})"
    )
    return {
        "comparison": {
            "metric": result.metric,
            "alone": result.alone,
            "federated": result.federated,
            "pooled": result.pooled,
            "federated_all_banks": result.federated_all,
            "pooled_all_banks": result.pooled_all,
            "median_alone": result.median_alone,
            "median_federated": fed_median,
        }
    }


FRAUD = UseCase(
    "fraud",
    SITES,
    "fraud",
    "cohort-fraud-demo",
    "banks",
    "4 banks, task fraud (synthetic card transactions, 0.2-1.5 % fraud), secure aggregation and DP-SGD",
    _write_data,
    report,
)
