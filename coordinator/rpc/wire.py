"""Registering the servicers with request decoding that cannot fail inside gRPC.

The generated ``add_*Servicer_to_server`` functions decode requests with ``Message.FromString``; bytes that are not
a valid message make gRPC answer UNKNOWN or INTERNAL and log an error before our code runs. Here each method gets a
decoder that returns :class:`Undecodable` instead, which the servicers refuse with INVALID_ARGUMENT and audit like
any other bad input (non-negotiable 5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from common.errors import InvalidArgument
from common.proto.cohort.v1 import cohort_pb2 as pb


class Undecodable:
    """A request whose bytes are not a valid message of the method's type."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a valid {self.type_name} message ({self.reason})")


def refuse_undecodable(request: object) -> None:
    if isinstance(request, Undecodable):
        raise request.error()


def _decoder(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def decode(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError, and anything else the parser raises on hostile bytes
            return Undecodable(cls.DESCRIPTOR.full_name, type(exc).__name__)

    return decode


def _encode(message: Message | bytes) -> bytes:
    """The message's bytes; ``bytes`` pass as they are (a data chunk already serialized by common/raw_chunks.py, so a
    1 MiB model chunk is copied once, not into a message and out again)."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def add_service(server: grpc.aio.Server, service: str, servicer: object) -> None:
    """Register every method of ``cohort.v1.<service>`` on ``servicer`` (methods named as in the proto)."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        request_cls: type[Message] = getattr(pb, method.input_type.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        behaviour: Any = getattr(servicer, method.name)
        handlers[method.name] = kind(
            behaviour,
            request_deserializer=_decoder(request_cls),
            response_serializer=_encode,
        )
    generic = grpc.method_handlers_generic_handler(descriptor.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
