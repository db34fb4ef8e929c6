"""Failpoints: named places where a test can make a daemon die as if the host lost power.

Crash-recovery tests need a coordinator or participant killed at an exact point (mid-model-stream, between writing a
checkpoint and committing it, during unmasking). Racing an outside ``kill -9`` against those points is flaky, so
the code names them instead, like etcd's gofail or TiKV's fail-rs: ``hit("checkpoint.saved", round=2)``.

A failpoint does nothing unless the environment variable ``COHORT_FAILPOINTS`` names it when the process starts::

    COHORT_FAILPOINTS="checkpoint.saved@2"       # SIGKILL this process when round 2 reaches that point
    COHORT_FAILPOINTS="upload.accepted"          # ... the first time any round gets there
    COHORT_FAILPOINTS="a@1,b@3"                  # several

The action is SIGKILL of the whole process: no ``finally`` blocks, no flushing, no graceful shutdown, the same as
``kill -9``. A ``:stop`` suffix (``"participant.upload@1:stop"``) freezes the process with SIGSTOP instead, once, as a
machine that stops scheduling it would; whoever started it resumes it with SIGCONT. Production deployments never
set the variable; an unknown name is simply never hit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

ENV = "COHORT_FAILPOINTS"

log = logging.getLogger("cohort.failpoints")


ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def _parse(text: str) -> dict[str, tuple[int | None, signal.Signals]]:
    armed: dict[str, tuple[int | None, signal.Signals]] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        spec, _, action = part.partition(":")
        name, _, at = spec.partition("@")
        armed[name.strip()] = (int(at) if at.strip() else None, ACTIONS[action.strip() or "kill"])
    return armed


_ARMED = _parse(os.environ.get(ENV, ""))


def hit(name: str, round: int | None = None) -> None:
    """Kill (or freeze) this process when ``name`` (for ``round``, if one was given in the spec) is armed."""
    if name not in _ARMED:
        return
    want, sig = _ARMED[name]
    if want is not None and round != want:
        return
    if sig is signal.SIGSTOP:
        del _ARMED[name]  # a frozen process that is resumed goes on: it freezes once
    log.warning("failpoint %s hit (round %s): sending this process %s", name, round, sig.name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    # Directed at the calling thread, which then stops (or dies) before it returns to Python: sent to the process, the
    # signal may be taken by another thread while this one runs on for a moment (a site's upload thread sending its
    # last bytes before the freeze took hold). Either way the whole process stops or dies.
    signal.pthread_kill(threading.get_ident(), sig)
