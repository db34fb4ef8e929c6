"""Privacy smoke test: what the coordinator receives from one site looks like uniform noise on Z_2^b and does not
correlate with the site's update; the same statistics flag the unmasked encoding, so the test has power."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
from test_secagg_protocol import make_round

from common.secagg.encoding import EncodingParams, encode, unpack
from common.secagg.messages import RoundParams

D = 40_000
P_MIN = 1e-6  # a false alarm once in a million runs


def critical(df: int) -> float:
    """The chi-square value exceeded with probability ~P_MIN (Wilson-Hilferty; within 1.5% of the exact one)."""
    z = NormalDist().inv_cdf(1 - P_MIN)
    return float(df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3)


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2).sum() / expected)


def top_bits_uniform(values: np.ndarray, bits: int, top: int) -> bool:
    """Chi-square test that the top ``top`` bits of the values are uniform, at false-alarm rate ~P_MIN."""
    counts = np.bincount((values >> (bits - top)).astype(np.int64), minlength=1 << top)
    return chi_square(counts) < critical((1 << top) - 1)


def low_bits_uniform(values: np.ndarray) -> bool:
    counts = np.bincount((values & 0xFF).astype(np.int64), minlength=256)
    return chi_square(counts) < critical(255)


def centred(values: np.ndarray, bits: int) -> np.ndarray:
    v = values.astype(np.int64)
    v[v >= 1 << (bits - 1)] -= 1 << bits
    return v


@pytest.mark.parametrize("bits", [16, 24])
def test_masked_input_is_uniform_and_uncorrelated(bits: int) -> None:
    params = RoundParams("job-privacy", 1, ("s00", "s01", "s02"), k=2, t=2, bits=bits, dim=D)
    enc = EncodingParams.choose(3, 1.0, bits)
    # A strongly structured update: a ramp, half of it saturated at the clip bound.
    update = np.linspace(-2.0, 2.0, D, dtype=np.float32)
    encoded = encode(update, enc)
    server, clients = make_round(params)
    for s in params.cohort:
        server.receive_advertisement(s, clients[s].advertise())
    server.close_advertise()
    for s in params.cohort:
        server.receive_share_keys(s, clients[s].share_keys(server.advertisements_for(s)))
    server.close_share_keys()
    site = params.cohort[0]
    clients[site].receive_shares(server.shares_for(site))
    seen = unpack(clients[site].masked_input(encoded).data, D, bits)

    # Negative control: the raw encoding is far from uniform and tracks the update.
    assert not top_bits_uniform(encoded, bits, 4)
    assert np.corrcoef(centred(encoded, bits), update)[0, 1] > 0.9

    assert top_bits_uniform(seen, bits, 4)
    assert top_bits_uniform(seen, bits, 8)
    assert low_bits_uniform(seen)
    # |r| of independent data has standard deviation 1/sqrt(D); 6 of them is far out in the tail.
    for view in (seen.astype(np.float64), centred(seen, bits).astype(np.float64)):
        assert abs(np.corrcoef(view, update)[0, 1]) < 6 / np.sqrt(D)
    assert abs(np.corrcoef(seen.astype(np.float64), encoded.astype(np.float64))[0, 1]) < 6 / np.sqrt(D)
