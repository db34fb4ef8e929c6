"""Fuzzing every decoder of untrusted input: random and mutated inputs either decode or raise the documented Cohort
error, never anything else, and a rejected message leaves the receiver's state as it was.

Inputs are random messages and valid messages after a few mutations (a field changed, truncated or flipped, a
repeated field shortened or doubled, an enum value out of range, a huge or negative number, NaN, another oneof
member). The mutation engine works on any protobuf message through its descriptor; ``test_fuzz_rpc`` uses it too.

Covered: tensor manifests and the chunk assembler (common/serde.py), the secure-aggregation wire decoders
(common/secagg_wire.py), whole SecAgg rounds with one tampered message in either direction (common/secagg/), site
certificates presented for SecAgg, the bit-unpacker, the YAML/environment/--set configuration loader
(common/config.py), admin job specs (coordinator/jobspec.py) and the audit chain verifier (coordinator/state/audit.py).
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import itertools
import math
import os
import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import numpy as np
import pytest
import torch
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_secagg_protocol import NOW, federation, make_round

from common import config as loader
from common.errors import CohortError, ConfigError, InvalidArgument, RpcError
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.secagg import protocol as sa
from common.secagg.encoding import EncodingParams, Unpacker, packed_len, unpack
from common.secagg.keys import share_commitment, verify_site_certificate
from common.secagg.server import RejectedShare
from common.secagg.shamir import PRIME, SHARE_LEN
from common.secagg_wire import (
    ad_from_proto,
    ad_to_proto,
    setup_from_proto,
    setup_to_proto,
    share_from_proto,
    share_keys_from_proto,
    share_keys_to_proto,
    share_to_proto,
    signature_from_proto,
    signature_to_proto,
    unmask_from_proto,
    unmask_to_proto,
)
from common.serde import Assembler, Limits, encode, specs_from_manifest
from coordinator.config import CoordinatorConfig, JobConfig
from coordinator.jobspec import from_proto as job_config_from_proto
from coordinator.jobspec import to_proto as job_spec_to_proto
from coordinator.state.audit import verify_database, verify_rows
from coordinator.state.store import SqliteStore
from participant.config import ParticipantConfig

pytestmark = pytest.mark.slow

M = TypeVar("M", bound=Message)
# More examples for a deeper run, e.g. COHORT_FUZZ_SCALE=20 (every max_examples below and in test_fuzz_rpc is scaled).
FUZZ_SCALE = max(1, int(os.environ.get("COHORT_FUZZ_SCALE", "1")))
FD = FieldDescriptor
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

# ---------------------------------------------------------------------------------------------------------------
# A mutation engine for protobuf messages (shared with test_fuzz_rpc)
# ---------------------------------------------------------------------------------------------------------------

_INT_RANGES: dict[int, tuple[int, int]] = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_ENUM: (-(2**31), 2**31 - 1),  # proto3 enums are open: any int32 arrives as itself
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_EDGE_INTS = (0, 1, 2, -1, 3, 999, 1000, 1001, 10**9, 10**9 + 1, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1, 2**64 - 1)
_EDGE_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1e300, -1e300, math.inf, -math.inf, math.nan, 2.0**53)
_CHARS = st.characters(codec="utf-8")  # protobuf strings are valid UTF-8: no lone surrogates
_ODD_TEXTS = ("", " ", "\x00", "é", "../../etc/passwd", "a" * 600, "sha256:" + "0" * 64, "0" * 64, "site-a", "b", "s")


# Every draw below has the same shape whatever the original value is (positions are drawn from a fixed range and
# reduced modulo the length; edge lists have a fixed length): the originals carry fresh keys, signatures and
# session ids, and Hypothesis replays a failure only if the same choices lead to the same draws.


def _position(draw: st.DrawFn, length: int) -> int:
    return draw(st.integers(0, 1 << 16)) % max(1, length)


def integers_in(lo: int, hi: int, original: int | None = None) -> st.SearchStrategy[int]:
    """Integers in [lo, hi], weighted towards edges, small values and the original's neighbours."""
    edges = sorted({e for e in _EDGE_INTS if lo <= e <= hi} | {lo, hi})
    base = 0 if original is None else original
    edges += [min(hi, max(lo, v)) for v in (base - 1, base + 1, -base, base * 1000)]
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -3), min(hi, 12)), st.integers(lo, hi))


def doubles(original: float | None = None, width: Literal[32, 64] = 64) -> st.SearchStrategy[float]:
    edges = [e for e in _EDGE_FLOATS if width == 64 or not math.isfinite(e) or abs(e) < 3e38]
    base = original if original is not None and math.isfinite(original) and abs(original) < 1e30 else 1.0
    edges += [-base, base * 1e6, base + 1e-9, math.nextafter(base, math.inf)]
    return st.one_of(st.sampled_from(edges), st.floats(width=width), st.floats(-2, 2, width=width))


@st.composite
def edited_text(draw: st.DrawFn, s: str) -> str:
    """``s`` truncated, with a character replaced, inserted or removed, doubled or upper-cased."""
    op = draw(st.sampled_from(("truncate", "replace", "insert", "delete", "double", "upper", "non-ascii")))
    i = _position(draw, len(s))
    if op == "truncate":
        return s[:i]
    if op == "replace" and s:
        return s[:i] + draw(_CHARS) + s[i + 1 :]
    if op == "delete" and s:
        return s[:i] + s[i + 1 :]
    if op == "double":
        return s + s
    if op == "upper":
        return s.upper()
    if op == "non-ascii":
        return s[:i] + draw(st.sampled_from("éß☃\u200b\U0001f600")) + s[i:]
    return s[:i] + draw(_CHARS) + s[i:]


def texts(original: str = "") -> st.SearchStrategy[str]:
    options = [st.text(_CHARS, max_size=24), st.sampled_from(_ODD_TEXTS)]
    if original:
        options.append(edited_text(original))
    return st.one_of(options)


@st.composite
def edited_bytes(draw: st.DrawFn, b: bytes) -> bytes:
    """``b`` with a bit flipped, truncated, extended, a byte removed or replaced."""
    op = draw(st.sampled_from(("flip", "truncate", "extend", "delete", "replace", "double")))
    i = _position(draw, len(b))
    if op == "flip" and b:
        return b[:i] + bytes([b[i] ^ (1 << draw(st.integers(0, 7)))]) + b[i + 1 :]
    if op == "truncate":
        return b[:i]
    if op == "delete" and b:
        return b[:i] + b[i + 1 :]
    if op == "replace" and b:
        return b[:i] + bytes([draw(st.integers(0, 255))]) + b[i + 1 :]
    if op == "double":
        return b + b
    return b + draw(st.binary(min_size=1, max_size=8))


def binaries(original: bytes = b"") -> st.SearchStrategy[bytes]:
    options = [st.binary(max_size=48), st.sampled_from((b"", b"\x00" * 32, b"\xff" * 66))]
    if original:
        options.append(edited_bytes(original))
    return st.one_of(options)


def scalar_values(field: FieldDescriptor, original: Any = None) -> st.SearchStrategy[Any]:
    """Any value protobuf lets this field hold, biased towards trouble (and towards small edits of ``original``)."""
    t = field.type
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        ints = integers_in(lo, hi, original if isinstance(original, int) else None)
        if t == FD.TYPE_ENUM:
            assert field.enum_type is not None
            return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), ints)
        return ints
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return doubles(original if isinstance(original, float) else None, 64 if t == FD.TYPE_DOUBLE else 32)
    if t == FD.TYPE_STRING:
        return texts(original if isinstance(original, str) else "")
    if t == FD.TYPE_BYTES:
        return binaries(original if isinstance(original, bytes) else b"")
    raise AssertionError(f"no strategy for field type {t}")  # pragma: no cover - cohort.proto has no groups


def _sub(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field."""
    assert field.message_type is not None
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FD.TYPE_MESSAGE and bool(_sub(field).GetOptions().map_entry)


def _fill(draw: st.DrawFn, msg: Message, field: FieldDescriptor, depth: int) -> None:
    """Give ``field`` of ``msg`` a random value (a few elements if it is repeated)."""
    if _is_map(field):
        entry = _sub(field)
        keys, values = entry.fields_by_name["key"], entry.fields_by_name["value"]
        if values.type != FD.TYPE_MESSAGE:
            getattr(msg, field.name).update(
                draw(st.dictionaries(scalar_values(keys), scalar_values(values), max_size=4))
            )
        return
    if field.type == FD.TYPE_MESSAGE:
        if field.is_repeated:
            for _ in range(draw(st.integers(0, 3))):
                getattr(msg, field.name).add().CopyFrom(draw(random_messages(_sub(field), depth + 1)))
        else:
            getattr(msg, field.name).CopyFrom(draw(random_messages(_sub(field), depth + 1)))
    elif field.is_repeated:
        getattr(msg, field.name).extend(draw(st.lists(scalar_values(field), max_size=4)))
    else:
        setattr(msg, field.name, draw(scalar_values(field)))


@st.composite
def random_messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of type ``descriptor`` with a random subset of its fields set to random values."""
    msg = GetMessageClass(descriptor)()
    if depth > 3:
        return msg
    for field in descriptor.fields:
        if draw(st.booleans()):
            _fill(draw, msg, field, depth)
    return msg


def random_of(cls: type[M]) -> st.SearchStrategy[M]:
    return random_messages(cast(Descriptor, cls.DESCRIPTOR))  # type: ignore[return-value]


def _mutate_once(draw: st.DrawFn, msg: Message, depth: int) -> None:
    present = [f for f, _ in msg.ListFields() if f.type == FD.TYPE_MESSAGE and not _is_map(f)]
    if present and depth < 4 and draw(st.booleans()):  # go deeper, into a sub-message that is set
        field = draw(st.sampled_from(present))
        if field.is_repeated:
            items = getattr(msg, field.name)
            _mutate_once(draw, items[_position(draw, len(items))], depth + 1)
        else:
            _mutate_once(draw, getattr(msg, field.name), depth + 1)
        return
    descriptor = msg.DESCRIPTOR
    if descriptor.oneofs and draw(st.integers(0, 9)) == 0:
        oneofs: list[Any] = list(descriptor.oneofs)
        msg.ClearField(draw(st.sampled_from(oneofs)).name)
        return
    fields = cast(list[FieldDescriptor], list(descriptor.fields))
    field = draw(st.sampled_from(fields))
    if _is_map(field):
        container = getattr(msg, field.name)
        if draw(st.booleans()):
            container.clear()
        _fill(draw, msg, field, depth)
    elif field.is_repeated:
        container = getattr(msg, field.name)
        is_message = field.type == FD.TYPE_MESSAGE
        values: list[Any] = [copy.deepcopy(x) for x in container] if is_message else list(container)
        op = draw(st.sampled_from(("append", "delete", "duplicate", "replace", "reverse", "clear")))
        i = _position(draw, len(values))
        if op == "append":
            values.append(draw(random_messages(_sub(field), depth + 1)) if is_message else draw(scalar_values(field)))
        elif op == "delete" and values:
            del values[i]
        elif op == "duplicate" and values:
            values.insert(i, copy.deepcopy(values[i]))
        elif op == "replace" and values:
            values[i] = (
                draw(random_messages(_sub(field), depth + 1)) if is_message else draw(scalar_values(field, values[i]))
            )
        elif op == "reverse":
            values.reverse()
        elif op == "clear":
            values = []
        del container[:]
        for item in values:
            if is_message:
                container.add().CopyFrom(item)
            else:
                container.append(item)
    elif field.type == FD.TYPE_MESSAGE:
        op = draw(st.sampled_from(("clear", "empty", "random")))
        if op == "clear":
            msg.ClearField(field.name)
        elif op == "empty":
            getattr(msg, field.name).SetInParent()
        else:
            getattr(msg, field.name).CopyFrom(draw(random_messages(_sub(field), depth + 1)))
    elif field.has_presence and draw(st.integers(0, 4)) == 0:
        msg.ClearField(field.name)  # an optional or oneof member left out
    else:
        # Setting a oneof member switches the oneof to it: the "wrong oneof" case.
        setattr(msg, field.name, draw(scalar_values(field, getattr(msg, field.name))))


@st.composite
def mutations(draw: st.DrawFn, msg: M, max_steps: int = 3) -> M:
    """``msg`` after 1..``max_steps`` random mutations (the original is not modified)."""
    out = type(msg)()
    out.CopyFrom(msg)
    for _ in range(draw(st.integers(1, max_steps))):
        _mutate_once(draw, out, 0)
    return out


def same(a: Message, b: Message) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------------------------
# Tensors: manifests, the assembler, chunking (common/serde.py)
# ---------------------------------------------------------------------------------------------------------------

LIMITS = Limits(max_tensors=16, max_total_bytes=1 << 16, max_chunk_bytes=1 << 12)


def check_specs(manifest: pb.Manifest, limits: Limits) -> None:
    """specs_from_manifest either refuses with InvalidArgument or returns specs that honour the limits."""
    try:
        specs = specs_from_manifest(manifest, limits)
    except InvalidArgument:
        return
    assert 1 <= len(specs) <= limits.max_tensors
    assert len({s.name for s in specs}) == len(specs)
    assert sum(s.nbytes for s in specs) == manifest.total_bytes <= limits.max_total_bytes
    assert all(d >= 0 for s in specs for d in s.shape)


@st.composite
def small_tensors(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text("abcxyz._", min_size=1, max_size=6), min_size=1, max_size=3, unique=True))
    dtypes = (torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8)
    out = {}
    for name in names:
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = draw(st.sampled_from(dtypes))
        out[name] = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape).to(dtype)
    return out


@settings(max_examples=200 * FUZZ_SCALE, deadline=None)
@given(manifest=random_of(pb.Manifest))
def test_random_manifests_decode_or_are_refused(manifest: pb.Manifest) -> None:
    check_specs(manifest, LIMITS)
    check_specs(manifest, Limits())


@settings(max_examples=200 * FUZZ_SCALE, deadline=None)
@given(data=st.data(), tensors=small_tensors())
def test_mutated_manifests_decode_or_are_refused(data: st.DataObject, tensors: dict[str, torch.Tensor]) -> None:
    manifest = encode(tensors).manifest()
    check_specs(data.draw(mutations(manifest)), LIMITS)


STREAM_OPS = ("none", "flip", "truncate", "extend", "drop_chunk", "repeat_chunk", "swap_chunks", "big_chunk")


@settings(max_examples=150 * FUZZ_SCALE, deadline=None)
@given(data=st.data(), tensors=small_tensors(), op=st.sampled_from(STREAM_OPS), mutate_manifest=st.booleans())
def test_assembler_accepts_exactly_the_announced_stream(
    data: st.DataObject, tensors: dict[str, torch.Tensor], op: str, mutate_manifest: bool
) -> None:
    enc = encode(tensors)
    manifest = data.draw(mutations(enc.manifest())) if mutate_manifest else enc.manifest()
    size = data.draw(st.integers(1, max(1, len(enc.data))))
    chunks = [bytes(c) for c in enc.chunks(size)]
    if op == "flip" and enc.data:
        i = data.draw(st.integers(0, len(enc.data) - 1))
        flipped = bytearray(enc.data)
        flipped[i] ^= 1 << data.draw(st.integers(0, 7))
        chunks = [bytes(flipped)]
    elif op == "truncate" and enc.data:
        chunks = [bytes(enc.data[: data.draw(st.integers(0, len(enc.data) - 1))])]
    elif op == "extend":
        chunks.append(data.draw(st.binary(min_size=1, max_size=9)))
    elif op == "drop_chunk" and chunks:
        del chunks[data.draw(st.integers(0, len(chunks) - 1))]
    elif op == "repeat_chunk" and chunks:
        chunks.append(chunks[data.draw(st.integers(0, len(chunks) - 1))])
    elif op == "swap_chunks" and len(chunks) > 1 and chunks[0] != chunks[-1]:
        chunks[0], chunks[-1] = chunks[-1], chunks[0]
    elif op == "big_chunk":
        chunks = [bytes(enc.data) + bytes(LIMITS.max_chunk_bytes + 1)]
    intact = same(manifest, enc.manifest()) and b"".join(chunks) == enc.data
    try:
        asm = Assembler(manifest, LIMITS)
        for chunk in chunks:
            asm.add(chunk)
        out = asm.finish()
    except InvalidArgument:
        assert not intact, "an intact stream was refused"
        return
    assert intact, "a changed stream was accepted"
    assert list(out) == list(tensors)
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)


@settings(max_examples=60 * FUZZ_SCALE, deadline=None)
@given(tensors=small_tensors(), size=st.integers(1, 300))
def test_chunks_cover_the_buffer_exactly(tensors: dict[str, torch.Tensor], size: int) -> None:
    enc = encode(tensors)
    chunks = [bytes(c) for c in enc.chunks(size)]
    assert b"".join(chunks) == enc.data
    assert all(0 < len(c) <= size for c in chunks)


# ---------------------------------------------------------------------------------------------------------------
# Secure aggregation: wire decoders (common/secagg_wire.py)
# ---------------------------------------------------------------------------------------------------------------

SA_SITES = ("s00", "s01", "s02")
SA_BITS, SA_DIM = 19, 21  # 399 bits: the last byte carries 1 padding bit
JOB = "job-fuzz"


def sa_params() -> sa.RoundParams:
    return sa.RoundParams(JOB, 7, SA_SITES, k=2, t=2, bits=SA_BITS, dim=SA_DIM)


def valid_setup() -> pb.SecAggSetup:
    params = sa.RoundParams.create(JOB, 2003, SA_SITES, dim=SA_DIM, bits=SA_BITS, dropout_rate=0.2, corruption_rate=0)
    return setup_to_proto(params, EncodingParams.choose(3, 0.5, SA_BITS), 1000)


@settings(max_examples=200 * FUZZ_SCALE, deadline=None)
@given(
    data=st.data(),
    round_no=integers_in(0, 2**32 - 1),
    attempt=integers_in(0, 2**32 - 1),
    mutate=st.booleans(),
)
def test_secagg_setup_decodes_or_is_refused(data: st.DataObject, round_no: int, attempt: int, mutate: bool) -> None:
    setup = data.draw(mutations(valid_setup()) if mutate else random_of(pb.SecAggSetup))
    try:
        params, enc, _ = setup_from_proto(JOB, round_no, attempt, setup)
    except InvalidArgument:
        return
    assert enc is not None
    assert params.cohort == tuple(setup.cohort)
    assert (params.k, params.t, params.bits, params.dim) == (setup.k, setup.t, setup.bits, setup.dim)
    assert params.t > (params.k + 1) / 2  # never parameters that would let the coordinator unmask a site
    assert enc.bits == params.bits
    assert math.isfinite(enc.clip)
    assert enc.clip > 0


@settings(max_examples=100 * FUZZ_SCALE, deadline=None)
@given(
    ad=random_of(pb.SecAggAdvertisement),
    share=random_of(pb.SecAggEncryptedShare),
    keys=random_of(pb.SecAggShareKeys),
    sig=random_of(pb.SecAggSignature),
    unmask=random_of(pb.SecAggUnmask),
    site=texts(),
)
def test_secagg_messages_decode_losslessly_or_are_refused(
    ad: pb.SecAggAdvertisement,
    share: pb.SecAggEncryptedShare,
    keys: pb.SecAggShareKeys,
    sig: pb.SecAggSignature,
    unmask: pb.SecAggUnmask,
    site: str,
) -> None:
    assert same(ad_to_proto(ad_from_proto(ad)), ad)
    assert same(share_to_proto(share_from_proto(share)), share)
    assert same(share_keys_to_proto(share_keys_from_proto(site, keys)), keys)
    assert same(signature_to_proto(signature_from_proto(sig)), sig)
    try:
        decoded = unmask_from_proto(site, unmask)
    except InvalidArgument:
        assert any(r.kind not in ("b", "s") for r in unmask.shares)
        return
    assert decoded.site == site
    assert same(unmask_to_proto(decoded), unmask)


# ---------------------------------------------------------------------------------------------------------------
# Secure aggregation: whole rounds with one tampered message (common/secagg/)
# ---------------------------------------------------------------------------------------------------------------


def snapshot(obj: object) -> dict[str, object]:
    """A comparable copy of an object's state (numpy arrays as bytes; key objects compared by identity)."""
    out: dict[str, object] = {}
    for name, value in vars(obj).items():
        if isinstance(value, np.ndarray):
            out[name] = value.tobytes()
        elif name in ("_signers", "_cas", "params", "_now"):
            out[name] = dict(value) if isinstance(value, dict) else value
        else:
            out[name] = copy.deepcopy(value)
    return out


class RoundOver(Exception):
    """The round ended early, as the protocol allows: a SecAggAborted at the coordinator or at a site."""


# (stage, direction): "out" tampers with what the victim sends, "in" with what the coordinator routes to it.
TAMPER_POINTS = (
    ("advertise", "out"),
    ("share_keys", "in"),
    ("share_keys", "out"),
    ("receive_shares", "in"),
    ("masked_input", "out"),
    ("consistency", "in"),
    ("consistency", "out"),
    ("unmask", "in"),
    ("unmask", "out"),
)


class TamperedRound:
    """Drives one honest 3-site round (t = 2) in which exactly one message is replaced by a fuzzed one.

    A message the coordinator refuses must change nothing; the sender then sends the honest one. A site whose
    message is refused (or whose library call fails with a Cohort error) drops out, as a real site would. The
    round must end with the exact sum of its survivors' inputs, or abort: never a wrong sum, never another error.
    """

    def __init__(self, data: st.DataObject, stage: str, direction: str, victim: str) -> None:
        self.data, self.point, self.victim = data, (stage, direction), victim
        self.params = sa_params()
        self.server, self.clients = make_round(self.params)
        rng = np.random.default_rng(1)
        self.inputs = {s: rng.integers(0, 1 << SA_BITS, SA_DIM, dtype=np.uint32) for s in SA_SITES}
        self.extra = np.zeros(SA_DIM, np.int64)  # what an accepted, fuzzed masked input adds to the sum
        self.live = set(SA_SITES)

    def tampered(self, site: str, stage: str, direction: str) -> bool:
        return (stage, direction) == self.point and site == self.victim

    def incoming(
        self, site: str, stage: str, honest: Any, to_pb: Callable[[Any], M], from_pb: Callable[[M], Any]
    ) -> Any:
        if not self.tampered(site, stage, "in"):
            return honest
        try:
            return from_pb(self.data.draw(mutations(to_pb(honest))))
        except InvalidArgument:
            return honest  # the site's decoder refused it; the coordinator's retry is the honest message

    def call(self, site: str, fn: Callable[[], Any]) -> Any:
        """A site's library call; a SecAggAborted ends the round, another Cohort error drops the site."""
        try:
            return fn()
        except sa.SecAggAborted as exc:
            raise RoundOver(str(exc)) from exc
        except CohortError:
            self.live.discard(site)
            return None

    def deliver(
        self,
        site: str,
        stage: str,
        honest: Any,
        to_pb: Callable[[Any], M],
        from_pb: Callable[[M], Any],
        receive: Callable[[str, Any], None],
    ) -> None:
        if self.tampered(site, stage, "out"):
            try:
                forged = from_pb(self.data.draw(mutations(to_pb(honest))))
            except InvalidArgument:
                forged = None  # refused by the coordinator's decoder, before the library saw it
            if forged is not None:
                self.offer(site, forged, receive, forged=True)
        self.offer(site, honest, receive)

    def offer(self, site: str, msg: Any, receive: Callable[[str, Any], None], *, forged: bool = False) -> bool:
        """Hand ``msg`` to the coordinator; False if refused. A refused honest message drops its site (a real site
        would give up); after a refused forged one, the site sends its honest message."""
        before = snapshot(self.server)
        try:
            receive(site, msg)
        except sa.SecAggAborted as exc:
            raise RoundOver(str(exc)) from exc
        except RpcError:
            assert snapshot(self.server) == before, "a refused message changed the coordinator's state"
            if not forged:
                self.live.discard(site)
            return False
        return True

    def masked(self, site: str, honest: sa.MaskedInput) -> None:
        if self.tampered(site, "masked_input", "out"):
            forged = self.data.draw(edited_bytes(honest.data))
            if self.offer(site, sa.MaskedInput(site, forged), self.server.receive_masked_input, forged=True):
                delta = unpack(forged, SA_DIM, SA_BITS).astype(np.int64) - honest_values(honest)
                self.extra += delta  # the site goes on with the protocol, unaware
                return
        self.offer(site, honest, self.server.receive_masked_input)

    def run(self) -> np.ndarray | None:
        server, clients = self.server, self.clients
        try:
            for s in sorted(self.live):
                self.deliver(
                    s, "advertise", clients[s].advertise(), ad_to_proto, ad_from_proto, server.receive_advertisement
                )
            u1 = server.close_advertise()
            for s in sorted(self.live & u1):
                ads = self.incoming(s, "share_keys", server.advertisements_for(s), ads_to_pb, ads_from_pb)
                msg = self.call(s, partial(clients[s].share_keys, ads))
                if msg is not None:
                    decode = partial(share_keys_from_proto, s)
                    self.deliver(s, "share_keys", msg, share_keys_to_proto, decode, server.receive_share_keys)
            u2 = server.close_share_keys()
            for s in sorted(self.live & u2):
                shares = self.incoming(s, "receive_shares", server.shares_for(s), shares_to_pb, shares_from_pb)
                self.call(s, partial(clients[s].receive_shares, shares))
                if s in self.live:
                    mi = self.call(s, partial(clients[s].masked_input, self.inputs[s]))
                    if mi is not None:
                        self.masked(s, mi)
            u3 = server.close_masked_input()
            for s in sorted(self.live & set(u3)):
                survivors = self.incoming(s, "consistency", u3, survivors_to_pb, survivors_from_pb)
                sig = self.call(s, partial(clients[s].consistency_check, survivors))
                if sig is not None:
                    self.deliver(
                        s,
                        "consistency",
                        sig,
                        signature_to_proto,
                        signature_from_proto,
                        server.receive_survivor_signature,
                    )
            u4 = server.close_consistency()
            for s in sorted(self.live & u4):
                sigs = self.incoming(s, "unmask", server.signatures_for(s), sigs_to_pb, sigs_from_pb)
                um = self.call(s, partial(clients[s].unmask, sigs))
                if um is not None:
                    self.deliver(s, "unmask", um, unmask_to_proto, partial(unmask_from_proto, s), server.receive_unmask)
            return server.finish()
        except (RoundOver, sa.SecAggAborted):  # closing a stage or finishing may abort too: never a wrong sum
            return None

    def expected(self) -> np.ndarray:
        total = sum((self.inputs[s].astype(np.int64) for s in self.server.survivors), np.zeros(SA_DIM, np.int64))
        return ((total + self.extra) & ((1 << SA_BITS) - 1)).astype(np.uint32)


def honest_values(msg: sa.MaskedInput) -> np.ndarray:
    return unpack(msg.data, SA_DIM, SA_BITS).astype(np.int64)


def ads_to_pb(ads: Sequence[sa.Advertisement]) -> pb.SecAggAdvertisements:
    return pb.SecAggAdvertisements(advertisements=[ad_to_proto(a) for a in ads])


def ads_from_pb(m: pb.SecAggAdvertisements) -> list[sa.Advertisement]:
    return [ad_from_proto(a) for a in m.advertisements]


def shares_to_pb(shares: Sequence[sa.EncryptedShare]) -> pb.SecAggShares:
    return pb.SecAggShares(shares=[share_to_proto(e) for e in shares])


def shares_from_pb(m: pb.SecAggShares) -> list[sa.EncryptedShare]:
    return [share_from_proto(e) for e in m.shares]


def survivors_to_pb(u3: Sequence[str]) -> pb.SecAggSurvivors:
    return pb.SecAggSurvivors(sites=list(u3))


def survivors_from_pb(m: pb.SecAggSurvivors) -> list[str]:
    return list(m.sites)


def sigs_to_pb(sigs: Sequence[sa.SurvivorSignature]) -> pb.SecAggSignatures:
    return pb.SecAggSignatures(signatures=[signature_to_proto(s) for s in sigs])


def sigs_from_pb(m: pb.SecAggSignatures) -> list[sa.SurvivorSignature]:
    return [signature_from_proto(s) for s in m.signatures]


@settings(max_examples=120 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), point=st.sampled_from(TAMPER_POINTS), victim=st.sampled_from(SA_SITES))
def test_one_tampered_secagg_message_never_yields_a_wrong_sum(
    data: st.DataObject, point: tuple[str, str], victim: str
) -> None:
    rnd = TamperedRound(data, point[0], point[1], victim)
    total = rnd.run()
    event(f"{point[0]}/{point[1]}: {'aborted' if total is None else f'{len(rnd.server.survivors)} survivors'}")
    if total is not None:
        np.testing.assert_array_equal(total, rnd.expected())


def masked_round(owner_commits: dict[str, bytes] | None = None) -> tuple[sa.SecAggServer, dict[str, sa.SecAggClient]]:
    """A round of SA_SITES up to the masked inputs (all sent); ``owner_commits`` replaces a site's commitment to
    the b-share it holds itself."""
    params = sa_params()
    server, clients = make_round(params)
    for s in SA_SITES:
        server.receive_advertisement(s, clients[s].advertise())
    server.close_advertise()
    for s in SA_SITES:
        msg = clients[s].share_keys(server.advertisements_for(s))
        if owner_commits and s in owner_commits:
            commitments = tuple(
                dataclasses.replace(c, b_commitment=owner_commits[s]) if c.holder == s else c for c in msg.commitments
            )
            msg = dataclasses.replace(msg, commitments=commitments)
        server.receive_share_keys(s, msg)
    server.close_share_keys()
    for s in SA_SITES:
        clients[s].receive_shares(server.shares_for(s))
    return server, clients


@settings(max_examples=30 * FUZZ_SCALE, deadline=None)
@given(
    share=st.one_of(
        st.binary(max_size=80).filter(lambda b: len(b) != SHARE_LEN),
        st.integers(PRIME, (1 << (8 * SHARE_LEN)) - 1).map(lambda v: v.to_bytes(SHARE_LEN, "big")),
    )
)
def test_a_malformed_share_its_owner_committed_to_is_only_evidence(share: bytes) -> None:
    """A site commits, in its own name, to a malformed share for itself and reveals exactly that: the coordinator
    takes the message, records the share as rejected, and still finishes with the exact sum (t = 2 of 3)."""
    params = sa_params()
    a = SA_SITES[0]
    server, clients = masked_round({a: share_commitment(JOB, params.round_no, a, a, "b", share)})
    inputs = {s: np.full(SA_DIM, i + 1, np.uint32) for i, s in enumerate(SA_SITES)}
    for s in SA_SITES:
        server.receive_masked_input(s, clients[s].masked_input(inputs[s]))
    u3 = server.close_masked_input()
    for s in SA_SITES:
        server.receive_survivor_signature(s, clients[s].consistency_check(u3))
    server.close_consistency()
    for s in SA_SITES:
        msg = clients[s].unmask(server.signatures_for(s))
        if s == a:
            own = [sa.RevealedShare(a, "b", share) if r.owner == a else r for r in msg.shares]
            msg = sa.Unmask(a, tuple(own))
        server.receive_unmask(s, msg)
    assert server.rejected == [RejectedShare(a, a, "b")]
    np.testing.assert_array_equal(server.finish(), np.full(SA_DIM, 6, np.uint32))


def test_everything_after_an_abort_reports_the_abort() -> None:
    """A masked input whose padding bits are set breaks off after part of it was added: the round is aborted, and
    every later call says so (a SecAggAborted the coordinator fails the round on, not a stage mismatch)."""
    server, clients = masked_round()
    a, b, c = SA_SITES
    server.receive_masked_input(a, clients[a].masked_input(np.zeros(SA_DIM, np.uint32)))
    data = bytearray(clients[b].masked_input(np.zeros(SA_DIM, np.uint32)).data)
    assert (SA_DIM * SA_BITS) % 8
    assert packed_len(SA_DIM, SA_BITS) == len(data)
    data[-1] |= 0x80  # a padding bit
    with pytest.raises(sa.SecAggAborted, match="broke off"):
        server.receive_masked_chunks(b, [bytes(data[:8]), bytes(data[8:])])
    with pytest.raises(sa.SecAggAborted, match="was aborted: the masked input of 's01' broke off"):
        server.receive_masked_input(c, clients[c].masked_input(np.zeros(SA_DIM, np.uint32)))
    with pytest.raises(sa.SecAggAborted, match="was aborted"):
        server.close_masked_input()


# A flipped bit can make the serial number negative: cryptography parses such a certificate with a deprecation
# warning (a future release will refuse it, as a ValueError, which verify_site_certificate already maps). The
# warning is cryptography's notice, not a Cohort error, so it is no failure here (pytest turns warnings into errors).
CRYPTOGRAPHY_SERIAL_WARNING = (
    "ignore:Parsed a serial number which wasn't positive:cryptography.utils.CryptographyDeprecationWarning"
)


@pytest.mark.filterwarnings(CRYPTOGRAPHY_SERIAL_WARNING)
@settings(max_examples=100 * FUZZ_SCALE, deadline=None)
@given(data=st.data())
def test_mutated_site_certificates_are_refused_cleanly(data: st.DataObject) -> None:
    ident = federation().identity("s01")
    pem = ident.cert_pem
    body = b"".join(pem.strip().splitlines()[1:-1])
    der = base64.b64decode(body)
    mutated_der = data.draw(edited_bytes(der))
    forged = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(mutated_der) + b"-----END CERTIFICATE-----\n"
    candidate = data.draw(st.sampled_from((forged, data.draw(edited_bytes(pem)))))
    try:
        key = verify_site_certificate(candidate, "s01", federation().cas, NOW)
    except sa.SecAggTampered:
        return
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key == ident.key.public_key()


def test_a_certificate_with_an_invalid_version_is_refused() -> None:
    """Found by the fuzzer above: cryptography raises InvalidVersion, which is no ValueError, for a version field
    other than v1 or v3; the coordinator answered such an advertisement with INTERNAL."""
    pem = federation().identity("s01").cert_pem
    der = base64.b64decode(b"".join(pem.strip().splitlines()[1:-1]))
    v3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2: version 3
    assert der.count(v3) == 1
    forged = der.replace(v3, v3[:-1] + b"\x03")
    forged_pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(forged) + b"-----END CERTIFICATE-----\n"
    with pytest.raises(sa.SecAggTampered, match="not a PEM certificate"):
        verify_site_certificate(forged_pem, "s01", federation().cas, NOW)


@settings(max_examples=150 * FUZZ_SCALE, deadline=None)
@given(
    data=st.binary(max_size=80),
    d=st.integers(0, 40),
    bits=st.integers(16, 32),
    cuts=st.lists(st.integers(0, 80), max_size=4),
)
def test_unpacking_any_bytes_is_exact_or_refused(data: bytes, d: int, bits: int, cuts: list[int]) -> None:
    whole: np.ndarray | None
    try:
        whole = unpack(data, d, bits)
    except InvalidArgument:
        whole = None
    if whole is not None:
        assert len(whole) == d
        assert bits == 32 or int(whole.max(initial=0)) < 1 << bits
    unpacker, out = Unpacker(d, bits, 16), np.zeros(d, np.uint32)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    try:
        for lo, hi in itertools.pairwise(bounds):
            for start, values in unpacker.feed(data[lo:hi]):
                out[start : start + len(values)] = values
        unpacker.close()
    except InvalidArgument:
        assert whole is None or len(data) != packed_len(d, bits)
        return
    assert whole is not None
    np.testing.assert_array_equal(out, whole)


# ---------------------------------------------------------------------------------------------------------------
# Configuration (common/config.py) and admin job specs (coordinator/jobspec.py)
# ---------------------------------------------------------------------------------------------------------------

_KEYS = (
    "federation", "name", "sites", "server", "listen", "tls", "ca", "cert", "key", "job", "task", "rounds",
    "fraction", "min_sites", "round_timeout_s", "params", "seed", "secure_aggregation", "privacy", "unit", "bits",
    "delta", "coordinator", "address", "data_dir", "reconnect", "training", "state_dir", "heartbeat_interval_s",
)  # fmt: skip
_YAML_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    integers_in(-(2**70), 2**70),
    doubles(),
    texts(),
    st.sampled_from(("a", "127.0.0.1:0", "breast_cancer", "x.crt", "10" * 2000)),
)
_YAML_VALUES = st.recursive(
    _YAML_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(_KEYS), texts()), inner, max_size=5)
    ),
    max_leaves=20,
)


_YAML_TAGS = ("!!int", "!!float", "!!bool", "!!timestamp", "!!binary", "!!str", "!!null", "!!set", "!!omap", "")
_YAML_ODD = ("2001-13-45", "2001-02-29", "0x", "0b2", "09", ".1e", "1:2:3", "maybe", "~", "&a [*a]", "*x", "{a: [")


@st.composite
def yaml_documents(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(("structured", "text", "edited", "tagged")))
    if kind == "tagged":  # PyYAML's constructors fail on these with plain Python errors
        key = draw(st.sampled_from(("task", "rounds", "fraction", "federation", "x")))
        return f"{key}: {draw(st.sampled_from(_YAML_TAGS))} {draw(st.sampled_from(_YAML_ODD) | texts())}\n"
    if kind == "structured":
        doc = draw(st.dictionaries(st.sampled_from(_KEYS), _YAML_VALUES, max_size=6))
        return yaml.safe_dump(doc)
    if kind == "text":
        return draw(st.text(_CHARS, max_size=120))
    shipped = draw(st.sampled_from(sorted(DEPLOY.glob("*/*.yaml"))))
    text = shipped.read_text()
    for _ in range(draw(st.integers(1, 3))):
        text = draw(edited_text(text))
    return text


CONFIG_CLASSES: tuple[type[Any], ...] = (CoordinatorConfig, ParticipantConfig, JobConfig)


def load_any(cls: type[Any], path: Path | None, env: dict[str, str], overrides: list[str]) -> None:
    """Load, and when it loads, every float in the result is finite."""
    try:
        cfg = loader.load(cls, path, env=env, env_prefix="FUZZ_", overrides=overrides)
    except ConfigError:
        return
    assert isinstance(cfg, cls)
    assert_finite(cfg)


def assert_finite(obj: object) -> None:
    for value in vars(obj).values():
        if isinstance(value, float):
            assert math.isfinite(value), obj
        elif hasattr(value, "__dataclass_fields__"):
            assert_finite(value)


@settings(max_examples=200 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=yaml_documents(),
    cls=st.sampled_from(CONFIG_CLASSES),
    env=st.dictionaries(
        st.builds("FUZZ_{}".format, st.sampled_from(("JOB__ROUNDS", "FEDERATION__SITES", "TASK", "", "X__Y__Z"))),
        texts(),
        max_size=2,
    ),
    overrides=st.lists(
        st.builds("{}={}".format, st.sampled_from((*_KEYS, "job.rounds", "a..b", "")), texts()), max_size=2
    ),
)
@example(text="x: " + "1" * 5000, cls=JobConfig, env={}, overrides=[])  # more digits than Python parses
@example(text="[" * 3000, cls=JobConfig, env={}, overrides=[])  # nesting deeper than the parser recurses
@example(text="task: x\nround_timeout_s: .nan", cls=JobConfig, env={}, overrides=[])
@example(text="task: x\nwait_for_sites_s: .inf", cls=JobConfig, env={}, overrides=[])
@example(text="task: x\nround_timeout_s: " + "9" * 400, cls=JobConfig, env={}, overrides=[])  # int beyond float
@example(text="task: x", cls=JobConfig, env={}, overrides=["rounds=" + "[" * 3000])
@example(text="task: x", cls=JobConfig, env={"FUZZ_ROUNDS": "9" * 5000}, overrides=[])
def test_config_loader_raises_only_config_errors(
    tmp_path: Path, text: str, cls: type[Any], env: dict[str, str], overrides: list[str]
) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    load_any(cls, path, env, overrides)


def test_config_loader_refuses_undecodable_files(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("task: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        loader.load(JobConfig, path)


@settings(max_examples=200 * FUZZ_SCALE, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(_KEYS), _YAML_VALUES, max_size=6), cls=st.sampled_from(CONFIG_CLASSES))
def test_building_from_any_mapping_raises_only_config_errors(doc: dict[str, Any], cls: type[Any]) -> None:
    try:
        cfg = loader.build(cls, doc)
    except ConfigError:
        return
    assert_finite(cfg)


def valid_job_spec() -> pb.JobSpec:
    spec = job_spec_to_proto(loader.build(JobConfig, {"task": "breast_cancer", "rounds": 3, "min_sites": 2}))
    spec.privacy.unit = "site"
    spec.secure_aggregation.enabled = True
    return spec


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_job_specs_with_non_finite_numbers_are_refused(value: float) -> None:
    for sub_name in ("", "params", "privacy", "secure_aggregation"):
        valid = valid_job_spec()
        sub = getattr(valid, sub_name) if sub_name else valid
        for field in sub.DESCRIPTOR.fields:
            if field.type == FD.TYPE_DOUBLE:
                spec = valid_job_spec()
                setattr(getattr(spec, sub_name) if sub_name else spec, field.name, value)
                with pytest.raises(InvalidArgument, match="finite"):
                    job_config_from_proto(spec)


@settings(max_examples=250 * FUZZ_SCALE, deadline=None)
@given(data=st.data(), mutate=st.booleans())
def test_job_specs_decode_to_valid_configs_or_are_refused(data: st.DataObject, mutate: bool) -> None:
    spec = data.draw(mutations(valid_job_spec(), max_steps=4) if mutate else random_of(pb.JobSpec))
    try:
        cfg = job_config_from_proto(spec)
    except InvalidArgument:
        return
    assert isinstance(cfg, JobConfig)
    assert_finite(cfg)
    cfg.check("job")


# ---------------------------------------------------------------------------------------------------------------
# The audit chain verifier (coordinator/state/audit.py)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audit_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    store = SqliteStore(tmp_path_factory.mktemp("audit") / "coordinator.db")
    for i in range(6):
        store.audit("rpc_refused", f"site-{'abc'[i % 3]}", method="Join", code="PERMISSION_DENIED", n=i)
    rows = [dict(r) for r in store._db.execute("SELECT * FROM audit ORDER BY seq")]
    store.close()
    return rows


AUDIT_OPS = ("edit", "delete", "swap", "duplicate", "truncate", "insert_forged")


@settings(max_examples=200 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), op=st.sampled_from(AUDIT_OPS))
def test_every_mutation_of_the_audit_log_is_detected(
    audit_rows: list[dict[str, Any]], data: st.DataObject, op: str
) -> None:
    rows = [dict(r) for r in audit_rows]
    clean = verify_rows(rows)
    assert clean.ok
    assert clean.count == len(rows)
    i = data.draw(st.integers(0, len(rows) - 1))
    if op == "edit":
        col = data.draw(st.sampled_from(("seq", "ts", "kind", "actor", "detail", "prev_hash", "hash")))
        old = rows[i][col]
        if col == "seq":
            new: Any = data.draw(integers_in(-(2**63), 2**63 - 1, old))
        elif col == "ts":
            new = data.draw(doubles(old).filter(lambda v: not math.isnan(v)))
        else:
            new = data.draw(texts(old))
        if new == old and repr(new) == repr(old):
            return
        rows[i][col] = new
    elif op == "delete":
        del rows[i]
    elif op == "swap":
        j = data.draw(st.integers(0, len(rows) - 1).filter(lambda j: j != i))
        rows[i], rows[j] = rows[j], rows[i]
    elif op == "duplicate":
        rows.insert(i, dict(rows[i]))
    elif op == "insert_forged":
        forged = dict(rows[i], kind=data.draw(texts()), seq=i + 1)
        rows.insert(i, forged)
    truncated = op == "truncate" or (op == "delete" and i == len(audit_rows) - 1)
    if op == "truncate":
        rows = rows[:i]
    report = verify_rows(rows)
    if truncated:
        assert report.ok  # a shorter chain is still a chain: the recorded head catches it
        assert not verify_rows(rows, head=clean.head).ok
    else:
        assert not report.ok, op
    assert report.head != clean.head or not report.ok


@settings(max_examples=40 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seq=st.integers(1, 6),
    col=st.sampled_from(("ts", "kind", "actor", "detail", "prev_hash", "hash")),
    value=st.one_of(texts(), integers_in(-(2**63), 2**63 - 1), doubles().filter(lambda v: not math.isnan(v))),
)
def test_tampered_databases_verify_without_crashing(tmp_path: Path, seq: int, col: str, value: object) -> None:
    """Whatever SQLite lets an attacker store in a column (text in a REAL column, numbers in TEXT ones)."""
    path = tmp_path / f"audit-{seq}-{col}.db"
    path.unlink(missing_ok=True)
    store = SqliteStore(path)
    for i in range(6):
        store.audit("join", "site-a", n=i)
    store.close()
    db = sqlite3.connect(path)
    before = db.execute(f"SELECT {col} FROM audit WHERE seq = ?", (seq,)).fetchone()[0]
    db.execute(f"UPDATE audit SET {col} = ? WHERE seq = ?", (value, seq))
    after = db.execute(f"SELECT {col} FROM audit WHERE seq = ?", (seq,)).fetchone()[0]
    db.commit()
    db.close()
    report = verify_database(path)
    if repr(after) == repr(before):
        assert report.ok
    else:
        assert not report.ok
    assert report.count == 6
