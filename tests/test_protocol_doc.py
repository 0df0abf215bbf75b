"""docs/protocol.md is the protocol: a site written from it alone works, and its statements match
the code (rpcs, status codes, header fields, token format, fingerprint recipe, byte layout)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import xxhash
import zstandard
from fedserver_testing import channel, make_config
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedpatchcore.v1 import federation_pb2_grpc as fgrpc

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def test_the_page_names_every_rpc_code_and_header_field() -> None:
    from fedserver.access import RETRY_METADATA
    from fedserver.servicer import STATUS_BY_ERROR

    service = fpb.DESCRIPTOR.services_by_name["FederationService"]
    for method in service.methods:
        assert f"### {method.name} (" in DOC, method.name
    for _, code in STATUS_BY_ERROR:
        assert f"| {code.name} |" in DOC, code.name
    for field in fpb.BankHeader.DESCRIPTOR.fields:
        assert f"`{field.name}`" in DOC, field.name
    assert f"`{RETRY_METADATA[0]}: {RETRY_METADATA[1]}`" in DOC
    for state in fpb.RoundState.keys()[1:]:
        assert state.removeprefix("ROUND_STATE_") in DOC, state


def test_token_format_is_as_documented() -> None:
    from fedserver.auth import TokenStore, hash_token, new_token

    token = new_token()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert "43 characters" in DOC
    store = TokenStore([("site-a", hash_token(token))])
    for value in (f"Bearer {token}", f"bearer {token}", f"BEARER  {token} "):
        assert store.site_of([("authorization", value)]) == "site-a"


def test_fingerprint_recipe_and_example() -> None:
    """The JSON line and digest printed on the page are what FeatureConfig computes."""
    from core.features import FeatureConfig

    line = next(x.strip() for x in DOC.splitlines() if x.strip().startswith('{"backbone"'))
    digest = re.search(r"which is `([0-9a-f]{64})`", DOC)
    assert digest is not None
    config = FeatureConfig("wide_resnet50_2")
    assert json.dumps({**config.to_dict(), "weights": "timm-pretrained:wide_resnet50_2"},
                      sort_keys=True) == line
    assert hashlib.sha256(line.encode()).hexdigest() == digest.group(1) == config.fingerprint()


# -- the byte layout, implemented from the page alone (no core.codec) ----------------------------

VALUE_CODES = {"fp32": 1, "int8": 4}


def _checksum(rows: int, cols: int, value_type: int, shuffle: bool, decoded_size: int,
              scale: bytes, offset: bytes, payload: bytes) -> int:
    header = struct.pack("<QIBBQ", rows, cols, value_type, int(shuffle), decoded_size)
    assert len(header) == 22
    return xxhash.xxh64_intdigest(header + scale + offset + payload)


def _encode_fp32(matrix: np.ndarray) -> pb.EncodedMatrix:
    rows, cols = matrix.shape
    raw = matrix.astype("<f4").tobytes()  # row-major, little-endian
    payload = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)
    return pb.EncodedMatrix(
        rows=rows, cols=cols, value_type=pb.VALUE_TYPE_FLOAT32, byte_shuffle=False,
        zstd_level=3, decoded_size=len(raw), checksum_type=pb.CHECKSUM_TYPE_XXH64,
        checksum=_checksum(rows, cols, 1, False, len(raw), b"", b"", payload), payload=payload,
    )


def _decode(message: pb.EncodedMatrix) -> np.ndarray:
    """FLOAT32 and INT8 as the page describes them (the reference dequantisation)."""
    assert message.checksum == _checksum(
        message.rows, message.cols, message.value_type, message.byte_shuffle,
        message.decoded_size, message.quant_scale, message.quant_offset, message.payload)
    raw = zstandard.ZstdDecompressor().decompress(message.payload)
    assert len(raw) == message.decoded_size
    rows, cols = message.rows, message.cols
    if message.value_type == pb.VALUE_TYPE_FLOAT32:
        if message.byte_shuffle:  # [itemsize, n] planes back to [n, itemsize]
            raw = np.frombuffer(raw, np.uint8).reshape(4, -1).T.tobytes()
        return np.frombuffer(raw, "<f4").reshape(rows, cols).astype(np.float32)
    assert message.value_type == pb.VALUE_TYPE_INT8
    codes = np.frombuffer(raw, np.uint8).reshape(cols, rows).T  # column-major
    scale = np.frombuffer(message.quant_scale, "<f4").astype(np.float64)
    offset = np.frombuffer(message.quant_offset, "<f4").astype(np.float64)
    limit = float(np.finfo(np.float32).max)
    return np.clip(offset + codes * scale, -limit, limit).astype(np.float32)


@pytest.mark.parametrize("codec", ["lossless", "int8"])
def test_the_reference_encoder_matches_the_documented_layout(codec: str) -> None:
    """Chunks made by core.codec decode bit for bit with the page's rules."""
    from core.codec import CODEC_PRESETS, decode_matrix, encode_matrix
    from core.serde import encoded_matrix_to_proto

    rng = np.random.default_rng(0)
    matrix = rng.normal(3.0, 2.0, size=(37, 11)).astype(np.float32)
    encoded = encode_matrix(matrix, CODEC_PRESETS[codec])
    ours = _decode(encoded_matrix_to_proto(encoded))
    reference = decode_matrix(encoded, max_decoded_bytes=1 << 20)
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))


def test_a_site_written_from_the_page_takes_part_in_a_federation(tmp_path: Path) -> None:
    """The page's test federation: a pinned fingerprint the site sends, no Python extractor,
    FLOAT32 chunks and the bank checksum computed by hand, over the generated stubs only."""
    fingerprint = hashlib.sha256(b"my-extractor-v1").hexdigest()
    config, tokens = make_config(tmp_path, ["site-a"], feature_fingerprint=fingerprint,
                                 feature_dim=16, codec="lossless", global_bank_size=20)
    from fedserver.daemon import create_server

    server, port = create_server(config)
    server.start()
    rows = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32)
    metadata = (("authorization", f"Bearer {tokens['site-a']}"),)
    try:
        with channel(port) as conn:
            health = health_pb2_grpc.HealthStub(conn)
            for name in ("", "fedpatchcore.v1.FederationService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = fgrpc.FederationServiceStub(conn)
            joined = stub.JoinRound(fpb.JoinRoundRequest(site_id="site-a"), metadata=metadata,
                                    timeout=10)
            assert joined.config.feature_fingerprint == fingerprint
            assert not joined.config.HasField("extractor")
            summary = pb.SiteSummary(
                site_id="site-a", round=1, num_images=5, num_patches=500, coreset_rows=50,
                coverage_radius=0.5, feature_dim=16, backbone="custom", layers=["all"],
                codec=pb.CodecConfig(value_type=pb.VALUE_TYPE_FLOAT32, zstd_level=3,
                                     checksum_type=pb.CHECKSUM_TYPE_XXH64),
                feature_fingerprint=fingerprint,
            )
            chunks = [pb.FeatureChunk(site_id="site-a", round=1, sequence=i, row_offset=lo,
                                      last=lo + 25 >= 50, features=_encode_fp32(rows[lo:lo + 25]))
                      for i, lo in enumerate((0, 25))]
            requests = [pb.UploadFeaturesRequest(summary=summary),
                        *(pb.UploadFeaturesRequest(chunk=c) for c in chunks)]
            reply = stub.UploadFeatures(iter(requests), metadata=metadata, timeout=30)
            assert reply.upload.complete and reply.upload.committed_rows == 50
            done = list(stub.WatchRound(fpb.WatchRoundRequest(site_id="site-a", round=1),
                                        metadata=metadata, timeout=60))
            assert done[-1].state == fpb.ROUND_STATE_READY
            responses = list(stub.DownloadBank(fpb.DownloadBankRequest(site_id="site-a"),
                                               metadata=metadata, timeout=30))
    finally:
        server.stop(0)
    header = responses[0].header
    assert header.base_version == 0 and header.federation_id == joined.config.federation_id
    bank = np.concatenate([_decode(r.chunk.features) for r in responses[1:]])
    assert bank.shape == (header.total_rows, 16) == (20, 16)
    assert xxhash.xxh64_intdigest(bank.astype("<f4").tobytes()) == header.bank_checksum
    # Every bank row is one of the uploaded rows (lossless), and r_S covers every upload.
    assert all(any(np.array_equal(b, r) for r in rows) for b in bank)
    distances = np.sqrt(((rows[:, None, :] - bank[None]) ** 2).sum(-1)).min(1)
    assert distances.max() <= header.server_coverage_radius + 1e-6


def test_the_proto_points_to_the_page() -> None:
    text = (ROOT / "protos/fedpatchcore/v1/federation.proto").read_text()
    proto = " ".join(text.replace("//", " ").split())  # comments as running text
    assert "docs/protocol.md" in proto
    for statement in ("ROUND_STATE_SELECTING in particular can be skipped",
                      "`fedpatchcore-retry: concurrency`", "43 characters",
                      "\"fedpatchcore.v1.FederationService\""):
        assert statement in proto, statement
