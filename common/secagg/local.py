"""Run a whole SecAgg round in one process: the reference for the order of calls, and the engine of tests and bench.

The gRPC layer does exactly this, with each arrow a message and each ``close_*`` at a deadline::

    site.advertise()                       -> server.receive_advertisement      ; server.close_advertise()
    server.advertisements_for(site)        -> site.share_keys(...)              -> server.receive_share_keys
                                                                                 ; server.close_share_keys()
    server.shares_for(site)                -> site.receive_shares(...)
    site.masked_input(encode(update))      -> server.receive_masked_input       ; server.close_masked_input() -> U3
    U3                                     -> site.consistency_check(U3)        -> server.receive_survivor_signature
                                                                                 ; server.close_consistency()
    server.signatures_for(site)            -> site.unmask(...)                  -> server.receive_unmask
                                                                                 ; server.finish() -> sum mod 2**b

A site may drop out at any arrow; ``drops`` says where each dropping site stops.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from common.secagg.client import SecAggClient
from common.secagg.prg import U32Array
from common.secagg.server import SecAggServer


class DropPoint(enum.Enum):
    """The first stage a dropping site does not take part in."""

    ADVERTISE = "advertise"  # never advertises keys
    SHARE_KEYS = "share_keys"  # advertised, never shares keys
    MASKED_INPUT = "masked_input"  # shared keys, never sends its masked input
    CONSISTENCY = "consistency_check"  # sent its masked input, never signs the survivor list
    UNMASK = "unmask"  # signed, never sends its shares


def run_local_round(
    server: SecAggServer,
    clients: Mapping[str, SecAggClient],
    inputs: Mapping[str, U32Array],
    drops: Mapping[str, DropPoint] | None = None,
) -> U32Array:
    """Drive every stage in order and return :meth:`SecAggServer.finish`'s sum. Errors propagate unchanged."""
    drops = drops or {}

    def staying(stage: DropPoint, members: frozenset[str] | set[str]) -> list[str]:
        return sorted(s for s in members if drops.get(s) is not stage)

    live = set(staying(DropPoint.ADVERTISE, set(clients)))
    for site in sorted(live):
        server.receive_advertisement(site, clients[site].advertise())
    u1 = server.close_advertise()

    live = set(staying(DropPoint.SHARE_KEYS, u1))
    for site in sorted(live):
        server.receive_share_keys(site, clients[site].share_keys(server.advertisements_for(site)))
    u2 = server.close_share_keys()

    for site in staying(DropPoint.MASKED_INPUT, u2):
        clients[site].receive_shares(server.shares_for(site))
        server.receive_masked_input(site, clients[site].masked_input(inputs[site]))
    u3 = server.close_masked_input()

    for site in staying(DropPoint.CONSISTENCY, set(u3)):
        server.receive_survivor_signature(site, clients[site].consistency_check(u3))
    u4 = server.close_consistency()

    for site in staying(DropPoint.UNMASK, u4):
        server.receive_unmask(site, clients[site].unmask(server.signatures_for(site)))
    return server.finish()
