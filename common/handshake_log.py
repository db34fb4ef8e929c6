"""TLS handshake refusals read from gRPC core's own log, since grpcio gives Python no hook for them.

A connection whose TLS handshake fails never becomes a call, so no servicer or interceptor sees it, and grpcio has no
certificate-verification callback for servers (grpc/grpc#32635). gRPC core does log the failure with BoringSSL's
reason (``CERTIFICATE_VERIFY_FAILED: certificate has expired``), and with its ``handshaker`` tracer on, the same log
record carries the peer's address (``endpoint_peer_address=ipv4:10.0.0.7:51234``). This module:

- turns that tracer on (:func:`enable_tracer`). gRPC core reads ``GRPC_TRACE`` once, when ``grpc`` is first
  imported, so this must run before that import (``cohort coordinator`` does it in :mod:`cohort_cli.entry`);
- reads gRPC core's log lines (:class:`CoreLogFilter`): each failed server handshake becomes a
  :class:`HandshakeFailure` with the peer address and a reason class; the tracer's own lines, which the operator did
  not ask for, are dropped; every other line passes through unchanged;
- starts (:func:`start_filter`) and is (``python -m common.handshake_log``) the filter process: its stdin is the
  daemon's stderr from start to exit, the filtered text goes to its own stderr (the daemon's original one), the
  events to its stdout as JSON lines. A separate process rather than a thread, so a daemon that dies abruptly (a gRPC
  core ``FATAL``) still gets its last words printed, and nothing the daemon logs can end up waiting on itself.

It depends on the text of gRPC core's log, which is not an API: the grpcio pin (constraints.txt) is the version this
parser is tested against; if the tracer's records stop coming, BoringSSL's line still turns into a failure with
``peer=unknown`` (and is shown as it was).
Nothing here imports ``grpc``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, BinaryIO, TextIO

TRACER = "handshaker"
LEVELS = "IWEF"  # absl's severities, in order
# GRPC_VERBOSITY values and the lowest absl severity each lets through.
_VERBOSITY = {"DEBUG": "I", "INFO": "I", "WARNING": "W", "ERROR": "E", "NONE": "Z"}

# An absl log line: "I1204 14:27:00.453085   20317 handshaker.cc:155] message"
_ABSL = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([^\s:\]]+):\d+\] ?(.*)$", re.DOTALL)
_PEER = re.compile(r"grpc\.internal\.endpoint_peer_address=([^,}\s]+)")
_LOCAL = re.compile(r"grpc\.internal\.endpoint_local_address=([^,}\s]+)")
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)(?::\s*([^:\n]*))?")
_CONTINUATION = re.compile(r"^(=== Source Location Trace: ===|\S+\.(?:cc|h):\d+| shutdown=.*)\s*$", re.DOTALL)

# BoringSSL's certificate verification messages -> the reason classes an operator acts on.
_VERIFY = {
    "certificate has expired": "expired",
    "certificate is not yet valid": "not_yet_valid",
    "unsupported certificate purpose": "wrong_purpose",
    "unable to get local issuer certificate": "unknown_ca",
    "unable to get issuer certificate": "unknown_ca",
    "unable to verify the first certificate": "unknown_ca",
    "self signed certificate": "unknown_ca",
    "self-signed certificate": "unknown_ca",
    "self signed certificate in certificate chain": "unknown_ca",
    "self-signed certificate in certificate chain": "unknown_ca",
}
_NO_CERTIFICATE = {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED", "TLSV13_ALERT_CERTIFICATE_REQUIRED"}
_INCOMPLETE = ("Handshake read failed", "Socket closed", "timed out", "Connection reset", "Broken pipe", "shutdown")
REASONS = (
    "no_certificate",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "wrong_purpose",
    "bad_certificate",
    "protocol",
    "incomplete",
)


@dataclass(frozen=True)
class HandshakeFailure:
    """One failed TLS handshake: who (``peer``, as gRPC writes it), where (``local``), why (class and detail)."""

    peer: str
    local: str
    reason: str
    detail: str


@dataclass(frozen=True)
class TracerSetup:
    """What :func:`enable_tracer` did: ``consume`` the tracer's lines (we turned it on, not the operator) and forward
    gRPC core's other lines only from ``min_level`` up (what the operator's GRPC_VERBOSITY asked for)."""

    consume: bool
    min_level: str = "I"

    def filter_args(self) -> list[str]:
        return [*(["--consume"] if self.consume else []), "--min-level", self.min_level]


def tracer_env(environ: MutableMapping[str, str]) -> TracerSetup:
    """Add the handshake tracer to ``environ``'s GRPC_TRACE (and let INFO through); say what the filter must undo."""
    tracers = [t.strip() for t in environ.get("GRPC_TRACE", "").split(",") if t.strip()]
    consume = TRACER not in tracers and "all" not in tracers
    if consume:
        environ["GRPC_TRACE"] = ",".join([*tracers, TRACER])
    # The tracer writes at INFO: a stricter GRPC_VERBOSITY would hide it, so the filter applies that level instead.
    asked = _VERBOSITY.get(environ.get("GRPC_VERBOSITY", "").upper(), "I")
    if asked != "I":
        environ["GRPC_VERBOSITY"] = "INFO"
    return TracerSetup(consume=consume, min_level=asked)


def enable_tracer(environ: MutableMapping[str, str]) -> TracerSetup | None:
    """Turn on gRPC's handshake tracer for this process; None (and nothing changed) if ``grpc`` is already loaded."""
    if "grpc" in sys.modules:
        return None
    return tracer_env(environ)


@dataclass
class RunningFilter:
    """The filter process that this process's stderr (fd 2) goes through; ``events`` is its JSON-lines output."""

    proc: subprocess.Popen[bytes]
    events: IO[bytes]
    _saved: int | None

    def restore(self) -> None:
        """Point fd 2 back at the original stderr: the filter gets end-of-input, prints what it holds and exits."""
        if self._saved is None:
            return
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None

    def stop(self, timeout_s: float = 5.0) -> None:
        self.restore()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_FILTER: RunningFilter | None = None


def start_filter(environ: MutableMapping[str, str]) -> RunningFilter | None:
    """Turn the tracer on and send fd 2 through the filter process from now to exit (before ``grpc`` is imported).

    Early, so that gRPC's own start-up lines (the list of tracers) and any error before the daemon starts go through
    the same filter. The filter is stopped at exit, after this process's last words. None if ``grpc`` is loaded.
    """
    global _FILTER
    setup = enable_tracer(environ)
    if setup is None:
        return None
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "common.handshake_log", *setup.filter_args()],
            stdin=read_fd,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C in the terminal is for the daemon, which then closes our input
        )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    assert proc.stdout is not None
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _FILTER = RunningFilter(proc, proc.stdout, saved)
    atexit.register(_FILTER.stop)
    return _FILTER


def running_filter() -> RunningFilter | None:
    """The filter :func:`start_filter` started in this process, if any."""
    return _FILTER


def classify(error: str) -> tuple[str, str]:
    """The reason class and a short detail for the error text of a failed handshake."""
    first = error.strip().splitlines()[0] if error.strip() else ""
    first = first.removesuffix(": OK").strip()
    ssl = _SSL_REASON.search(first)
    if ssl is not None:
        code, message = ssl.group(1), (ssl.group(2) or "").strip()
        if code == "CERTIFICATE_VERIFY_FAILED":
            return _VERIFY.get(message, "bad_certificate"), f"{code}: {message}"[:200]
        if code in _NO_CERTIFICATE:
            return "no_certificate", code
        return "protocol", code
    if any(marker in first for marker in _INCOMPLETE):
        return "incomplete", first[:200]
    return "protocol", first[:200]


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


@dataclass
class _Record:
    """A gRPC core record that may go on over several lines (a status with its source-location trace)."""

    call: bool  # a CallNextHandshakerLocked record (ends with its " shutdown=... args={...}" line); else tracer noise
    lines: list[bytes] = field(default_factory=list)

    @property
    def text(self) -> str:
        return b"".join(self.lines).decode("utf-8", "replace")

    @property
    def complete(self) -> bool:
        return self.call and b" shutdown=" in self.lines[-1]


class CoreLogFilter:
    """Reads a stream of log lines; returns, for each, the lines to pass on and the handshake failures it completed.

    Pure (no I/O), so tests feed it recorded lines. ``consume``: drop the handshaker tracer's records and BoringSSL's
    "Handshake failed" lines that a failure event replaces; otherwise pass them through as well. ``min_level``: gRPC
    core records below it are dropped (the operator's GRPC_VERBOSITY); lines that are not gRPC core's always pass.
    """

    def __init__(self, consume: bool = True, min_level: str = "I") -> None:
        self.consume = consume
        self.min_level = min_level
        self._pending: _Record | None = None
        # The tracer logs every connection before its TLS handshake starts; once seen, BoringSSL's line about a failed
        # handshake is redundant (the tracer's record of the same failure carries the address). Not paired line by
        # line: gRPC may log the two from different threads, in either order.
        self._tracer_seen = False

    def feed(self, line: bytes) -> tuple[list[bytes], list[HandshakeFailure]]:
        out: list[bytes] = []
        events: list[HandshakeFailure] = []
        text = line.decode("utf-8", "replace").rstrip("\n")
        match = _ABSL.match(text)
        if match is None:
            if self._pending is not None and _CONTINUATION.match(text):
                self._pending.lines.append(line)
                if self._pending.complete:
                    self._finish(out, events)
            elif self._pending is not None and not self._pending.call and not text.strip():
                self._pending.lines.append(line)  # absl ends a message that ends in a newline with an empty line
                self._finish(out, events)
            else:
                out.append(line)  # not gRPC core's: Python's logging, a traceback, anything else
            return out, events
        self._finish(out, events)
        level, source, message = match.groups()
        if message.startswith("Handshake failed with error"):
            if not self._tracer_seen:  # the tracer is off or its format unknown: report without an address
                reason, detail = classify(message.removeprefix("Handshake failed with error"))
                events.append(HandshakeFailure("unknown", "", reason, _printable(detail)))
                out.append(line)
            elif not self.consume:
                out.append(line)
        elif source == "handshaker.cc" and message.startswith("CallNextHandshakerLocked: error="):
            self._pending = _Record(True, [line])
            if self._pending.complete:
                self._finish(out, events)
        elif source in ("handshaker.cc", "channel_trace.h") and "handshake" in message.lower():
            self._pending = _Record(False, [line])
        elif self.consume and message.strip() == f"gRPC Tracers: {TRACER}":
            pass  # gRPC's start-up note that the tracer is on: we turned it on, the operator did not ask
        elif self.consume and source == "add_port.cc" and message.startswith("Failed to add port"):
            pass  # a bind failure: the coordinator reports it in one line naming server.listen (rpc/listen.py)
        elif self._passes(level):
            out.append(line)
        return out, events

    def close(self) -> tuple[list[bytes], list[HandshakeFailure]]:
        """At end of input: what is still held."""
        out: list[bytes] = []
        events: list[HandshakeFailure] = []
        self._finish(out, events)
        return out, events

    def _passes(self, level: str) -> bool:
        return self.min_level in LEVELS and LEVELS.index(level) >= LEVELS.index(self.min_level)

    def _finish(self, out: list[bytes], events: list[HandshakeFailure]) -> None:
        record, self._pending = self._pending, None
        if record is None:
            return
        if record.call:
            text = record.text
            error = text.split("error=", 1)[1].split(" shutdown=", 1)[0]
            self._tracer_seen = True
            if not error.startswith("OK"):
                peer, local = _PEER.search(text), _LOCAL.search(text)
                reason, detail = classify(error)
                address = peer.group(1) if peer else "unknown"
                events.append(HandshakeFailure(address, local.group(1) if local else "", reason, _printable(detail)))
        if not self.consume:
            out.extend(record.lines)


def run_filter(setup: TracerSetup, lines: Iterable[bytes], text_out: BinaryIO, events_out: TextIO | None) -> None:
    """Filter ``lines`` to ``text_out``; write each failure to ``events_out`` as one JSON line."""
    core = CoreLogFilter(setup.consume, setup.min_level)

    def emit(out: list[bytes], events: list[HandshakeFailure]) -> None:
        nonlocal events_out
        if out:
            try:
                text_out.write(b"".join(out))
                text_out.flush()
            except OSError:
                pass  # the terminal or log collector went away; keep reading so the daemon never blocks
        for event in events:
            if events_out is None:
                continue
            try:
                events_out.write(json.dumps(asdict(event)) + "\n")
                events_out.flush()
            except OSError:
                events_out = None  # the daemon stopped listening; keep forwarding its log

    for line in lines:
        emit(*core.feed(line))
    emit(*core.close())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.handshake_log", description=__doc__)
    parser.add_argument("--consume", action="store_true", help="drop the handshaker tracer's own lines")
    parser.add_argument("--min-level", default="I", help="lowest gRPC core severity to pass on (I, W, E, F, Z)")
    args = parser.parse_args(argv)
    # The daemon ends this process by closing its stderr (our stdin), after its own last words; a Ctrl-C or a
    # SIGTERM to the whole process group must not cut those off.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lines = iter(sys.stdin.buffer.readline, b"")
    run_filter(TracerSetup(args.consume, args.min_level), lines, sys.stderr.buffer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
