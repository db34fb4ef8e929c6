"""A coordinator or site that tampers is caught: substituted or replayed advertisements, shares delivered to the wrong
site or replayed, forged certificates, lying survivor lists and forged shares; and a holder never reveals both
shares of one site."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_secagg_protocol import (
    JOB,
    NOW,
    Federation,
    federation,
    full_params,
    make_inputs,
    make_round,
    site_names,
)

from common.certs import Role
from common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from common.secagg.client import ClientStage
from common.secagg.keys import new_key_pair, public_bytes
from common.secagg.local import DropPoint, run_local_round
from common.secagg.protocol import (
    Advertisement,
    RevealedShare,
    RoundParams,
    SecAggAborted,
    SecAggClient,
    SecAggServer,
    SecAggTampered,
    Unmask,
)


def advertised(params: RoundParams) -> tuple[SecAggServer, dict[str, SecAggClient]]:
    server, clients = make_round(params)
    for s in params.cohort:
        server.receive_advertisement(s, clients[s].advertise())
    server.close_advertise()
    return server, clients


def shared(params: RoundParams) -> tuple[SecAggServer, dict[str, SecAggClient]]:
    server, clients = advertised(params)
    for s in params.cohort:
        server.receive_share_keys(s, clients[s].share_keys(server.advertisements_for(s)))
    server.close_share_keys()
    return server, clients


def test_substituted_key_is_rejected_by_the_neighbour() -> None:
    params = full_params(3)
    server, clients = advertised(params)
    a, b, _ = params.cohort
    ads = list(server.advertisements_for(a))
    assert ads[0].site == b
    ads[0] = dataclasses.replace(ads[0], s_pk=public_bytes(new_key_pair()))  # the coordinator's own key
    with pytest.raises(SecAggTampered, match=f"advertisement of '{b}' has a bad signature"):
        clients[a].share_keys(ads)
    assert clients[a].stage is ClientStage.ABORTED
    with pytest.raises(FailedPrecondition):  # an aborted site takes no further part
        clients[a].share_keys(server.advertisements_for(a))


def test_coordinator_refuses_a_tampered_advertisement_too() -> None:
    params = full_params(3)
    server, clients = make_round(params)
    a = params.cohort[0]
    ad = clients[a].advertise()
    with pytest.raises(InvalidArgument, match="not signed for this job and round"):
        server.receive_advertisement(a, dataclasses.replace(ad, c_pk=bytes(32)))
    with pytest.raises(PermissionDenied):
        server.receive_advertisement(params.cohort[1], ad)


@pytest.mark.parametrize(("job", "round_no"), [(JOB, 0), ("other-job", 1)], ids=["earlier-round", "other-job"])
def test_replayed_advertisement_is_rejected(job: str, round_no: int) -> None:
    params = full_params(3)
    old_params = full_params(3, job=job, round_no=round_no)
    _, old_clients = make_round(old_params)
    a, b, _ = params.cohort
    replay = old_clients[b].advertise()  # genuinely signed by b, but for another job or round
    server, clients = advertised(params)
    ads = [replay if ad.site == b else ad for ad in server.advertisements_for(a)]
    with pytest.raises(SecAggTampered, match="replayed from another round or job"):
        clients[a].share_keys(ads)


def test_advertisement_under_another_sites_certificate_is_rejected() -> None:
    params = full_params(3)
    server, clients = advertised(params)
    a, b, c = params.cohort
    ads = list(server.advertisements_for(a))
    ad_c = next(ad for ad in ads if ad.site == c)
    forged = dataclasses.replace(ad_c, site=b)  # c's keys and certificate, claimed to be b's
    with pytest.raises(SecAggTampered, match=f"presented for site '{b}' belongs to '{c}'"):
        clients[a].share_keys([forged if ad.site == b else ad for ad in ads])


@pytest.mark.parametrize("kind", ["foreign-ca", "admin-role", "expired"])
def test_bad_certificates_are_rejected(kind: str) -> None:
    params = full_params(3)
    a, b, _ = params.cohort
    if kind == "foreign-ca":
        ident, match = Federation("other").identity(b), "not issued by the federation CA"
    elif kind == "admin-role":
        ident, match = federation().identity(b, Role.ADMIN), "admin certificate"
    else:
        ident, match = federation().identity(b, expired=True), "validity period"
    impostor = SecAggClient(params, b, ident.key, ident.cert_pem, federation().cas, now=NOW)
    ad = impostor.advertise()
    server, clients = advertised(params)
    with pytest.raises(SecAggTampered, match=match):
        clients[a].share_keys([ad if x.site == b else x for x in server.advertisements_for(a)])
    fresh_server, _ = make_round(params)
    with pytest.raises(InvalidArgument, match=match):
        fresh_server.receive_advertisement(b, ad)


def test_advertisement_from_a_non_neighbour_is_rejected() -> None:
    params = RoundParams(JOB, 1, site_names(12), k=4, t=3, bits=24, dim=100)
    server, clients = make_round(params)
    own = {s: clients[s].advertise() for s in params.cohort}
    for s, ad in own.items():
        server.receive_advertisement(s, ad)
    server.close_advertise()
    a = params.cohort[0]
    stranger = next(s for s in params.cohort if s != a and s not in params.neighbours_of(a))
    ads = [*server.advertisements_for(a), own[stranger]]
    with pytest.raises(SecAggTampered, match="not a neighbour"):
        clients[a].share_keys(ads)


def test_share_delivered_to_the_wrong_site_is_rejected() -> None:
    params = full_params(3)
    server, clients = shared(params)
    a, b, c = params.cohort
    for_c = next(es for es in server.shares_for(c) if es.sender == b)
    as_sent = [for_c, *[es for es in server.shares_for(a) if es.sender != b]]
    with pytest.raises(SecAggTampered, match=f"addressed to '{c}' was delivered to '{a}'"):
        clients[a].receive_shares(as_sent)
    # Relabelled for a: the receiver is bound into the AES-GCM associated data (and key), so it fails to decrypt.
    server, clients = shared(params)
    for_c = next(es for es in server.shares_for(c) if es.sender == b)
    relabelled = [dataclasses.replace(for_c, receiver=a), *[es for es in server.shares_for(a) if es.sender != b]]
    with pytest.raises(SecAggTampered, match="failed authentication"):
        clients[a].receive_shares(relabelled)


def test_share_replayed_from_another_round_fails_authentication() -> None:
    params = full_params(3)
    old_server, _ = shared(full_params(3, round_no=0))
    server, clients = shared(params)
    a, b, _ = params.cohort
    old = next(es for es in old_server.shares_for(a) if es.sender == b)
    with pytest.raises(SecAggTampered, match=f"from '{b}' to '{a}' failed authentication"):
        clients[a].receive_shares([old if es.sender == b else es for es in server.shares_for(a)])


def masked(params: RoundParams) -> tuple[SecAggServer, dict[str, SecAggClient], tuple[str, ...]]:
    """A round of live sites up to the survivor list; returns it too."""
    inputs = make_inputs(params.cohort)
    server, clients = shared(params)
    for s in params.cohort:
        clients[s].receive_shares(server.shares_for(s))
        server.receive_masked_input(s, clients[s].masked_input(inputs.encoded[s]))
    return server, clients, server.close_masked_input()


def test_lying_about_survivors_is_caught_by_the_consistency_check() -> None:
    params = full_params(5)
    _, clients, u3 = masked(params)
    victim, *others = params.cohort
    # The coordinator tells the victim that the last site dropped (so it would reveal that site's mask key) while
    # the others saw it survive (and reveal its self-mask seed). Their signatures are on the true list.
    sigs = [clients[s].consistency_check(u3) for s in others]
    clients[victim].consistency_check(u3[:-1])
    with pytest.raises(SecAggTampered, match="sent different survivor lists"):
        clients[victim].unmask(sigs)
    assert clients[victim].stage is ClientStage.ABORTED


def test_too_few_survivor_signatures_abort() -> None:
    params = full_params(5)  # t = 3
    _, clients, u3 = masked(params)
    a, b, *_ = params.cohort
    sig_b = clients[b].consistency_check(u3)
    clients[a].consistency_check(u3)
    with pytest.raises(SecAggAborted, match="only 2 holders confirmed"):
        clients[a].unmask([sig_b])


def test_survivor_list_that_excludes_me_or_includes_a_stranger_aborts() -> None:
    params = full_params(5)
    sites = params.cohort
    inputs = make_inputs(sites)
    server, clients = shared(params)
    for s in sites:
        clients[s].receive_shares(server.shares_for(s))
        clients[s].masked_input(inputs.encoded[s])
    with pytest.raises(SecAggAborted, match="did not count the masked input"):
        clients[sites[0]].consistency_check(sites[1:])
    with pytest.raises(SecAggTampered, match="outside the cohort"):
        clients[sites[1]].consistency_check([*sites, "zz-stranger"])


def test_never_both_shares_of_one_site() -> None:
    params = full_params(5)
    sites = params.cohort
    inputs = make_inputs(sites)
    drops = {sites[0]: DropPoint.MASKED_INPUT, sites[1]: DropPoint.UNMASK}
    server, clients = make_round(params)
    sent: dict[str, Unmask] = {}
    real = server.receive_unmask

    def spy(sender: str, msg: Unmask) -> None:
        sent[sender] = msg
        real(sender, msg)

    server.receive_unmask = spy  # type: ignore[method-assign]
    run_local_round(server, clients, inputs.encoded, drops)
    assert set(sent) == set(sites[2:])
    for msg in sent.values():
        owners = [r.owner for r in msg.shares]
        assert len(owners) == len(set(owners))  # one share per owner
        kinds = {r.owner: r.kind for r in msg.shares}
        assert kinds[sites[0]] == "s"  # dropped before its input: only its mask key
        assert all(kinds[s] == "b" for s in sites[1:])  # survivors: only their self-mask seeds
    # Asked again, a site refuses: it cannot be talked into revealing the other share later.
    with pytest.raises(FailedPrecondition):
        clients[sites[2]].unmask(())


def test_coordinator_rejects_both_kinds_or_the_wrong_kind() -> None:
    params = full_params(3)
    a, b, c = params.cohort
    server, clients, u3 = masked(params)
    for s in params.cohort:
        server.receive_survivor_signature(s, clients[s].consistency_check(u3))
    server.close_consistency()
    msg = clients[a].unmask(server.signatures_for(a))
    share_b = next(r for r in msg.shares if r.owner == b)
    both = Unmask(a, (*msg.shares, RevealedShare(b, "s", share_b.share)))
    with pytest.raises(InvalidArgument, match="two shares for one owner"):
        server.receive_unmask(a, both)
    wrong = Unmask(a, tuple(RevealedShare(r.owner, "s", r.share) for r in msg.shares))
    with pytest.raises(InvalidArgument, match="wrong kind"):
        server.receive_unmask(a, wrong)
    # A forged share is dropped and recorded; the others suffice (t = 2 of 3), so the round still completes.
    forged = Unmask(a, tuple(dataclasses.replace(r, share=bytes(66)) if r.owner == c else r for r in msg.shares))
    server.receive_unmask(a, forged)
    assert [(r.holder, r.owner) for r in server.rejected] == [(a, c)]
    for s in (b, c):
        server.receive_unmask(s, clients[s].unmask(server.signatures_for(s)))
    server.finish()


def test_forged_shares_beyond_tolerance_abort_instead_of_a_wrong_sum() -> None:
    params = full_params(3)
    a, b, c = params.cohort
    server, clients, u3 = masked(params)
    for s in params.cohort:
        server.receive_survivor_signature(s, clients[s].consistency_check(u3))
    server.close_consistency()
    for s in (a, b):
        msg = clients[s].unmask(server.signatures_for(s))
        server.receive_unmask(s, Unmask(s, tuple(dataclasses.replace(r, share=bytes(66)) for r in msg.shares)))
    server.receive_unmask(c, clients[c].unmask(server.signatures_for(c)))
    with pytest.raises(SecAggAborted, match="valid shares"):
        server.finish()


def test_stage_order_and_membership_are_enforced() -> None:
    params = full_params(3)
    server, clients = make_round(params)
    a = params.cohort[0]
    with pytest.raises(FailedPrecondition, match="not masked_input"):
        clients[a].masked_input(np.zeros(params.dim, np.uint32))
    with pytest.raises(FailedPrecondition):
        server.close_masked_input()
    with pytest.raises(PermissionDenied):
        server.receive_advertisement("zz-stranger", clients[a].advertise())
    with pytest.raises(InvalidArgument, match="threshold"):
        RoundParams(JOB, 1, site_names(5), k=4, t=2, bits=24, dim=10)  # t <= (k+1)/2 would be unsafe


def test_advertisement_dataclass_round_trips_as_plain_bytes() -> None:
    params = full_params(3)
    _, clients = make_round(params)
    ad = clients[params.cohort[0]].advertise()
    copy = Advertisement(**{f.name: getattr(ad, f.name) for f in dataclasses.fields(ad)})
    assert copy == ad
    assert all(isinstance(getattr(ad, f.name), (str, bytes)) for f in dataclasses.fields(ad))
