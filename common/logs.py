"""Log output for the ``cohort`` command and both daemons: plain text or one JSON object per line.

``--log-format json`` (or ``COHORT_LOG_FORMAT=json``) writes every record as one JSON object with the fields
``time`` (ISO 8601, UTC), ``level``, ``logger``, ``event`` (the message) and, where the code that logged it knows
them, ``job``, ``round`` and ``site`` (passed as ``extra={"job": ..., "round": ..., "site": ...}``). A log shipper
can then filter one job or one site without parsing sentences.

dp-accounting's RDP accountant logs a warning through absl for every order whose series fails to converge (with
large sampling rates that is dozens of lines per epsilon computation, each one harmless: the order is excluded and
the bound stays valid). :class:`ConvergenceFlood` lets the first one through as one line that says so and counts
the rest (``cohort_dp_accounting_convergence_warnings_total`` on /metrics).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
CONTEXT_FIELDS = ("job", "round", "site")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, event, and job/round/site when the record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, ""):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ConvergenceFlood(logging.Filter):
    """Pass the first "failed to converge" warning of dp-accounting, rewritten as one explanatory line; count and
    drop the rest. Installed on the ``absl`` logger (dp-accounting logs through absl, which logs through it)."""

    MARKER = "failed to converge"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.MARKER not in record.getMessage():
            return True
        with self._lock:
            self.count += 1
            first = self.count == 1
        if first:
            record.msg = (
                "dp-accounting: an RDP order failed to converge and was excluded from the epsilon bound (harmless; "
                "the bound stays valid). Further such warnings are counted, not logged "
                "(cohort_dp_accounting_convergence_warnings_total)"
            )
            record.args = ()
        return first


CONVERGENCE = ConvergenceFlood()


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger for a ``cohort`` command (stderr). Like ``logging.basicConfig``, it leaves a root
    logger that already has handlers alone (a test runner's, or an embedding program's)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    quiet_accountant()
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def quiet_accountant() -> None:
    """Install :data:`CONVERGENCE` on the absl logger (idempotent)."""
    absl = logging.getLogger("absl")
    if CONVERGENCE not in absl.filters:
        absl.addFilter(CONVERGENCE)
