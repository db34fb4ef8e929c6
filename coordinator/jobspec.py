"""One table for the job specification: :class:`~coordinator.config.JobConfig` on one side, ``cohort.v1.JobSpec`` on
the other, matched field by field by name (nested sections included).

``to_proto`` and ``from_proto`` walk the dataclass fields, so a key added to JobConfig travels on the admin path and
shows in job status as soon as the proto has a field of the same name; :func:`schema_drift` (held to empty by a test)
names any key that one side has and the other lacks. Every JobSpec scalar has presence: a field that was set, even to
zero (``evaluate_every: 0``, "never"), is told apart from one left unset (the default applies).

One key travels as JSON: ``task_params`` (a mapping of the task's own scalar parameters, each of its declared type)
is the wire field ``task_params_json``, canonical JSON (common/tasks/params.py), so an int stays an int.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from common import config as config_loader
from common.errors import ConfigError, InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.tasks.params import canonical_json, parse_json
from coordinator.config import JobConfig

# Config keys whose wire field is the same name plus "_json", carrying canonical JSON.
JSON_KEYS = frozenset({"task_params"})


def to_proto(spec: JobConfig) -> pb.JobSpec:
    msg = pb.JobSpec()
    _fill(msg, spec)
    return msg


def _fill(msg: Message, value: Any) -> None:
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if v is None:
            continue
        if f.name in JSON_KEYS:
            if v:
                setattr(msg, f"{f.name}_json", canonical_json(v))
        elif dataclasses.is_dataclass(v):
            _fill(getattr(msg, f.name), v)
        elif isinstance(v, tuple | list):
            getattr(msg, f.name).extend(v)
        elif isinstance(v, dict):
            getattr(msg, f.name).update(v)
        elif isinstance(v, Path):
            setattr(msg, f.name, str(v))
        else:
            setattr(msg, f.name, v)


def from_proto(msg: pb.JobSpec) -> JobConfig:
    """A validated JobConfig from an admin's JobSpec: unset fields take their defaults; bad values are refused with
    the key's path (INVALID_ARGUMENT)."""
    try:
        return config_loader.build(JobConfig, _present(msg), "job")
    except ConfigError as exc:
        raise InvalidArgument(f"job spec: {exc}") from None


def _present(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        key = field.name.removesuffix("_json")
        if key in JSON_KEYS:
            if msg.HasField(field.name) and value:
                out[key] = parse_json(value, f"job.{key}")
        elif field.message_type is not None and not _repeated(field):
            if msg.HasField(field.name):
                out[field.name] = _present(value)
        elif _repeated(field):
            if len(value):
                out[field.name] = dict(value) if field.message_type is not None else list(value)
        elif field.has_presence:
            if msg.HasField(field.name):
                out[field.name] = value
        elif value:  # a field without presence: zero means unset
            out[field.name] = value
    return out


def _repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def job_spec_of_record(stored: dict[str, Any]) -> pb.JobSpec:
    """The JobSpec of a job as recorded in the store (the JobConfig's dict form, plus bookkeeping keys)."""
    known = {f.name for f in dataclasses.fields(JobConfig)}
    try:
        return to_proto(config_loader.build(JobConfig, {k: v for k, v in stored.items() if k in known}, "job"))
    except ConfigError:
        # A record written by an older version with a key this one no longer accepts: show what still converts.
        return pb.JobSpec(name=str(stored.get("name", "")), task=str(stored.get("task", "")))


def schema_drift() -> list[str]:
    """Keys that JobConfig and JobSpec do not share (with their nested sections); empty when the table holds."""
    return _drift(JobConfig, pb.JobSpec.DESCRIPTOR, "job")


def _drift(cls: type, descriptor: Any, path: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    wire = {f.name: f for f in descriptor.fields}
    wire |= {k: wire.pop(f"{k}_json") for k in JSON_KEYS if f"{k}_json" in wire}
    out = [f"{path}.{n}: in the config, not on the wire" for n in sorted(names - set(wire))]
    out += [f"{path}.{n}: on the wire, not in the config" for n in sorted(set(wire) - names)]
    for name in sorted(names & set(wire)):
        tp = hints[name]
        field = wire[name]
        if dataclasses.is_dataclass(tp):
            if field.message_type is None:
                out.append(f"{path}.{name}: a section in the config, a scalar on the wire")
            else:
                out += _drift(typing.cast(type, tp), field.message_type, f"{path}.{name}")
        elif field.message_type is None and not _repeated(field) and not field.has_presence:
            out.append(f"{path}.{name}: the wire field has no presence (an explicit zero would be lost)")
    return out
