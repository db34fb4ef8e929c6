"""Connected participant sessions: who is here, what task they declared, and their outgoing work queues.

One session per site (a new Join replaces the old one). A site counts as connected while its WaitForWork stream
is open; the job runner is told when a site connects or goes away, including when its session is dropped because
its certificate was revoked (coordinator/denylist.py) or because it went silent (:meth:`Registry.silent`: an idle
site that stopped heartbeating; a site with a task in hand is left to HTTP/2 keepalive and the task's deadline).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.proto.cohort.v1 import cohort_pb2 as pb
from common.tls import CertRef


@dataclass(frozen=True)
class Declaration:
    """What a site says it runs: compared with the job before the site is given work."""

    task_name: str
    task_digest: str
    schema_fingerprint: str
    software_version: str
    # The parts of task_digest (common/tasks/digest.py); empty from a site that does not send them.
    task_version: str = ""
    task_code_digest: str = ""
    training_code_digest: str = ""


@dataclass(eq=False)
class Session:
    site: str
    session_id: str
    declaration: Declaration
    joined: float
    last_seen: float
    queue: asyncio.Queue[pb.WorkItem | None] = field(default_factory=asyncio.Queue)
    streams: int = 0
    heard: float = 0.0  # when the site last proved it is alive (attach or Heartbeat)
    beats: bool = False  # it sends Heartbeat calls (a client that never does is watched by HTTP/2 keepalive only)
    cert: CertRef | None = None  # the certificate the site joined with (revocation by serial or fingerprint)
    # Until when (wall clock) the site has work in hand: the deadline of the last train or evaluate task sent to it.
    # Meanwhile a late heartbeat does not drop it (a busy site is not a dead one); its connection's HTTP/2
    # keepalive and the task's deadline still do.
    busy_until: float = 0.0
    instance: str = ""  # the daemon process that joined (JoinRequest.instance)
    displaced: str = ""  # the other daemon's instance this session replaced while it was connected (a duplicate)

    @property
    def connected(self) -> bool:
        return self.streams > 0


Listener = Callable[[str, bool], None]  # (site, connected)


class Registry:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._sessions: dict[str, Session] = {}
        self._clock = clock
        self._listeners: list[Listener] = []
        self._replaced: dict[str, tuple[str, str]] = {}  # site -> (session id, winner) of a displaced duplicate
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()  # set by close_all(): shutdown; background watchers stop on it

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, site: str, connected: bool) -> None:
        self.changed.set()
        for listener in list(self._listeners):
            listener(site, connected)

    def join(self, site: str, declaration: Declaration, cert: CertRef | None = None, instance: str = "") -> Session:
        old = self._sessions.get(site)
        now = self._clock()
        session = Session(site, secrets.token_hex(16), declaration, now, now, cert=cert, instance=instance)
        if old is not None:
            if old.connected and old.instance and instance and old.instance != instance:
                # Another daemon with this site's identity is connected: the newer one wins (a restarted daemon must
                # not wait for its dead predecessor to time out); the older is told it was replaced and stops.
                session.displaced = old.instance
                self._replaced[site] = (old.session_id, instance)
            old.queue.put_nowait(None)  # ends the old session's stream
        self._sessions[site] = session
        return session

    def attach(self, site: str, session_id: str) -> Session | None:
        session = self._sessions.get(site)
        if session is None or not secrets.compare_digest(session.session_id.encode(), session_id.encode()):
            return None
        session.streams += 1
        session.last_seen = session.heard = self._clock()
        if session.streams == 1:
            self._notify(site, True)
        return session

    def drop(self, site: str) -> Session | None:
        """Forget ``site``'s session now (its certificate was revoked): end its stream, tell the listeners.

        Listeners hear ``(site, False)`` at once if it was connected, not when its stream finishes closing, so an
        open round counts the site as a dropout before it can send anything more.
        """
        session = self._sessions.pop(site, None)
        if session is None:
            return None
        session.queue.put_nowait(None)
        if session.connected:
            self._notify(site, False)
        return session

    def detach(self, session: Session) -> None:
        session.streams = max(0, session.streams - 1)
        current = self._sessions.get(session.site) is session
        if session.streams == 0 and current:
            self._notify(session.site, False)

    def displaced_by(self, site: str, session_id: str) -> str | None:
        """The instance that replaced ``site``'s session ``session_id`` as a duplicate daemon, or None."""
        replaced = self._replaced.get(site)
        if replaced is None or not secrets.compare_digest(replaced[0].encode(), session_id.encode()):
            return None
        return replaced[1]

    def heartbeat(self, site: str, session_id: str) -> bool:
        """Record that ``site``'s current session is alive; False when that session is not (or no longer) current."""
        session = self._sessions.get(site)
        if session is None or not secrets.compare_digest(session.session_id.encode(), session_id.encode()):
            return False
        session.heard = session.last_seen = self._clock()
        session.beats = True
        return True

    def silent(self, ttl: float) -> list[Session]:
        """Connected, heartbeating sessions not heard from for more than ``ttl`` seconds and with no work in hand."""
        now = self._clock()
        return [
            s
            for s in self._sessions.values()
            if s.connected and s.beats and now - s.heard > ttl and now >= s.busy_until
        ]

    def touch(self, site: str) -> None:
        session = self._sessions.get(site)
        if session is not None:
            session.last_seen = self._clock()

    def connected(self) -> list[Session]:
        return [s for s in self._sessions.values() if s.connected]

    def sessions(self) -> list[Session]:
        return sorted(self._sessions.values(), key=lambda s: s.site)

    def send(self, site: str, item: pb.WorkItem) -> bool:
        session = self._sessions.get(site)
        if session is None or not session.connected:
            return False
        session.queue.put_nowait(item)
        kind = item.WhichOneof("kind")
        if kind == "train" or kind == "evaluate":
            session.busy_until = max(session.busy_until, getattr(item, kind).deadline_unix)
        return True

    def close_all(self) -> None:
        self.closed.set()
        for session in self._sessions.values():
            session.queue.put_nowait(None)
