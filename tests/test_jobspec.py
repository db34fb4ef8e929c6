"""The job specification is defined once: every JobConfig key has a JobSpec field of the same name (nested sections
included), and every value, zeros among them, survives config -> wire -> config and the status record."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from typing import Any

import pytest

from common.errors import InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.settings import TrainParamsConfig
from coordinator.config import JobConfig, PrivacyConfig, SecureAggregationConfig, StandardizeConfig
from coordinator.jobspec import from_proto, job_spec_of_record, schema_drift, to_proto
from coordinator.strategy.config import StrategyConfig

BASE = JobConfig(task="breast_cancer", min_sites=2)

# One non-default, valid value for every key (zero where zero is meaningful), section by section.
CHANGES: list[tuple[str, dict[str, Any]]] = [
    ("", {"name": "renamed"}),
    ("", {"rounds": 7}),
    ("", {"fraction": 0.5}),
    ("", {"min_sites": 3}),
    ("", {"min_available_sites": 4}),
    ("", {"round_timeout_s": 12.5}),
    ("", {"wait_for_sites_s": 3.0}),
    ("", {"evaluate_every": 0}),  # 0 means never, not "unset"
    ("", {"max_round_retries": 0}),
    ("", {"over_selection": 0.25}),
    ("", {"final_evaluation": False}),
    # Task parameters travel as canonical JSON: each value keeps its type (an int is not read back as a float).
    ("", {"task_params": {"hidden": 16, "loss": "focal", "pos_weight": 0.5, "balanced": True}}),
    ("params", {"local_epochs": 3}),
    ("params", {"batch_size": 7}),
    ("params", {"learning_rate": 0.3}),
    ("params", {"seed": 0}),
    ("params", {"seed": 99}),
    ("params", {"lr_schedule": "cosine"}),
    ("params", {"lr_step_rounds": 3}),
    ("params", {"lr_gamma": 0.1}),
    ("params", {"lr_min": 0.0}),
    ("params", {"lr_min": 0.001}),
    ("params", {"optimizer": "adam"}),
    ("params", {"optimizer": "sgd", "momentum": 0.9}),
    ("params", {"optimizer": "sgd", "weight_decay": 0.01}),
    ("params", {"keep_optimizer_state": True}),
    ("params", {"proximal_mu": 0.1}),
    ("secure_aggregation", {"enabled": True}),
    ("secure_aggregation", {"bits": 20}),
    ("secure_aggregation", {"clip": 0.5}),
    ("secure_aggregation", {"weight_cap": 17}),
    ("secure_aggregation", {"dropout_rate": 0.0}),
    ("secure_aggregation", {"corruption_rate": 0.1}),
    ("secure_aggregation", {"stage_timeout_s": 9.0}),
    ("secure_aggregation", {"full_graph_max": 2}),
    ("secure_aggregation", {"max_site_aborts": 0}),
    ("privacy", {"unit": "site"}),
    ("privacy", {"target_epsilon": 0.0}),
    ("privacy", {"target_epsilon": 4.0}),
    ("privacy", {"delta": 1e-6}),
    ("privacy", {"accountant": "rdp"}),
    ("privacy", {"noise_multiplier": 2.5}),
    ("privacy", {"clip_norm": 0.1}),
    ("privacy", {"refuse_over_budget": False}),
    ("privacy", {"adaptive_clipping": True}),
    ("privacy", {"target_quantile": 0.0}),
    ("privacy", {"clip_learning_rate": 0.5}),
    ("privacy", {"count_noise_std": 0.0}),
    ("strategy", {"name": "fedyogi"}),
    ("strategy", {"server_lr": 0.05}),
    ("strategy", {"server_momentum": 0.0}),
    ("strategy", {"beta1": 0.0}),
    ("strategy", {"beta2": 0.5}),
    ("strategy", {"tau": 0.01}),
    ("strategy", {"aggregation": "trimmed_mean"}),
    ("strategy", {"trim_fraction": 0.0}),
    ("strategy", {"byzantine_sites": 0}),
    ("strategy", {"multi_krum_keep": 1}),
    ("strategy", {"norm_bound": 2.5}),
    ("strategy", {"selection": "availability"}),
    ("strategy", {"availability_window": 3}),
    ("strategy", {"mode": "async"}),
    ("strategy", {"buffer_size": 0}),
    ("strategy", {"buffer_size": 4}),
    ("strategy", {"max_staleness": 0}),
    ("strategy", {"staleness_exponent": 0.0}),
    ("standardize", {"enabled": True}),
    ("standardize", {"lower_quantile": 0.0}),
    ("standardize", {"upper_quantile": 1.0}),
    ("standardize", {"upper_quantile": 0.95}),
]


def changed(section: str, values: dict[str, Any]) -> JobConfig:
    base = BASE
    if section == "standardize":  # the statistics phase needs secure aggregation
        base = dataclasses.replace(BASE, secure_aggregation=SecureAggregationConfig(enabled=True))
    if not section:
        return dataclasses.replace(base, **values)
    return dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **values)})


def test_config_and_wire_have_the_same_keys() -> None:
    assert schema_drift() == []


def test_every_key_is_covered_by_the_round_trip_cases() -> None:
    covered = {(section, key) for section, values in CHANGES for key in values}
    sections = {
        "params": TrainParamsConfig,
        "secure_aggregation": SecureAggregationConfig,
        "privacy": PrivacyConfig,
        "strategy": StrategyConfig,
        "standardize": StandardizeConfig,
    }
    keys = {("", f.name) for f in dataclasses.fields(JobConfig) if f.name not in sections and f.name != "task"}
    for name, cls in sections.items():
        keys |= {(name, f.name) for f in dataclasses.fields(cls)}
    assert keys - covered == set()


@pytest.mark.parametrize(
    ("section", "values"), CHANGES, ids=[f"{s or 'job'}.{next(iter(v))}={next(iter(v.values()))}" for s, v in CHANGES]
)
def test_every_value_survives_the_admin_wire_and_the_status_record(section: str, values: dict[str, Any]) -> None:
    spec = changed(section, values)
    assert from_proto(to_proto(spec)) == spec
    # Job status shows the spec from the job's record (its dict form, plus bookkeeping keys the wire has not).
    record = asdict(spec) | {"identity": {"task_name": "breast_cancer"}}
    assert from_proto(job_spec_of_record(record)) == spec


def test_unset_fields_take_the_defaults_and_bad_values_name_the_key() -> None:
    assert from_proto(pb.JobSpec(task="breast_cancer")) == JobConfig(task="breast_cancer")
    with pytest.raises(InvalidArgument, match=r"job\.secure_aggregation\.bits"):
        from_proto(pb.JobSpec(task="breast_cancer", secure_aggregation=pb.SecureAggregationSpec(bits=8)))
    with pytest.raises(InvalidArgument, match=r"job\.rounds"):
        from_proto(pb.JobSpec(task="breast_cancer", rounds=0))
    with pytest.raises(InvalidArgument, match=r"job\.task_params"):
        from_proto(pb.JobSpec(task="breast_cancer", task_params_json='{"hidden": [1, 2]}'))
    with pytest.raises(InvalidArgument, match=r"job\.task_params"):
        from_proto(pb.JobSpec(task="breast_cancer", task_params_json="{not json"))
    with pytest.raises(InvalidArgument, match=r"job\.standardize\.enabled: .*needs secure_aggregation"):
        from_proto(pb.JobSpec(task="breast_cancer", standardize=pb.StandardizeSpec(enabled=True)))
    with pytest.raises(InvalidArgument, match=r"job\.standardize: need 0 <= lower_quantile"):
        from_proto(pb.JobSpec(task="breast_cancer", standardize=pb.StandardizeSpec(upper_quantile=0.4)))
