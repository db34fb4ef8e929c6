"""Protobuf messages as JSON for people and scripts: the proto's field names, every field (zeros and empty strings
too) and 64-bit integers as numbers (protobuf's JSON mapping writes them as strings). ``cohort status --json`` and the
coordinator's dashboard (``/api/dashboard``) use the same encoding, so their numbers compare equal."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def message_dict(message: Message) -> dict[str, Any]:
    """``message`` as a JSON-ready dict (see the module docstring)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(data, message.DESCRIPTOR)


def to_json(message: Message) -> str:
    return json.dumps(message_dict(message), indent=2)


_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _numbers(data: dict[str, Any], descriptor: Any) -> dict[str, Any]:  # a message Descriptor (python or upb)
    """``data`` (MessageToDict of a ``descriptor`` message) with its 64-bit integer strings turned into ints."""
    for name, value in data.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                data[name] = {k: _numbers(v, value_field.message_type) for k, v in value.items()}
            elif value_field.type in _INT64:
                data[name] = {k: int(v) for k, v in value.items()}
        elif field.message_type is not None:
            if isinstance(value, list):
                data[name] = [_numbers(v, field.message_type) for v in value]
            elif isinstance(value, dict):
                data[name] = _numbers(value, field.message_type)
        elif field.type in _INT64:
            data[name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data
