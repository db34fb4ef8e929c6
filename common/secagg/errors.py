"""Secure-aggregation errors, placed in Cohort's error tree (:mod:`common.errors`)::

    Aborted
    └── SecAggAborted        this round's secure aggregation cannot finish correctly (too few sites or shares left)
        └── SecAggTampered   a message was forged, substituted, replayed from another round or job, or misrouted

Both end the round for whoever raises them: a site stops taking part (and reveals nothing more), the coordinator
records the reason and retries with a new cohort. Neither ever yields a partial or wrong sum. A malformed message from
one site is an :class:`~common.errors.InvalidArgument` for that site; a message at the wrong stage is a
:class:`~common.errors.FailedPrecondition`; a sender outside the round is :class:`~common.errors.PermissionDenied`.
"""

from __future__ import annotations

from common.errors import Aborted


class SecAggAborted(Aborted):
    """The round's secure aggregation cannot complete; the message says why (e.g. which site lacks shares)."""


class SecAggTampered(SecAggAborted):
    """Evidence of tampering: the message names the site whose message failed and which check it failed."""
