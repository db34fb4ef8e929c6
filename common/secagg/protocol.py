"""SecAgg+ (Bell et al. 2020) with classic SecAgg (Bonawitz et al. 2017) as its full-graph case: the per-round
state machines and their messages, in one import.

Per round and site (``x`` is the site's update, ``N(i)`` its neighbours, U1 ... U4 the sites that completed
stages 0 ... 3, as the coordinator closes them):

0. **Advertise.** Site i makes fresh X25519 pairs (c: share encryption, s: pairwise masks) and signs
   (job, round, i, c_pk, s_pk) with its certificate key.
1. **Share keys.** Site i checks each neighbour's advertisement (certificate chains to the federation CA, is a
   participant certificate whose CN is the neighbour, signature over this job and round), draws a self-mask seed b_i,
   Shamir-shares b_i and s_sk_i t-of-(|N(i) & U1| + 1) among its live neighbours and itself, and AES-GCM-encrypts
   each neighbour's bundle under an HKDF key from the c keys, with (job, round, sender, receiver) as associated data.
2. **Masked input.** y_i = encode(x_i) + PRG(b_i) + sum_{j in N(i) & U2} (+-)PRG(s_ij) mod 2**b, bit-packed; + if
   i < j, - otherwise, so pairwise masks cancel in the sum. The coordinator folds each y_i into one running sum.
3. **Consistency check.** The coordinator announces U3 (whose y arrived); each site checks it fits its own view and
   signs (job, round, i, sorted U3).
4. **Unmask.** With >= t valid signatures on the same U3 from its holders, site i reveals for each owner j whose
   shares it holds the share of b_j if j is in U3, else of s_sk_j — never both. The coordinator checks each share
   against j's commitment, rebuilds b_j for survivors and s_sk_j for dropouts, and removes PRG(b_j) and the dropouts'
   pairwise masks: what is left is sum_{j in U3} encode(x_j) mod 2**b, exactly.

See :mod:`common.secagg.graph` for k and t, :mod:`common.secagg.encoding` for b and the scale, and
:mod:`common.secagg.local` for the order of calls.
"""

from __future__ import annotations

from common.secagg.client import ClientStage, SecAggClient
from common.secagg.errors import SecAggAborted, SecAggTampered
from common.secagg.messages import (
    Advertisement,
    EncryptedShare,
    MaskedInput,
    RevealedShare,
    RoundParams,
    ShareCommitment,
    ShareKeys,
    ShareKind,
    SurvivorSignature,
    Unmask,
)
from common.secagg.server import RejectedShare, SecAggServer, ServerStage

__all__ = [
    "Advertisement",
    "ClientStage",
    "EncryptedShare",
    "MaskedInput",
    "RejectedShare",
    "RevealedShare",
    "RoundParams",
    "SecAggAborted",
    "SecAggClient",
    "SecAggServer",
    "SecAggTampered",
    "ServerStage",
    "ShareCommitment",
    "ShareKeys",
    "ShareKind",
    "SurvivorSignature",
    "Unmask",
]
