"""Binding the coordinator's gRPC port, with a mistake in ``server.listen`` told as one line.

gRPC's own failure is ``RuntimeError: Failed to bind to address ...; set GRPC_VERBOSITY=debug``. This module says
why: a host that does not resolve, an address in use (another coordinator: gRPC's ``SO_REUSEPORT`` is turned off,
see :data:`NO_REUSEPORT`, so a second coordinator cannot share the port and split the federation), or an address
that is not this host's.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

import grpc

from common.errors import ConfigError
from common.settings import parse_address

if TYPE_CHECKING:
    from coordinator.rpc.bulk import BulkServer

# gRPC sets SO_REUSEPORT on listening sockets by default, so a second server on a used port starts silently and the
# kernel spreads connections over both.
NO_REUSEPORT: list[tuple[str, int]] = [("grpc.so_reuseport", 0)]


def resolve(address: str, key: str = "server.listen") -> tuple[str, int]:
    """``(host, port)`` of ``address``; :class:`ConfigError` when the host does not resolve."""
    host, port = parse_address(address, key)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(
            f"{key}: host {host!r} does not resolve ({exc.strerror}); use an address of this host"
        ) from None
    return host, port


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials, key: str = "server.listen") -> int:
    """Add the secure port; the bound port, or :class:`ConfigError` saying why the address cannot be used."""
    host, port = resolve(address, key)
    try:
        bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ConfigError(f"{key}: cannot listen on {address}: {_why(host, port)}")
    return bound


def _why(host: str, port: int) -> str:
    """Try the bind ourselves to learn the reason gRPC does not report."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"host {host!r} does not resolve ({exc.strerror})"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "the address is already in use (another coordinator, or another program, listens there)"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"{host!r} is not an address of this host"
                if exc.errno == errno.EACCES:
                    return f"port {port} needs privileges this process does not have"
                return exc.strerror or str(exc)
    return "gRPC refused the address (GRPC_VERBOSITY=debug shows its detail)"


def bind_data(server: BulkServer, address: str) -> int:
    """Start the bulk data channel on ``address``; its bound port, or :class:`ConfigError` saying why not."""
    host, port = resolve(address, "server.data_listen")
    try:
        return server.start()
    except OSError:
        raise ConfigError(f"server.data_listen: cannot listen on {address}: {_why(host, port)}") from None
