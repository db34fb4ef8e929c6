"""The ``cohort`` command's entry point: what must happen before gRPC is imported, then :func:`cohort_cli.main.main`.

``cohort coordinator`` turns on gRPC core's handshake tracer and sends its stderr through the log filter here, because
gRPC reads ``GRPC_TRACE`` once, when it is first imported (which :mod:`cohort_cli.main` does); the coordinator then
reports refused TLS handshakes from it (:mod:`common.handshake_log`). This module imports nothing that imports gRPC.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from common import handshake_log

_GLOBAL_WITH_VALUE = ("--log-level",)


def command_of(argv: Sequence[str]) -> str | None:
    """The sub-command in ``argv`` (the first word that is not a global option or its value)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _GLOBAL_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if command_of(args) == "coordinator":
        handshake_log.start_filter(os.environ)
    from cohort_cli.main import main as run

    return run(args)
