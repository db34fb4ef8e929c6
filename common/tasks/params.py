"""Task parameters: values a job passes to its task (model width, loss, features to use), checked against a schema
the task itself declares.

A task declares ``params_schema``: a mapping from parameter name to :class:`Param` (its type, default, bounds or
choices, a one-line help). A job names values in ``job.task_params``; :func:`validate` fills in the defaults and
refuses an unknown name, a wrong type or a value out of bounds with an error that names the key path
(``job.task_params.hidden``). The values travel to the sites as canonical JSON (:func:`canonical_json`), so the
coordinator and every site build the same model, and they are part of the job's identity.

Only scalars: ``int``, ``float``, ``bool`` and ``str``. Nothing in them is ever executed or imported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from common.errors import ConfigError

ParamValue = bool | int | float | str
ParamKind = Literal["int", "float", "bool", "str"]
MAX_PARAMS = 64
MAX_JSON_BYTES = 16_384


@dataclass(frozen=True)
class Param:
    """One declared task parameter. ``low``/``high`` bound numbers (inclusive); ``choices`` lists allowed values."""

    kind: ParamKind
    default: ParamValue
    help: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[ParamValue, ...] = ()

    def __post_init__(self) -> None:
        # A schema whose own default does not pass is a bug in the task: fail when the task is defined.
        self.convert(self.default, "default")

    def convert(self, value: object, where: str) -> ParamValue:
        """``value`` as this parameter's type, or ConfigError naming ``where``."""
        out: ParamValue
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            out = value
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            out = value
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            out = float(value)
        else:
            if not isinstance(value, str):
                raise ConfigError(f"{where}: expected a string, got {value!r}")
            out = value
        if isinstance(out, int | float) and not isinstance(out, bool):
            if self.low is not None and out < self.low:
                raise ConfigError(f"{where}: must be >= {self.low:g}, got {out!r}")
            if self.high is not None and out > self.high:
                raise ConfigError(f"{where}: must be <= {self.high:g}, got {out!r}")
        if self.choices and out not in self.choices:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, self.choices))}, got {out!r}")
        return out


ParamsSchema = Mapping[str, Param]


def validate(schema: ParamsSchema, values: Mapping[str, object], where: str = "task_params") -> dict[str, ParamValue]:
    """The task's parameters: ``values`` checked against ``schema``, with every missing one at its default."""
    if len(values) > MAX_PARAMS:
        raise ConfigError(f"{where}: at most {MAX_PARAMS} parameters")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        known = ", ".join(sorted(schema)) or "none: this task takes no parameters"
        raise ConfigError(f"{where}.{unknown[0]}: unknown task parameter (the task declares: {known})")
    out: dict[str, ParamValue] = {}
    for name, param in schema.items():
        out[name] = param.convert(values[name], f"{where}.{name}") if name in values else param.default
    return out


def canonical_json(values: Mapping[str, ParamValue]) -> str:
    """The one text form of a parameter set: sorted keys, no spaces; what travels and what identity hashes."""
    return json.dumps(dict(values), sort_keys=True, separators=(",", ":"), allow_nan=False)


def parse_json(text: str, where: str = "task_params") -> dict[str, ParamValue]:
    """Parameters received as JSON (from a job spec or a train task): a flat object of scalars, else ConfigError.

    Checks shape only; :func:`validate` checks the values against the task's schema.
    """
    if not text:
        return {}
    if len(text.encode()) > MAX_JSON_BYTES:
        raise ConfigError(f"{where}: more than {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise ConfigError(f"{where}: not a JSON object") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: not a JSON object")
    for key, value in data.items():
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(f"{where}.{key}: expected a number, true/false or a string")
    return dict(data)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a finite number")


def describe(schema: ParamsSchema) -> list[str]:
    """One line per parameter, for ``cohort task check`` and the docs."""
    lines = []
    for name, p in sorted(schema.items()):
        bounds = ""
        if p.choices:
            bounds = " one of " + ", ".join(map(repr, p.choices))
        elif p.low is not None or p.high is not None:
            low = "" if p.low is None else f"{p.low:g}"
            high = "" if p.high is None else f"{p.high:g}"
            bounds = f" in [{low}, {high}]"
        lines.append(f"{name}: {p.kind}, default {p.default!r}{bounds}" + (f" ({p.help})" if p.help else ""))
    return lines
