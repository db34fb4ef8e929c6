"""Certificates for virtual sites under secure aggregation: a throwaway CA made for one simulation, kept in memory.

Secure aggregation signs each site's round keys with its certificate key and checks them against the federation's
CA; the simulation runs that code unchanged, so every virtual site needs an ECDSA key and a certificate. They are
issued by a fresh CA that exists only for the run and is never written to disk.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.ca import create_ca, issue_certificate, new_private_key
from common.certs import Role
from participant.secagg_session import SiteKeys

FEDERATION = "cohort-simulation"


def simulation_keys(sites: Sequence[str]) -> tuple[x509.Certificate, dict[str, SiteKeys]]:
    """The CA certificate, and each site's keys signed by it."""
    from datetime import UTC, datetime, timedelta

    ca_cert, ca_key = create_ca(FEDERATION, days=2)
    now = datetime.now(UTC)
    out: dict[str, SiteKeys] = {}
    for site in sites:
        key = new_private_key()
        cert = issue_certificate(
            ca_cert,
            ca_key,
            name=site,
            role=Role.PARTICIPANT,
            public_key=key.public_key(),
            not_before=now - timedelta(hours=1),
            not_after=now + timedelta(days=1),
            federation=FEDERATION,
        )
        out[site] = SiteKeys(key, cert.public_bytes(serialization.Encoding.PEM), (ca_cert,))
    return ca_cert, out
