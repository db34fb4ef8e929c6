"""A job's settings in the words ``cohort status``, the dashboard and the run report share."""

from __future__ import annotations

from common.proto.cohort.v1 import cohort_pb2 as pb


def strategy_line(spec: pb.JobSpec) -> str:
    """The job's server optimizer, aggregation rule, selection and local learning-rate schedule, in one line."""
    st = spec.strategy
    name = st.name or "fedavg"
    adaptive = name in ("fedadam", "fedyogi", "fedadagrad")
    lr = st.server_lr if st.HasField("server_lr") else (0.1 if adaptive else 1.0)
    parts = [f"{name} (server lr {lr:g})"]
    rule = st.aggregation or "mean"
    if rule in ("krum", "multi_krum"):
        rule += f", f={st.byzantine_sites if st.HasField('byzantine_sites') else 1}"
    elif rule == "trimmed_mean":
        rule += f" {st.trim_fraction if st.HasField('trim_fraction') else 0.1:g}"
    parts.append(f"aggregation {rule}")
    if st.norm_bound:
        parts.append(f"norm bound {st.norm_bound:g}")
    parts.append(f"selection {st.selection or 'random'}")
    if spec.params.lr_schedule and spec.params.lr_schedule != "constant":
        parts.append(f"local lr {spec.params.lr_schedule} schedule")
    return ", ".join(parts)
