"""A masked input whose padding bits are set is refused before any of it is added to the secure sum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_secagg_protocol import JOB, federation, make_round, site_names

from common.errors import InvalidArgument
from common.secagg.encoding import EncodingParams, packed_len
from common.secagg.lanes import LaneLayout
from common.secagg.protocol import RoundParams, ServerStage
from common.serde import new_hasher
from coordinator.config import SecureAggregationConfig
from coordinator.round.aggregation import MaskedPadding, UpdateSpool
from coordinator.round.secagg import SecAggRound


def test_masked_input_with_padding_bits_is_refused_and_the_round_still_sums(tmp_path: Path) -> None:
    dim, bits = 1001, 17  # 1001 * 17 bits end one bit into the last byte: seven padding bits
    assert (dim * bits) % 8
    params = RoundParams.create(JOB, 1, site_names(3), dim=dim, bits=bits, dropout_rate=0.1, corruption_rate=0.0)
    server, clients = make_round(params, federation())
    rng = np.random.default_rng(0)
    encoded = {s: rng.integers(0, 1 << bits, dim, dtype=np.uint32) for s in params.cohort}
    enc = EncodingParams.choose(len(params.cohort), 0.5, bits)
    config = SecureAggregationConfig(enabled=True, bits=bits)
    rnd = SecAggRound(JOB, 1, 0, params, enc, config, server, LaneLayout((), bits, len(params.cohort)))
    sites = params.cohort
    for s in sites:
        server.receive_advertisement(s, clients[s].advertise())
    server.close_advertise()
    for s in sites:
        server.receive_share_keys(s, clients[s].share_keys(server.advertisements_for(s)))
    server.close_share_keys()

    masked = {}
    for s in sites:
        clients[s].receive_shares(server.shares_for(s))
        masked[s] = clients[s].masked_input(encoded[s]).data
        assert len(masked[s]) == packed_len(dim, bits)
    bad = bytearray(masked[sites[0]])
    bad[-1] |= 0x80
    # The coordinator checks the padding while it spools the upload, before anything is folded.
    specs = (rnd.masked_spec,)
    hasher = new_hasher(specs)
    hasher.update(bytes(bad))
    spool = UpdateSpool(tmp_path / "bad.update", specs, len(bad), hasher.hexdigest(), 4 << 20, MaskedPadding(dim, bits))
    spool.write(bytes(bad))
    with pytest.raises(InvalidArgument, match="padding"):
        spool.finish()
    spool.discard()
    assert not list(tmp_path.iterdir())
    assert server.stage is ServerStage.MASKED_INPUT  # not aborted: the refusal changed nothing

    for s in sites:
        good = tmp_path / f"{s}.update"
        good.write_bytes(masked[s])
        rnd.fold_masked_file(s, good)
    u3 = server.close_masked_input()
    for s in sites:
        server.receive_survivor_signature(s, clients[s].consistency_check(u3))
    server.close_consistency()
    for s in sites:
        server.receive_unmask(s, clients[s].unmask(server.signatures_for(s)))
    total = server.finish()
    expected = sum(encoded[s].astype(np.int64) for s in sites) % (1 << bits)
    assert (total.astype("int64") == expected).all()
