"""Reliability campaign, part 3: fuzzing with hypothesis (issue 9).

Three targets, each fed both arbitrary input and mutations of valid input (bit flips,
truncation, spliced bytes, fields set to extreme values), so the fuzzer gets past the outer
checks into the deep ones:

* ``core.codec.decode_matrix`` over EncodedMatrix values (checksums recomputed after mutating,
  so the zstd frame, the shapes and the values are reached, not only the checksum gate);
* ``core.serde`` parsing of serialized UploadFeaturesRequest / BankChunk bytes;
* the servicer's request handling (``FederationServicer.UploadFeatures`` / ``JoinRound`` /
  ``QueryUploadStatus`` / ``DownloadBank`` on a live Federation, through the tolerant
  deserializer) with a fake servicer context.

The contract checked: no crash, no hang (a per-example deadline), only typed errors (the
codec's / serde's ValueError subclasses, protobuf's DecodeError) and, from the servicer, only
an answer or an abort with one of the protocol's status codes (never UNKNOWN or INTERNAL).

CI runs a few hundred examples in total; ``pytest -m reliability`` runs >= 10,000 (printed).
Examples are derandomized (seeded by the test), so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fedserver_testing import make_config, site_rows, upload_messages
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.codec import (
    CODEC_PRESETS,
    CodecError,
    EncodedMatrix,
    compute_checksum,
    decode_matrix,
    encode_matrix,
)
from core.serde import (
    bank_chunk_from_proto,
    bank_chunk_to_proto,
    split_bank_into_chunks,
    upload_request_from_proto,
    upload_request_to_proto,
)
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.auth import TokenStore
from fedserver.federation import Federation
from fedserver.journal import Journal
from fedserver.servicer import FederationServicer, _tolerant

pytestmark = pytest.mark.reliability  # the campaign; full=True: only with -m reliability

CI_EXAMPLES = {"codec": 150, "serde": 150, "servicer": 100}
FULL_EXAMPLES = {"codec": 4000, "serde": 4000, "servicer": 2500}
ALLOWED_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DATA_LOSS, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND,
}


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=5000, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )


# -- valid seeds to mutate ------------------------------------------------------------------

_MATRIX = site_rows(0, 24, dim=8)
_SEEDS: list[EncodedMatrix] = [encode_matrix(_MATRIX, c) for c in CODEC_PRESETS.values()]
_SEEDS.append(encode_matrix(np.empty((0, 8), np.float32), CODEC_PRESETS["fp16"]))


def _mutate_bytes(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flip a bit, 1 truncate, 2 insert a byte."""
    buffer = bytearray(data)
    for kind, position, value in edits:
        if not buffer and kind != 2:
            continue
        at = position % (len(buffer) + 1)
        if kind == 0 and at < len(buffer):
            buffer[at] ^= 1 << (value % 8)
        elif kind == 1:
            del buffer[at:]
        elif kind == 2:
            buffer.insert(at, value % 256)
    return bytes(buffer)


_EDITS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4
)
_EXTREME_INTS = st.one_of(
    st.integers(0, 64), st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1])
)


@st.composite
def encoded_matrices(draw: st.DrawFn) -> EncodedMatrix | None:
    """EncodedMatrix values: a valid seed with mutated fields/payload (checksum recomputed
    unless the draw says otherwise), or None when the fields cannot form one (that refusal is a
    typed MalformedPayloadError too, checked by the caller)."""
    seed = draw(st.sampled_from(_SEEDS))
    fields: dict[str, Any] = dataclasses.asdict(seed)
    for name in draw(st.sets(st.sampled_from(["rows", "cols", "decoded_size"]), max_size=2)):
        fields[name] = draw(_EXTREME_INTS)
    if draw(st.booleans()):
        fields["payload"] = _mutate_bytes(seed.payload, draw(_EDITS))
    if draw(st.integers(0, 9)) == 0:
        fields["payload"] = draw(st.binary(max_size=256))
    if seed.quant_scale and draw(st.booleans()):
        fields["quant_scale"] = _mutate_bytes(seed.quant_scale, draw(_EDITS))
    if draw(st.integers(0, 3)):  # usually re-seal, so the checks behind the checksum are reached
        # Out-of-range header values cannot be packed: then the old checksum stays.
        with contextlib.suppress(struct.error):
            fields["checksum"] = compute_checksum(
                rows=fields["rows"], cols=fields["cols"], value_type=fields["value_type"],
                byte_shuffle=fields["byte_shuffle"], decoded_size=fields["decoded_size"],
                quant_scale=fields["quant_scale"], quant_offset=fields["quant_offset"],
                payload=fields["payload"], checksum_type=fields["checksum_type"],
            )
    try:
        return EncodedMatrix(**fields)
    except CodecError:
        return None


# -- targets --------------------------------------------------------------------------------


def _run_codec(examples: int) -> int:
    count = [0]

    @_settings(examples)
    @given(encoded_matrices(), st.sampled_from([0, 64, 1 << 12, 1 << 20]))
    def check(matrix: EncodedMatrix | None, bound: int) -> None:
        count[0] += 1
        if matrix is None:
            return
        try:
            out = decode_matrix(matrix, max_decoded_bytes=bound)
        except CodecError:
            return
        assert out.shape == matrix.shape and out.dtype == np.float32
        assert np.isfinite(out).all()

    check()
    return count[0]


def _seed_messages() -> list[bytes]:
    summary, chunks = upload_messages("a", site_rows(1, 40, dim=8), max_chunk_bytes=8 * 4 * 16)
    upload = [upload_request_to_proto(item).SerializeToString() for item in (summary, *chunks)]
    bank = [bank_chunk_to_proto(c).SerializeToString() for c in split_bank_into_chunks(
        site_rows(2, 30, dim=8), config=CODEC_PRESETS["int8"], round=1,
        server_coverage_radius=1.0, max_site_coverage_radius=0.5, max_chunk_bytes=8 * 16,
    )]
    return upload + bank


_MESSAGES = _seed_messages()
_UPLOADS = _MESSAGES[: len(_MESSAGES) - 2]


def _run_serde(examples: int) -> int:
    count = [0]
    typed = (ValueError, DecodeError)

    @_settings(examples)
    @given(st.one_of(
        st.binary(max_size=512),
        st.tuples(st.sampled_from(_MESSAGES), _EDITS).map(lambda t: _mutate_bytes(*t)),
    ))
    def check(data: bytes) -> None:
        count[0] += 1
        for parse in (
            lambda: upload_request_from_proto(pb.UploadFeaturesRequest.FromString(data)),
            lambda: bank_chunk_from_proto(pb.BankChunk.FromString(data)),
        ):
            try:
                item = parse()
            except typed:
                continue
            assert item is not None

    check()
    return count[0]


class FakeContext:
    """The parts of grpc.aio.ServicerContext the servicer uses; abort raises AbortedError."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def done(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AbortedError(code, details)


async def _requests(items: list[object]) -> AsyncIterator[object]:
    for item in items:
        yield item


async def _settle(result: object) -> None:
    """Await a handler's result: a coroutine (unary response) or an async generator."""
    if isinstance(result, AsyncIterator):
        async for _ in result:
            pass
    else:
        await result  # type: ignore[misc]


class AbortedError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


@pytest.fixture
def servicer(tmp_path: Path) -> Iterator[tuple[FederationServicer, dict[str, str], Federation]]:
    config, tokens = make_config(tmp_path, ("a", "b"), fsync=False, max_rows_per_site=500)
    federation = Federation(config, Journal(config.state_dir, fsync=False), ("a", "b"))
    federation.start()
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield (FederationServicer(federation, TokenStore.load(config.tokens_file),
                                  executor=executor), tokens, federation)
    federation.close()


def _run_servicer(
    examples: int, servicer: FederationServicer, tokens: dict[str, str]
) -> tuple[int, dict[str, int]]:
    count = [0]
    codes: dict[str, int] = {}
    parse_upload = _tolerant(pb.UploadFeaturesRequest)
    unary: dict[str, tuple[Callable[[bytes], object], Callable[..., object]]] = {
        "JoinRound": (_tolerant(fpb.JoinRoundRequest), servicer.JoinRound),
        "QueryUploadStatus": (_tolerant(fpb.QueryUploadStatusRequest),
                              servicer.QueryUploadStatus),
    }

    def outcome(call: Callable[[], object]) -> None:
        try:
            asyncio.run(_settle(call()))
            codes["OK"] = codes.get("OK", 0) + 1
        except AbortedError as aborted:
            assert aborted.code in ALLOWED_CODES, str(aborted)
            assert aborted.details, "an abort must say what was wrong"
            codes[aborted.code.name] = codes.get(aborted.code.name, 0) + 1

    upload_bytes = st.one_of(
        st.binary(max_size=300),
        st.tuples(st.sampled_from(_UPLOADS), _EDITS).map(lambda t: _mutate_bytes(*t)),
        st.sampled_from(_UPLOADS),
    )

    @_settings(examples)
    @given(
        site=st.sampled_from(["a", "b"]),
        stream=st.lists(upload_bytes, max_size=6),
        method=st.sampled_from(["UploadFeatures", "JoinRound", "QueryUploadStatus",
                                "DownloadBank"]),
        unary_bytes=st.binary(max_size=64),
    )
    def check(site: str, stream: list[bytes], method: str, unary_bytes: bytes) -> None:
        count[0] += 1
        context = FakeContext(tokens[site])
        if method == "UploadFeatures":
            outcome(lambda: servicer.UploadFeatures(_requests([parse_upload(b) for b in stream]),
                                                   context))  # type: ignore[arg-type]
        elif method == "DownloadBank":
            request = _tolerant(fpb.DownloadBankRequest)(unary_bytes)
            outcome(lambda: servicer.DownloadBank(request, context))  # type: ignore[arg-type]
        else:
            parse, handler = unary[method]
            request = parse(unary_bytes)
            outcome(lambda: handler(request, context))

    check()
    return count[0], codes


# -- tests ----------------------------------------------------------------------------------


def test_fuzz_codec_decoder() -> None:
    assert _run_codec(CI_EXAMPLES["codec"]) == CI_EXAMPLES["codec"]


def test_fuzz_serde() -> None:
    assert _run_serde(CI_EXAMPLES["serde"]) == CI_EXAMPLES["serde"]


def test_fuzz_servicer_requests(
    servicer: tuple[FederationServicer, dict[str, str], Federation],
) -> None:
    handler, tokens, federation = servicer
    count, codes = _run_servicer(CI_EXAMPLES["servicer"], handler, tokens)
    assert count == CI_EXAMPLES["servicer"]
    assert codes.get("INVALID_ARGUMENT", 0) > 0 and codes.get("OK", 0) > 0, codes
    assert federation.snapshot().phase.value == "collecting"  # still serving


@pytest.mark.reliability(full=True)
@pytest.mark.timeout(1200)
def test_fuzz_full_campaign(
    servicer: tuple[FederationServicer, dict[str, str], Federation],
) -> None:
    handler, tokens, _ = servicer
    counts = {
        "codec": _run_codec(FULL_EXAMPLES["codec"]),
        "serde": _run_serde(FULL_EXAMPLES["serde"]),
    }
    counts["servicer"], codes = _run_servicer(FULL_EXAMPLES["servicer"], handler, tokens)
    assert counts == FULL_EXAMPLES
    total = sum(counts.values())
    assert total >= 10_000
    print(f"\nfuzz: {total} generated cases ({counts}); servicer outcomes {codes}")
