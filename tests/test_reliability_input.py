"""Reliability campaign, part 2: bad input (issue 9).

Every case is sent to a real daemon on 127.0.0.1 while an honest site uploads alongside, one
of its chunks released after each case. Each case asserts its status code AND the message,
then that the server still answers health checks. At the end the honest upload is complete,
the attacker sites upload their real data, and the bank equals the one ``core.federated``
computes in process from the honest data alone: nothing a refused request carried stayed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import zstandard
from fedserver_testing import (
    FINGERPRINT,
    TestClient,
    channel,
    make_config,
    reference_bank,
    site_rows,
    upload_messages,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.codec import compute_checksum
from core.serde import upload_request_to_proto
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.auth import new_token, write_tokens_file
from fedserver.daemon import create_server
from fedserver.federation import Phase

pytestmark = pytest.mark.reliability  # the campaign; full=True: only with -m reliability

D = 32
CHUNK_BYTES = 20 * D * 4  # 20 rows a chunk
MAX_CHUNK_BYTES = 1 << 14  # the server's limit on a chunk's decoded payload
UPLOAD = "/fedpatchcore.v1.FederationService/UploadFeatures"
JOIN = "/fedpatchcore.v1.FederationService/JoinRound"


def forged_chunk(
    values: np.ndarray, *, site: str = "x", sequence: int = 0, row_offset: int = 0,
    last: bool = False, round_number: int = 1,
) -> pb.UploadFeaturesRequest:
    """A chunk encoded by hand (fp32, no shuffle) with a valid checksum, whatever the values:
    the reference encoder refuses NaN/Inf, a malicious client does not."""
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    payload = zstandard.ZstdCompressor(write_content_size=True).compress(raw)
    rows, cols = values.shape
    return pb.UploadFeaturesRequest(chunk=pb.FeatureChunk(
        site_id=site, round=round_number, sequence=sequence, row_offset=row_offset, last=last,
        features=pb.EncodedMatrix(
            rows=rows, cols=cols, value_type=pb.VALUE_TYPE_FLOAT32, byte_shuffle=False,
            zstd_level=3, decoded_size=len(raw), checksum_type=pb.CHECKSUM_TYPE_XXH64,
            checksum=checksum_of(rows, cols, len(raw), payload), payload=payload,
        ),
    ))


def zstd_bomb(size: int) -> tuple[int, bytes]:
    """One zstd frame declaring ``size`` bytes of zeros, built 1 MiB at a time (the test never
    holds the inflated bytes)."""
    block = bytes(1 << 20)
    compressor = zstandard.ZstdCompressor(level=3).compressobj(size=size)
    parts = [compressor.compress(block) for _ in range(size // len(block))]
    parts.append(compressor.flush())
    return size, b"".join(parts)


def checksum_of(rows: int, cols: int, decoded_size: int, payload: bytes) -> int:
    return compute_checksum(
        rows=rows, cols=cols, value_type="fp32", byte_shuffle=False, decoded_size=decoded_size,
        quant_scale=b"", quant_offset=b"", payload=payload, checksum_type="xxh64",
    )


@dataclass
class Case:
    name: str
    run: Callable[[], object]
    code: grpc.StatusCode
    message: str  # regex the details must match


def _expect(case: Case) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        case.run()
    error = caught.value
    assert error.code() is case.code, f"{case.name}: {error.code()} {error.details()!r}"
    assert re.search(case.message, error.details() or ""), f"{case.name}: {error.details()!r}"
    return error.details()


def _serving(port: int) -> bool:
    with channel(port) as conn:
        reply = health_pb2_grpc.HealthStub(conn).Check(
            health_pb2.HealthCheckRequest(service="fedpatchcore.v1.FederationService"), timeout=10
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_input_cases_while_an_honest_site_uploads(tmp_path: Path) -> None:
    sites = ("h", "x", "y")
    config, tokens = make_config(
        tmp_path, sites, feature_dim=D, feature_fingerprint=FINGERPRINT,
        max_chunk_bytes=MAX_CHUNK_BYTES, max_rows_per_site=1000,
    )
    server, port = create_server(config)
    server.start()
    data = {"h": site_rows(7, 520), "x": site_rows(8, 120), "y": site_rows(9, 90)}
    honest_summary, honest_chunks = upload_messages("h", data["h"], max_chunk_bytes=CHUNK_BYTES)
    x_summary, x_chunks = upload_messages("x", data["x"], max_chunk_bytes=CHUNK_BYTES)
    released = threading.Semaphore(0)
    acknowledged: dict[str, object] = {}

    def honest_stream() -> Iterator[pb.UploadFeaturesRequest]:
        yield upload_request_to_proto(honest_summary)
        for index, chunk in enumerate(honest_chunks):
            if index:
                assert released.acquire(timeout=120), "the cases stalled"
            yield upload_request_to_proto(chunk)

    honest = TestClient(port, "h", tokens["h"])
    thread = threading.Thread(target=lambda: acknowledged.update(
        response=honest.stub.UploadFeatures(honest_stream(), metadata=honest.metadata,
                                            timeout=300)))
    thread.start()
    x = TestClient(port, "x", tokens["x"])
    y = TestClient(port, "y", tokens["y"])
    x_with_y_token = TestClient(port, "x", tokens["y"])
    no_token = TestClient(port, "x", tokens["x"])
    no_token.metadata = ()
    conn = channel(port)
    raw_upload = conn.stream_unary(UPLOAD)
    raw_join = conn.unary_unary(JOIN)

    def send(client: TestClient, *requests: pb.UploadFeaturesRequest) -> object:
        return client.stub.UploadFeatures(iter(requests), metadata=client.metadata, timeout=30)

    x_sum = upload_request_to_proto(x_summary)
    good = [upload_request_to_proto(c) for c in x_chunks]
    nan = data["x"][:20].copy()
    nan[3, 5] = np.nan
    inf = data["x"][:20].copy()
    inf[7, 1] = -np.inf
    big = forged_chunk(site_rows(1, MAX_CHUNK_BYTES // (4 * D) + 1))  # one row over
    bomb_size, bomb_payload = zstd_bomb(1 << 29)  # 512 MiB of zeros in a ~16 KiB frame
    bomb_rows = bomb_size // (4 * D)
    bomb = pb.UploadFeaturesRequest(chunk=pb.FeatureChunk(
        site_id="x", round=1, sequence=0, row_offset=0, features=pb.EncodedMatrix(
            rows=bomb_rows, cols=D, value_type=pb.VALUE_TYPE_FLOAT32, zstd_level=3,
            decoded_size=bomb_size, checksum_type=pb.CHECKSUM_TYPE_XXH64,
            checksum=checksum_of(bomb_rows, D, bomb_size, bomb_payload),
            payload=bomb_payload)))
    # A 20 x 32 matrix whose zstd frame claims 512 MiB of content: refused before inflating.
    lying = pb.UploadFeaturesRequest()
    lying.CopyFrom(good[0])
    lying.chunk.features.payload = bomb_payload
    lying.chunk.features.byte_shuffle = False
    lying.chunk.features.checksum = checksum_of(20, D, 20 * D * 4, bomb_payload)
    unknown_codec = pb.UploadFeaturesRequest()
    unknown_codec.CopyFrom(good[0])
    unknown_codec.chunk.features.value_type = 77  # type: ignore[assignment]
    unknown_checksum = pb.UploadFeaturesRequest()
    unknown_checksum.CopyFrom(good[0])
    unknown_checksum.chunk.features.checksum_type = 9  # type: ignore[assignment]
    replayed = forged_chunk(data["x"][:20] + 1.0)  # chunk 0 again, other rows
    absurd = pb.UploadFeaturesRequest()
    absurd.CopyFrom(good[1])
    absurd.chunk.features.rows = (1 << 64) - 1  # a "negative" row count on the wire (-1)
    zero_cols = pb.UploadFeaturesRequest()
    zero_cols.CopyFrom(good[1])
    zero_cols.chunk.features.cols = 0
    other_round = pb.UploadFeaturesRequest()
    other_round.CopyFrom(good[1])
    other_round.chunk.round = 7
    wrong_dim_summary = upload_request_to_proto(
        upload_messages("y", site_rows(9, 90, dim=16))[0]
    )
    empty_summary = pb.UploadFeaturesRequest()  # a round-1 upload of no rows
    empty_summary.CopyFrom(upload_request_to_proto(upload_messages("y", data["y"])[0]))
    empty_summary.summary.coreset_rows = 0
    too_many = pb.UploadFeaturesRequest()
    too_many.CopyFrom(upload_request_to_proto(upload_messages("y", data["y"])[0]))
    too_many.summary.coreset_rows = too_many.summary.num_patches = 5000
    y_first_chunk = upload_request_to_proto(
        upload_messages("y", data["y"], max_chunk_bytes=CHUNK_BYTES)[1][0]
    )
    wide_chunk = pb.UploadFeaturesRequest()
    wide_chunk.CopyFrom(forged_chunk(site_rows(3, 20, dim=D * 2), sequence=1, row_offset=20))

    cases = [
        Case("missing token", lambda: no_token.join(), grpc.StatusCode.UNAUTHENTICATED,
             r"missing 'authorization: Bearer <token>' metadata"),
        Case("wrong token", lambda: TestClient(port, "x", new_token()).join(),
             grpc.StatusCode.UNAUTHENTICATED, r"^unknown bearer token$"),
        Case("malformed authorization", lambda: TestClient(port, "x", "").stub.JoinRound(
            fpb.JoinRoundRequest(site_id="x"), metadata=(("authorization", "Basic abc"),),
            timeout=10), grpc.StatusCode.UNAUTHENTICATED, r"must be 'Bearer <token>'"),
        Case("another site's token (join)", lambda: x_with_y_token.join(),
             grpc.StatusCode.PERMISSION_DENIED, r"site 'y' cannot act as site 'x'"),
        Case("another site's token (upload)", lambda: send(x_with_y_token, x_sum),
             grpc.StatusCode.PERMISSION_DENIED, r"site 'y' cannot upload as site 'x'"),
        Case("malformed protobuf", lambda: raw_upload(
            iter([b"\x12\xff\xff\xff\xff\x0f garbage"]), metadata=x.metadata, timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"malformed fedpatchcore.v1.UploadFeaturesRequest message \(\d+ bytes\)"),
        Case("truncated message", lambda: raw_upload(
            iter([x_sum.SerializeToString(), good[0].SerializeToString()[:-9]]),
            metadata=x.metadata, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
            r"malformed fedpatchcore.v1.UploadFeaturesRequest message"),
        Case("malformed unary request", lambda: raw_join(b"\xff\xff", metadata=x.metadata,
                                                         timeout=10),
             grpc.StatusCode.INVALID_ARGUMENT, r"malformed fedpatchcore.v1.JoinRoundRequest"),
        Case("oversized metadata header", lambda: x.stub.JoinRound(
            fpb.JoinRoundRequest(site_id="x"),
            metadata=(*x.metadata, ("x-padding", "p" * 100_000)), timeout=10),
            grpc.StatusCode.RESOURCE_EXHAUSTED, r"metadata size exceeds"),
        Case("wrong dimension", lambda: send(y, wrong_dim_summary),
             grpc.StatusCode.INVALID_ARGUMENT, r"sends D=16, the federation uses D=32"),
        Case("empty upload", lambda: send(y, empty_summary), grpc.StatusCode.INVALID_ARGUMENT,
             r"SiteSummary.coreset_rows must be in \[1, \d+\], got 0"),
        Case("rows over the per-site limit", lambda: send(y, too_many),
             grpc.StatusCode.RESOURCE_EXHAUSTED,
             r"announces 5000 rows, more than max_rows_per_site=1000"),
        Case("chunk before its summary", lambda: send(y, y_first_chunk),
             grpc.StatusCode.FAILED_PRECONDITION, r"arrived before the site's summary"),
        Case("NaN values", lambda: send(x, x_sum, forged_chunk(nan)),
             grpc.StatusCode.INVALID_ARGUMENT, r"1 NaN/inf values"),
        Case("Inf values", lambda: send(x, forged_chunk(inf)),
             grpc.StatusCode.INVALID_ARGUMENT, r"1 NaN/inf values"),
        Case("chunk over the size limit", lambda: send(x, big),
             grpc.StatusCode.RESOURCE_EXHAUSTED,
             rf"decoded payload of \d+ bytes, more than this server's max_chunk_bytes="
             rf"{MAX_CHUNK_BYTES}"),
        Case("zstd bomb (declared)", lambda: send(x, bomb), grpc.StatusCode.RESOURCE_EXHAUSTED,
             r"decoded payload of 536870912 bytes"),
        Case("zstd bomb (frame lies)", lambda: send(x, lying), grpc.StatusCode.INVALID_ARGUMENT,
             r"frame declares 536870912 bytes, decoded_size says 2560"),
        Case("unknown codec", lambda: send(x, unknown_codec), grpc.StatusCode.INVALID_ARGUMENT,
             r"EncodedMatrix.value_type has unknown enum value 77"),
        Case("unknown checksum type", lambda: send(x, unknown_checksum),
             grpc.StatusCode.INVALID_ARGUMENT,
             r"EncodedMatrix.checksum_type has unknown enum value 9"),
        Case("absurd shape (rows = -1 as uint64)", lambda: send(x, good[0], absurd),
             grpc.StatusCode.INVALID_ARGUMENT,
             r"decoded_size must be \d+ bytes for a 18446744073709551615 x 32 fp32 matrix"),
        Case("zero columns", lambda: send(x, zero_cols), grpc.StatusCode.INVALID_ARGUMENT,
             r"cols must be >= 1"),
        Case("column count differs from the summary", lambda: send(x, wide_chunk),
             grpc.StatusCode.INVALID_ARGUMENT, r"has 64 columns, the stream has 32"),
        Case("replayed chunk with different content", lambda: send(x, replayed),
             grpc.StatusCode.INVALID_ARGUMENT, r"chunk 0 was resent with different content"),
        Case("sequence gap", lambda: send(x, good[1], good[3]), grpc.StatusCode.OUT_OF_RANGE,
             r"chunk 3 is beyond the committed position: chunks 0..1 are committed; resume "
             r"from chunk 2"),
        Case("resume offset beyond the committed position", lambda: send(x, *good[5:]),
             grpc.StatusCode.OUT_OF_RANGE, r"chunk 5 is beyond the committed position"),
        Case("chunk for an unknown round", lambda: send(x, other_round),
             grpc.StatusCode.FAILED_PRECONDITION,
             r"message for round 7, but round 1 is the current round"),
        Case("status of an unknown round", lambda: x.status(7), grpc.StatusCode.NOT_FOUND,
             r"round 7 does not exist"),
        Case("download before the bank exists", lambda: x.download(),
             grpc.StatusCode.FAILED_PRECONDITION, r"no bank is ready yet"),
        Case("download of an unknown version", lambda: x.download(version=3),
             grpc.StatusCode.FAILED_PRECONDITION, r"no bank is ready yet"),
    ]
    outcomes: dict[str, str] = {}
    try:
        for case in cases:
            outcomes[case.name] = _expect(case)
            assert _serving(port), f"server not serving after {case.name}"
            released.release()
        # A truncated stream (the client half-closes without its last chunk) is not an error:
        # what it carried is committed and the upload resumes later.
        progress = send(x, good[2]).upload  # type: ignore[attr-defined]
        assert (progress.committed_sequence, progress.complete) == (3, False)
        for _ in range(len(honest_chunks)):
            released.release()
        thread.join(timeout=120)
        assert not thread.is_alive()
    finally:
        for _ in range(len(honest_chunks)):
            released.release()
        thread.join(timeout=60)
    try:
        response = acknowledged["response"]
        assert response.upload.complete  # type: ignore[attr-defined]
        assert response.upload.committed_rows == 520  # type: ignore[attr-defined]
        assert response.chunks_accepted == len(honest_chunks)  # type: ignore[attr-defined]
        # The attackers finish their real uploads; the bank is what the honest data makes.
        send(x, *good[3:])
        y_summary, y_chunks = upload_messages("y", data["y"], max_chunk_bytes=CHUNK_BYTES)
        send(y, *(upload_request_to_proto(i) for i in (y_summary, *y_chunks)))
        assert server.federation.wait_for(1, {Phase.READY}, timeout=60).bank_rows == 50
        bank = honest.download().bank
    finally:
        for client in (honest, x, y, x_with_y_token, no_token):
            client.close()
        conn.close()
        server.stop(0)
    np.testing.assert_array_equal(bank, reference_bank(data, max_chunk_bytes=CHUNK_BYTES))
    assert len(outcomes) == len(cases) >= 15
    print(f"\nbad input: {len(cases)} cases, each refused with its code and message while an "
          "honest site uploaded; server up after each")


def test_closed_round_and_revoked_token(tmp_path: Path) -> None:
    """A chunk for a round that is over, and a token removed from the tokens file (tokens do
    not expire by time: rotation is re-issuing the file and restarting)."""
    config, tokens = make_config(tmp_path, ("a",), feature_dim=D)
    server, port = create_server(config)
    server.start()
    summary, chunks = upload_messages("a", site_rows(0, 60), max_chunk_bytes=CHUNK_BYTES)
    client = TestClient(port, "a", tokens["a"])
    try:
        client.upload([summary, *chunks])
        assert server.federation.wait_for(1, {Phase.READY}, timeout=60).phase is Phase.READY
        # A retry of what the round committed is idempotent, also after the round closed...
        assert client.upload([chunks[-1]]).chunks_ignored == 1
        # ... but anything new for a closed round is refused.
        other = upload_messages("a", site_rows(1, 60), max_chunk_bytes=CHUNK_BYTES)[1]
        with pytest.raises(grpc.RpcError) as error:
            client.upload([other[0]])
        assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "round 1 is ready: uploads are closed" in (error.value.details() or "")
        assert client.download().bank.shape == (50, D)
    finally:
        client.close()
        server.stop(0)
    write_tokens_file(config.tokens_file, {"a": new_token()})  # rotate: the old one is revoked
    server, port = create_server(config)
    server.start()
    client = TestClient(port, "a", tokens["a"])
    try:
        with pytest.raises(grpc.RpcError) as error:
            client.download()
        assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert error.value.details() == "unknown bearer token"
    finally:
        client.close()
        server.stop(0)
