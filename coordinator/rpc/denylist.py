"""Revocation: a deny-list of site ids, certificate serials and fingerprints, reloaded while the coordinator runs.

The file (``federation.deny_list``) is YAML with up to three lists, each optional::

    sites: [hospital-3]                    # every certificate of these sites
    serials: ["5f3a...", "0x5f3a..."]      # hex, as `cohort certs show` prints them (quoted; colons allowed)
    fingerprints: ["AB:CD:..."]            # SHA-256 of the certificate (64 hex digits; colons, "sha256:" allowed)

It is read strictly: unknown keys, wrong types and malformed entries are errors naming the entry. A broken or
missing file at start-up stops the coordinator; a broken file later keeps the previous list (and is logged and
audited as ``deny_list_error``), so a half-written edit never lifts a revocation. Write the new file beside the old
one and rename it over, and the coordinator sees either the old list or the new one.

:class:`Revocations` holds the live list. It is checked at the start of every call, and a new list takes effect at
once: the live sessions it revokes are dropped from the registry (the job runner sees the site go away, so in an open
round it is a dropout), their work streams end with PERMISSION_DENIED, and in-flight transfers of a revoked
certificate are cut (they :meth:`Revocations.watch` their certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from common.certs import Role
from common.errors import CertificateRevoked, ConfigError
from common.names import RULE, is_name
from common.tls import CertRef

if TYPE_CHECKING:
    from coordinator.state.registry import Registry
    from coordinator.state.store import Store

log = logging.getLogger("cohort.coordinator.rpc.denylist")

_HEX = re.compile(r"[0-9a-f]+")
_KEYS = ("sites", "serials", "fingerprints")
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class DenyList:
    """Revoked site ids (participants only), certificate serials and fingerprints (any role)."""

    sites: frozenset[str] = frozenset()
    serials: frozenset[int] = frozenset()
    fingerprints: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.sites) + len(self.serials) + len(self.fingerprints)

    def reason(self, ref: CertRef) -> str | None:
        """Why ``ref`` is revoked, or None when it is not."""
        if ref.role is Role.PARTICIPANT and ref.name in self.sites:
            return f"site {ref.name!r} is on the federation's deny-list"
        if ref.serial in self.serials:
            return f"certificate serial {ref.serial:x} of {ref.role.value} {ref.name!r} is on the deny-list"
        if ref.fingerprint in self.fingerprints:
            return f"certificate sha256 {ref.fingerprint[:16]}... of {ref.role.value} {ref.name!r} is on the deny-list"
        return None

    def summary(self) -> dict[str, list[str]]:
        """The entries as text, for the audit log."""
        return {
            "sites": sorted(self.sites),
            "serials": sorted(f"{s:x}" for s in self.serials),
            "fingerprints": sorted(self.fingerprints),
        }


def _hex_entry(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a quoted hex string ({what}), got {value!r}")
    text = value.strip().lower()
    text = text.removeprefix("sha256:") if what == "fingerprint" else text.removeprefix("0x")
    text = text.replace(":", "")
    if not text or not _HEX.fullmatch(text):
        raise ConfigError(f"{where}: {value!r} is not a hex {what}")
    return text


def parse_deny_list(data: Any, source: str) -> DenyList:
    """Validate a loaded YAML document strictly; :class:`ConfigError` names the bad entry."""
    if data is None:
        return DenyList()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping with keys {', '.join(_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown key (expected one of: {', '.join(_KEYS)})")
    lists: dict[str, list[Any]] = {}
    for key in _KEYS:
        value = data.get(key)
        if value is None:
            value = []
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {type(value).__name__}")
        if len(value) > MAX_ENTRIES:
            raise ConfigError(f"{source}: {key}: more than {MAX_ENTRIES} entries")
        lists[key] = value
    sites: set[str] = set()
    for i, site in enumerate(lists["sites"]):
        if not isinstance(site, str) or not is_name(site):
            raise ConfigError(f"{source}: sites[{i}]: {site!r} is not a valid site id ({RULE})")
        sites.add(site)
    serials = {int(_hex_entry(v, f"{source}: serials[{i}]", "serial"), 16) for i, v in enumerate(lists["serials"])}
    fingerprints: set[str] = set()
    for i, v in enumerate(lists["fingerprints"]):
        fp = _hex_entry(v, f"{source}: fingerprints[{i}]", "fingerprint")
        if len(fp) != 64:
            raise ConfigError(f"{source}: fingerprints[{i}]: a SHA-256 fingerprint has 64 hex digits, got {len(fp)}")
        fingerprints.add(fp)
    return DenyList(frozenset(sites), frozenset(serials), frozenset(fingerprints))


def load_deny_list(path: Path) -> DenyList:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read deny-list {path}: {reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_deny_list(data, str(path))


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten or replaced (mtime, size, inode); None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class Revocations:
    """The live deny-list, its reloads, and what a new list does to live sessions and in-flight calls."""

    def __init__(
        self,
        path: Path | None,
        poll_s: float,
        registry: Registry,
        store: Store,
        initial: tuple[DenyList, tuple[int, int, int] | None] | None = None,
    ) -> None:
        self.path = path
        self.poll_s = poll_s
        self.registry = registry
        self.store = store
        self.current, self._signature = initial if initial is not None else self.initial(path)
        self._watchers: dict[CertRef, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def initial(path: Path | None) -> tuple[DenyList, tuple[int, int, int] | None]:
        """The list at start-up and the file's signature; a broken or missing file is fatal, like a config error."""
        if path is None:
            return DenyList(), None
        signature = _signature(path)
        try:
            return load_deny_list(path), signature
        except ConfigError as exc:
            raise ConfigError(f"federation.deny_list: {exc}") from None

    def start(self) -> None:
        """Audit the initial list and poll the file (until the registry closes, at shutdown)."""
        if self.path is None:
            return
        self.store.audit("deny_list_loaded", "coordinator", path=str(self.path), **self.current.summary())
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll_loop(), name="deny-list-poll")

    async def _poll_loop(self) -> None:
        stop = self.registry.closed
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_s)
            if stop.is_set():
                return
            try:
                self.poll()
            except Exception:  # the poller must outlive any one bad reload
                log.exception("deny-list reload failed")

    def poll(self) -> bool:
        """Reload if the file changed since the last look; True when a new list took effect."""
        if self.path is None:
            return False
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        return self.reload()

    def reload(self) -> bool:
        """Read the file now (also the SIGHUP action). A broken file keeps the previous list."""
        if self.path is None:
            return False
        try:
            new = load_deny_list(self.path)
        except ConfigError as exc:
            log.error("deny-list not reloaded, keeping the previous one (%d entries): %s", len(self.current), exc)
            self.store.audit("deny_list_error", "coordinator", path=str(self.path), error=str(exc)[:500])
            return False
        old, self.current = self.current, new
        if new != old:
            log.info("deny-list reloaded: %d entries", len(new))
            self.store.audit("deny_list_loaded", "coordinator", path=str(self.path), **new.summary())
        self._enforce()
        return True

    def replace(self, new: DenyList) -> None:
        """Put ``new`` into effect without a file (tests, embedding)."""
        self.current = new
        self._enforce()

    def check(self, ref: CertRef) -> None:
        """Raise :class:`CertificateRevoked` when ``ref`` is on the current list."""
        reason = self.current.reason(ref)
        if reason is not None:
            raise CertificateRevoked(f"certificate revoked: {reason}; ask the federation operator")

    @contextlib.contextmanager
    def watch(self, ref: CertRef) -> Iterator[asyncio.Event]:
        """An event that is set if ``ref`` is revoked while the ``with`` block (an in-flight call) runs."""
        event = asyncio.Event()
        self._watchers.setdefault(ref, set()).add(event)
        try:
            if self.current.reason(ref) is not None:
                event.set()
            yield event
        finally:
            events = self._watchers.get(ref)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._watchers[ref]

    def _enforce(self) -> None:
        """Drop revoked sessions (the registry tells the job runner) and wake revoked in-flight calls."""
        for session in self.registry.sessions():
            ref = session.cert or CertRef(Role.PARTICIPANT, session.site, -1, "")
            reason = self.current.reason(ref)
            if reason is None:
                continue
            was_connected = session.connected
            self.registry.drop(session.site)
            log.warning("site %r revoked (%s); its session was dropped", session.site, reason)
            self.store.audit("site_revoked", session.site, reason=reason, connected=was_connected)
        for ref, events in list(self._watchers.items()):
            if self.current.reason(ref) is not None:
                for event in events:
                    event.set()
