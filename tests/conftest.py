"""Shared fixtures: a real federation PKI (including foreign, expired and unlisted certificates), site data on
disk, and coordinator/participant daemons that bind to 127.0.0.1 port 0 and are closed after each test."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from support import SITES, UNLISTED, Pki, cert_pem, key_pem, write_identity

from common.ca import create_ca, init_federation, issue_certificate, load_ca, new_private_key
from common.certs import Role
from common.datasets import load_source, split_sites, write_site_folders
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from participant.config import ParticipantConfig
from participant.daemon import ParticipantDaemon


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts real daemons (coordinator or participants) is a federation test: slow lane."""
    for item in items:
        if {"coordinator_factory", "participant_factory"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ids = init_federation(root / "certs", sites=(*SITES, UNLISTED), admins=("admin",), federation="test")
    ca_pem = ids["coordinator"].ca.read_bytes()

    # A participant certificate for "site-a" issued by a CA the coordinator does not trust.
    other_ca, other_key = create_ca("other", 30)
    key = new_private_key()
    now = dt.datetime.now(dt.UTC)
    cert = issue_certificate(
        other_ca,
        other_key,
        name="site-a",
        role=Role.PARTICIPANT,
        public_key=key.public_key(),
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=30),
    )
    foreign = write_identity(root / "foreign", ca_pem, cert_pem(cert), key_pem(key))

    # An expired certificate for "site-a" from the real federation CA.

    real_ca, real_key = load_ca(root / "certs" / "ca")
    key = new_private_key()
    cert = issue_certificate(
        real_ca,
        real_key,
        name="site-a",
        role=Role.PARTICIPANT,
        public_key=key.public_key(),
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    expired = write_identity(root / "expired", ca_pem, cert_pem(cert), key_pem(key))
    return Pki(root, ids, foreign, expired)


@pytest.fixture(scope="session")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """breast_cancer split over SITES, non-IID (Dirichlet alpha 0.5), fixed seed."""
    root = tmp_path_factory.mktemp("data")
    x, y, schema = load_source("breast_cancer")
    splits = split_sites(x, y, SITES, alpha=0.5, seed=7)
    return write_site_folders(root, splits, schema)


@pytest.fixture
async def coordinator_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[CoordinatorDaemon]]]:
    started: list[CoordinatorDaemon] = []

    async def make(config: CoordinatorConfig) -> CoordinatorDaemon:
        daemon = CoordinatorDaemon(config)
        await daemon.start()
        started.append(daemon)
        return daemon

    yield make
    for d in started:
        await d.close("test teardown")


@pytest.fixture
async def participant_factory() -> AsyncIterator[Callable[..., Awaitable[ParticipantDaemon]]]:
    started: list[ParticipantDaemon] = []

    async def make(config: ParticipantConfig) -> ParticipantDaemon:
        daemon = ParticipantDaemon(config)
        await daemon.start()
        started.append(daemon)
        return daemon

    yield make
    for d in started:
        await d.close("test teardown")
