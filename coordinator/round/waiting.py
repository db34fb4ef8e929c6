"""Why a job cannot start a round: which sites it waits for, and why the connected ones do not fit. Pure (no I/O):
the state machine writes it into a job's failure reason, the admin status shows it while the job waits."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from coordinator.round.identity import JobIdentity
from coordinator.state.registry import Declaration

MAX_SITES_NAMED = 5  # a federation of hundreds: name a few misfits, count the rest


def shortfall(
    identity: JobIdentity,
    connected: Mapping[str, Declaration],
    suspended: Collection[str],
    population: int,
    needed: int,
) -> str:
    """``1 of 2 needed sites can run this job: site-b: task name: site runs 'iris', the job needs 'digits'; 3
    allow-listed sites not connected``."""
    fits = [s for s, d in connected.items() if identity.mismatch(d) is None and s not in suspended]
    misfits = []
    for site in sorted(connected):
        why = identity.mismatch(connected[site])
        if why is not None:
            misfits.append(f"{site}: {why}")
        elif site in suspended:
            misfits.append(f"{site}: suspended (secure-aggregation aborts; `cohort job clear-site`)")
    parts = [f"{len(fits)} of {needed} needed sites can run this job"]
    parts.extend(misfits[:MAX_SITES_NAMED])
    if len(misfits) > MAX_SITES_NAMED:
        parts.append(f"{len(misfits) - MAX_SITES_NAMED} more connected sites do not fit")
    offline = max(0, population - len(connected))
    if offline:
        parts.append(f"{offline} allow-listed site{'s' if offline != 1 else ''} not connected")
    return "; ".join(parts)
