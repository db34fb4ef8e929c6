"""The round state machine, driven directly: no network, no clock."""

from __future__ import annotations

import pytest

from coordinator.round.rules import (
    CloseRound,
    DeadlinePassed,
    RoundPhase,
    RoundState,
    SiteBack,
    SiteLost,
    Stop,
    UploadAccepted,
)


def state(n: int = 3, min_sites: int = 2) -> RoundState:
    return RoundState(frozenset(f"s{i}" for i in range(n)), min_sites)


def test_closes_when_every_site_reported() -> None:
    r = state()
    assert r.handle(UploadAccepted("s0")) == []
    assert r.handle(UploadAccepted("s1")) == []
    [action] = r.handle(UploadAccepted("s2"))
    assert action == CloseRound(True, "3 of 3 sites reported")
    assert r.phase is RoundPhase.SUCCEEDED
    assert r.handle(UploadAccepted("s2")) == []  # closed rounds ignore further events


def test_deadline_with_enough_uploads_succeeds_otherwise_fails() -> None:
    r = state()
    r.handle(UploadAccepted("s0"))
    r.handle(UploadAccepted("s1"))
    [action] = r.handle(DeadlinePassed())
    assert action.succeeded
    r = state()
    r.handle(UploadAccepted("s0"))
    [action] = r.handle(DeadlinePassed())
    assert not action.succeeded
    assert "needs 2" in action.reason


def test_dropouts_close_early_when_the_rest_reported() -> None:
    r = state()
    r.handle(UploadAccepted("s0"))
    r.handle(UploadAccepted("s1"))
    [action] = r.handle(SiteLost("s2"))
    assert action == CloseRound(True, "2 of 3 sites reported")


def test_too_many_dropouts_fail_fast_and_a_returning_site_counts_again() -> None:
    r = state(min_sites=3)
    assert r.handle(SiteLost("s2")) == [CloseRound(False, "too many sites dropped out: at most 2 of 3 can report")]
    r = state(min_sites=2)
    r.handle(SiteLost("s1"))
    r.handle(SiteBack("s1"))
    r.handle(UploadAccepted("s0"))
    r.handle(UploadAccepted("s1"))
    assert r.open  # s2 still pending
    assert r.handle(Stop("admin stop")) == [CloseRound(False, "admin stop")]


def test_refusals_name_the_reason() -> None:
    r = state()
    assert r.refusal("outsider") == "site 'outsider' is not in this round's cohort"
    r.handle(UploadAccepted("s0"))
    assert r.refusal("s0") == "site 's0' already reported in this round"
    with pytest.raises(ValueError, match="not acceptable"):
        r.handle(UploadAccepted("s0"))
    with pytest.raises(ValueError, match="min_sites"):
        RoundState(frozenset({"a"}), 2)


def test_a_failed_round_says_how_many_declined_and_why() -> None:
    r = state(n=6, min_sites=4)
    assert r.handle(SiteLost("s0", "declined: privacy budget")) == []
    r.handle(SiteLost("s0", "declined: privacy budget"))  # a repeat counts once
    r.handle(SiteLost("s5"))  # gone, cause unknown
    [action] = r.handle(SiteLost("s1", "declined: privacy budget"))
    assert action == CloseRound(
        False,
        "too many sites dropped out: at most 3 of 4 can report "
        "(3 of 6 lost: 2 sites declined: privacy budget; 1 disconnected or did not answer)",
    )
    # A site that came back is no longer counted, nor its cause; without a known cause the reason is as before.
    r = state(n=5, min_sites=3)
    r.handle(SiteLost("s0", "declined: privacy budget"))
    r.handle(SiteBack("s0"))
    r.handle(SiteLost("s1", "declined: no data"))
    r.handle(UploadAccepted("s2"))
    [action] = r.handle(DeadlinePassed())
    assert action.reason == "deadline passed with 1 uploads; the round needs 3 (1 of 5 lost: 1 site declined: no data)"
    r = state(n=3, min_sites=3)
    [action] = r.handle(SiteLost("s0"))
    assert action.reason == "too many sites dropped out: at most 2 of 3 can report"
