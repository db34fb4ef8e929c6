"""Strict YAML configuration into frozen dataclasses.

Layers, lowest first: dataclass defaults < YAML file < environment (``<PREFIX>KEY__SUBKEY``) < ``--set key.sub=value``
on the command line. Unknown keys and wrong types are errors that name the key path (``job.rounds``); each
dataclass may define ``check(self, path: str) -> None`` to validate values and raise :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.errors import ConfigError

T = TypeVar("T")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: value does not fit {tp}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (tuple, list, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is not list else items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(val_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(f"{path}: expected one of {choices}, got {value!r}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-5" (no dot) as a string; accept a plain numeric literal.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{path}: expected a finite number, got an integer too large for one") from None
        # NaN passes every range check (all comparisons are false) and infinity means no limit: neither is a setting.
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: expected a file path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")  # pragma: no cover - programming error


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly."""
    where = path or "top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key (expected one of: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key_path = _join(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key_path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_path}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check(path)
    return obj


def _set_in(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{origin}: bad key {dotted!r}")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {dotted!r} goes through {part!r}, which is not a mapping")
        node = child
    node[parts[-1]] = value


def _safe_load(text: str) -> Any:
    """``yaml.safe_load``, with every way it can fail as :class:`yaml.YAMLError`.

    PyYAML's constructors raise plain ValueError, KeyError, AttributeError ... on malformed tagged or implicit
    scalars (``!!int abc``, ``2001-13-45``, an integer of more digits than Python converts), and RecursionError on
    deeply nested collections; none of them is a YAMLError.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise
    except Exception as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else f"{type(exc).__name__}: {exc}"
        raise yaml.YAMLError(f"cannot read a value ({reason})") from None


def _parse_scalar(text: str) -> Any:
    try:
        return _safe_load(text)
    except yaml.YAMLError:
        return text


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    try:
        data = _safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def load(
    cls: type[T],
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    env_prefix: str = "",
    overrides: Sequence[str] = (),
) -> T:
    """Load ``cls`` from defaults, a YAML file, environment variables and ``key.path=value`` overrides."""
    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    origins: dict[str, str] = {}  # key path -> the environment variable or --set flag that set it
    if env_prefix and env:
        for name in sorted(env):
            if name.startswith(env_prefix):
                dotted = name[len(env_prefix) :].lower().replace("__", ".")
                _set_in(tree, dotted, _parse_scalar(env[name]), f"environment variable {name}")
                origins[dotted] = f"environment variable {name}"
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        _set_in(tree, key.strip(), _parse_scalar(raw), f"--set {item!r}")
        origins[key.strip()] = f"--set {item}"
    try:
        return build(cls, tree)
    except ConfigError as exc:
        origin = _origin_of(str(exc), origins)
        if origin is not None:
            raise ConfigError(f"{origin}: {exc}") from None
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def _origin_of(message: str, origins: Mapping[str, str]) -> str | None:
    """The environment variable or ``--set`` flag that set the key an error names (its leading ``key.path:``), so
    the operator is sent to what they typed rather than to the YAML file; None when the file set it."""
    named = message.partition(": ")[0]
    best: tuple[int, str] | None = None
    for key, origin in origins.items():
        # The value itself (``server.port``), something inside it (``server.tls.ca``, ``sites[2]``), or the key the
        # error is about lies inside what was set (an unknown key under a mapping given whole).
        inside = named == key or named.startswith((f"{key}.", f"{key}["))
        if inside and (best is None or len(key) > best[0]):
            best = (len(key), origin)
    return best[1] if best is not None else None
