"""Tests for core.serde and core.messages: proto <-> domain pairs, chunking and reassembly."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.ndimage import uniform_filter

from core.codec import (
    CHECKSUM_WIRE_CODES,
    CODEC_PRESETS,
    DEFAULT_CODEC,
    VALUE_TYPE_WIRE_CODES,
    ChecksumMismatchError,
    CodecConfig,
    EncodedMatrix,
    InvalidCodecConfigError,
    MalformedPayloadError,
    NonFiniteValuesError,
    ValueOutOfRangeError,
    decode_matrix,
    encode_matrix,
)
from core.messages import (
    MAX_SITE_ID_BYTES,
    BankChunk,
    FeatureChunk,
    InvalidMessageError,
    SiteSummary,
)
from core.serde import (
    DEFAULT_MAX_CHUNK_BYTES,
    MAX_CHUNK_BYTES_LIMIT,
    ChunkAssembler,
    ChunkConflictError,
    ChunkOrderError,
    IncompleteUploadError,
    UploadTooLargeError,
    assemble_chunks,
    bank_chunk_from_proto,
    bank_chunk_to_proto,
    codec_config_from_proto,
    codec_config_to_proto,
    encoded_matrix_from_proto,
    encoded_matrix_to_proto,
    feature_chunk_from_proto,
    feature_chunk_to_proto,
    site_summary_from_proto,
    site_summary_to_proto,
    split_bank_into_chunks,
    split_into_chunks,
)
from fedpatchcore.v1 import features_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
GRPC_DEFAULT_MAX_MESSAGE = 4 << 20
BYTES_PER_VALUE = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}

# --- strategies --------------------------------------------------------------------------------

site_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40
).filter(lambda s: bool(s.strip()))
uint32s = st.integers(0, 2**32 - 1)
rounds = st.integers(1, 2**32 - 1)  # rounds count from 1
fingerprints = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
uint64s = st.integers(0, 2**63)
radii = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def codec_configs(draw: st.DrawFn) -> CodecConfig:
    value_type = draw(st.sampled_from(sorted(VALUE_TYPE_WIRE_CODES)))
    multi_byte = value_type in ("fp32", "fp16", "bf16")
    return CodecConfig(
        value_type=value_type,
        byte_shuffle=draw(st.booleans()) if multi_byte else False,
        zstd_level=draw(st.integers(1, 22)),
    )


@st.composite
def encoded_matrices(draw: st.DrawFn) -> EncodedMatrix:
    shape = draw(st.tuples(st.integers(0, 12), st.integers(1, 12)))
    x = draw(
        hnp.arrays(
            np.float32,
            shape,
            elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False),
        )
    )
    config = draw(codec_configs())
    return encode_matrix(x, dataclasses.replace(config, zstd_level=min(config.zstd_level, 3)))


feature_chunks = st.builds(
    FeatureChunk,
    site_id=site_ids,
    round=rounds,
    sequence=uint64s,
    row_offset=uint64s,
    last=st.booleans(),
    features=encoded_matrices(),
)
bank_chunks = st.builds(
    BankChunk,
    round=rounds,
    sequence=uint64s,
    row_offset=uint64s,
    last=st.booleans(),
    features=encoded_matrices(),
    server_coverage_radius=radii,
    max_site_coverage_radius=radii,
)


@st.composite
def site_summaries(draw: st.DrawFn) -> SiteSummary:
    coreset_rows = draw(st.integers(1, 2**40))
    return SiteSummary(
        site_id=draw(site_ids),
        round=draw(rounds),
        num_images=draw(st.integers(1, 2**40)),
        num_patches=draw(st.integers(coreset_rows, 2**50)),
        coreset_rows=coreset_rows,
        coverage_radius=draw(radii),
        feature_dim=draw(st.integers(1, 2**32 - 1)),
        backbone=draw(site_ids),
        layers=tuple(draw(st.lists(site_ids, min_size=1, max_size=4))),
        codec=draw(codec_configs()),
        feature_fingerprint=draw(fingerprints),
    )


def dense_features(rows: int, cols: int, seed: int) -> np.ndarray:
    """ReLU'd then 3x3 average-pooled Gaussian feature maps, flattened to [rows, cols] float32.

    Mimics PatchCore's locally aggregated features (AvgPool2d(3, 1, 1), zero padding counted).
    """
    side = 32
    images = -(-rows // (side * side))
    maps = np.random.default_rng(seed).standard_normal((images, side, side, cols), np.float32)
    pooled = uniform_filter(np.maximum(maps, 0), size=(1, 3, 3, 1), mode="constant")
    return np.ascontiguousarray(pooled.reshape(-1, cols)[:rows], dtype=np.float32)


def wire_roundtrip(message: object) -> object:
    """Serialize and parse again, as a transport would."""
    return type(message).FromString(message.SerializeToString())  # type: ignore[attr-defined]


# --- the wire enums agree with the codec ------------------------------------------------------


def test_codec_wire_codes_equal_the_proto_enums() -> None:
    proto_names = {
        "fp32": "FLOAT32",
        "fp16": "FLOAT16",
        "bf16": "BFLOAT16",
        "int8": "INT8",
        "int4": "INT4",
    }
    assert set(proto_names) == set(VALUE_TYPE_WIRE_CODES)
    for name, code in VALUE_TYPE_WIRE_CODES.items():
        assert pb.ValueType.Value(f"VALUE_TYPE_{proto_names[name]}") == code
    assert {v for v in pb.ValueType.values() if v} == set(VALUE_TYPE_WIRE_CODES.values())
    assert CHECKSUM_WIRE_CODES == {"xxh64": pb.CHECKSUM_TYPE_XXH64}
    assert {v for v in pb.ChecksumType.values() if v} == set(CHECKSUM_WIRE_CODES.values())


# --- round-trips of every pair -----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(matrix=encoded_matrices())
def test_encoded_matrix_roundtrip(matrix: EncodedMatrix) -> None:
    message = wire_roundtrip(encoded_matrix_to_proto(matrix))
    back = encoded_matrix_from_proto(message)  # type: ignore[arg-type]
    assert back == matrix
    decoded = decode_matrix(back, max_decoded_bytes=back.decoded_size)
    np.testing.assert_array_equal(decoded, decode_matrix(matrix, max_decoded_bytes=1 << 20))


@settings(max_examples=40, deadline=None)
@given(config=codec_configs())
def test_codec_config_roundtrip(config: CodecConfig) -> None:
    assert codec_config_from_proto(wire_roundtrip(codec_config_to_proto(config))) == config  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(chunk=feature_chunks)
def test_feature_chunk_roundtrip(chunk: FeatureChunk) -> None:
    message = wire_roundtrip(feature_chunk_to_proto(chunk))
    assert feature_chunk_from_proto(message) == chunk  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(summary=site_summaries())
def test_site_summary_roundtrip(summary: SiteSummary) -> None:
    message = wire_roundtrip(site_summary_to_proto(summary))
    assert site_summary_from_proto(message) == summary  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(chunk=bank_chunks)
def test_bank_chunk_roundtrip(chunk: BankChunk) -> None:
    message = wire_roundtrip(bank_chunk_to_proto(chunk))
    back = bank_chunk_from_proto(message)  # type: ignore[arg-type]
    assert back == chunk
    assert back.certificate_radius == chunk.server_coverage_radius + chunk.max_site_coverage_radius


def test_site_summary_layers_are_stored_as_a_tuple() -> None:
    summary = SiteSummary(
        site_id="a",
        round=1,
        num_images=1,
        num_patches=10,
        coreset_rows=2,
        coverage_radius=0.5,
        feature_dim=8,
        backbone="wide_resnet50_2",
        layers=["layer2", "layer3"],  # type: ignore[arg-type]
        codec=DEFAULT_CODEC,
        feature_fingerprint="ab" * 32,
    )
    assert summary.layers == ("layer2", "layer3")
    hash(summary)


# --- _from_proto validation --------------------------------------------------------------------


def _encoded_proto() -> pb.EncodedMatrix:
    x = np.ones((2, 3), dtype=np.float32)
    return encoded_matrix_to_proto(encode_matrix(x, DEFAULT_CODEC))


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("value_type", 0, "value_type is UNSPECIFIED"),
        ("value_type", 9, "value_type has unknown enum value 9"),
        ("checksum_type", 0, "checksum_type is UNSPECIFIED"),
        ("checksum_type", 2, "checksum_type has unknown enum value 2"),
        ("cols", 0, "cols must be >= 1"),
        ("decoded_size", 5, "decoded_size must be 12 bytes"),
        ("quant_scale", b"\x00" * 12, "quant_scale must hold 0 bytes"),
    ],
)
def test_encoded_matrix_from_proto_rejects(field: str, value: object, fragment: str) -> None:
    message = _encoded_proto()
    setattr(message, field, value)
    with pytest.raises(MalformedPayloadError, match=fragment):
        encoded_matrix_from_proto(message)


@pytest.mark.parametrize(
    ("field", "value", "error", "fragment"),
    [
        ("value_type", 0, InvalidCodecConfigError, "value_type is UNSPECIFIED"),
        ("value_type", 77, InvalidCodecConfigError, "unknown enum value 77"),
        ("checksum_type", 0, InvalidCodecConfigError, "checksum_type is UNSPECIFIED"),
        ("zstd_level", 0, InvalidCodecConfigError, "zstd_level"),
        ("byte_shuffle", True, InvalidCodecConfigError, "byte_shuffle"),  # with int8 below
    ],
)
def test_codec_config_from_proto_rejects(
    field: str, value: object, error: type[Exception], fragment: str
) -> None:
    message = codec_config_to_proto(CODEC_PRESETS["int8"])
    setattr(message, field, value)
    with pytest.raises(error, match=fragment):
        codec_config_from_proto(message)


def _chunk_proto() -> pb.FeatureChunk:
    return pb.FeatureChunk(
        site_id="site-a", round=3, sequence=0, row_offset=0, last=True, features=_encoded_proto()
    )


def _summary_proto() -> pb.SiteSummary:
    return pb.SiteSummary(
        site_id="site-a",
        round=1,
        num_images=10,
        num_patches=7840,
        coreset_rows=784,
        coverage_radius=2.5,
        feature_dim=3,
        backbone="wide_resnet50_2",
        layers=["layer2", "layer3"],
        codec=codec_config_to_proto(DEFAULT_CODEC),
        feature_fingerprint="0f" * 32,
    )


def _bank_proto() -> pb.BankChunk:
    return pb.BankChunk(
        round=3,
        sequence=0,
        row_offset=0,
        last=True,
        features=_encoded_proto(),
        server_coverage_radius=1.0,
        max_site_coverage_radius=2.0,
    )


def _clear(field: str) -> Callable[[object], None]:
    return lambda message: message.ClearField(field)  # type: ignore[attr-defined]


def _set(field: str, value: object) -> Callable[[object], None]:
    return lambda message: setattr(message, field, value)


def _extend_layers(values: list[str]) -> Callable[[object], None]:
    def apply(message: object) -> None:
        del message.layers[:]  # type: ignore[attr-defined]
        message.layers.extend(values)  # type: ignore[attr-defined]

    return apply


@pytest.mark.parametrize(
    ("make", "parse", "mutate", "fragment"),
    [
        (_chunk_proto, feature_chunk_from_proto, _set("site_id", ""), "site_id"),
        (_chunk_proto, feature_chunk_from_proto, _set("site_id", "  "), "site_id"),
        (_chunk_proto, feature_chunk_from_proto, _set("site_id", "é" * 129), "256 bytes"),
        (_chunk_proto, feature_chunk_from_proto, _clear("features"), "features is required"),
        (_summary_proto, site_summary_from_proto, _set("site_id", ""), "site_id"),
        (_summary_proto, site_summary_from_proto, _clear("codec"), "codec is required"),
        (_summary_proto, site_summary_from_proto, _set("num_images", 0), "num_images"),
        (_summary_proto, site_summary_from_proto, _set("coreset_rows", 0), "coreset_rows"),
        (_summary_proto, site_summary_from_proto, _set("num_patches", 783), "num_patches"),
        (
            _summary_proto,
            site_summary_from_proto,
            _set("coverage_radius", float("nan")),
            "coverage_radius",
        ),
        (_summary_proto, site_summary_from_proto, _set("coverage_radius", -1.0), "coverage_radius"),
        (
            _summary_proto,
            site_summary_from_proto,
            _set("coverage_radius", float("inf")),
            "coverage_radius",
        ),
        (_summary_proto, site_summary_from_proto, _set("feature_dim", 0), "feature_dim"),
        (_summary_proto, site_summary_from_proto, _set("backbone", ""), "backbone"),
        (_summary_proto, site_summary_from_proto, _extend_layers([]), "at least one layer"),
        (_summary_proto, site_summary_from_proto, _extend_layers(["layer2", ""]), r"layers\[1\]"),
        (_bank_proto, bank_chunk_from_proto, _clear("features"), "features is required"),
        (
            _bank_proto,
            bank_chunk_from_proto,
            _set("server_coverage_radius", float("nan")),
            "server_coverage_radius",
        ),
        (
            _bank_proto,
            bank_chunk_from_proto,
            _set("max_site_coverage_radius", -0.5),
            "max_site_coverage_radius",
        ),
    ],
)
def test_from_proto_rejects_invalid_messages(
    make: Callable[[], object],
    parse: Callable[[object], object],
    mutate: Callable[[object], None],
    fragment: str,
) -> None:
    message = make()
    parse(message)  # valid before the mutation
    mutate(message)
    with pytest.raises(InvalidMessageError, match=fragment):
        parse(message)


def test_from_proto_rejects_the_wrong_message_type() -> None:
    with pytest.raises(TypeError, match="FeatureChunk"):
        feature_chunk_from_proto(_bank_proto())  # type: ignore[arg-type]


def test_site_id_limit_is_in_bytes() -> None:
    assert MAX_SITE_ID_BYTES == 256
    message = _chunk_proto()
    message.site_id = "é" * 128  # 256 bytes of UTF-8
    assert feature_chunk_from_proto(message).site_id == "é" * 128


# --- chunking ----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 70), st.integers(1, 40)),
    config=codec_configs(),
    max_chunk_bytes=st.integers(160, 4000),
    resend=st.lists(st.integers(0, 100), max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_then_assemble_roundtrips(
    shape: tuple[int, int],
    config: CodecConfig,
    max_chunk_bytes: int,
    resend: list[int],
    seed: int,
) -> None:
    rows, cols = shape
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    config = dataclasses.replace(config, zstd_level=1)
    chunks = list(
        split_into_chunks(x, config=config, site_id="s", round=7, max_chunk_bytes=max_chunk_bytes)
    )
    # Independent expectation of the sizing: as many rows as fit the decoded payload bound.
    step = int(max_chunk_bytes // (cols * BYTES_PER_VALUE[config.value_type]))
    expected_counts = [min(step, rows - start) for start in range(0, rows, step)] or [0]
    assert [c.features.rows for c in chunks] == expected_counts
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert [c.row_offset for c in chunks] == [sum(expected_counts[:i]) for i in range(len(chunks))]
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.features.decoded_size <= max_chunk_bytes for c in chunks)

    # Transport through serialized messages, with some chunks resent right after themselves.
    stream = []
    for chunk in chunks:
        stream.append(feature_chunk_from_proto(wire_roundtrip(feature_chunk_to_proto(chunk))))  # type: ignore[arg-type]
        if chunk.sequence in resend:
            stream.append(chunk)
    assembled = assemble_chunks(stream, max_rows=rows, expected_cols=cols)
    expected = np.concatenate(
        [
            decode_matrix(encode_matrix(x[i : i + step], config), max_decoded_bytes=1 << 20)
            for i in range(0, rows, step)
        ]
        or [np.empty((0, cols), np.float32)]
    )
    np.testing.assert_array_equal(assembled, expected)
    if config.value_type == "fp32":
        np.testing.assert_array_equal(assembled, x)


def test_bank_split_roundtrips_and_carries_radii() -> None:
    x = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    chunks = list(
        split_bank_into_chunks(
            x,
            config=CODEC_PRESETS["lossless"],
            round=2,
            server_coverage_radius=1.5,
            max_site_coverage_radius=2.25,
            max_chunk_bytes=64 * 4 * 100,
        )
    )
    assert [c.features.rows for c in chunks] == [100, 100, 100]
    assert all(c.certificate_radius == 3.75 for c in chunks)
    assembler = ChunkAssembler(max_rows=300)
    for chunk in chunks:
        assert assembler.add(bank_chunk_from_proto(wire_roundtrip(bank_chunk_to_proto(chunk))))  # type: ignore[arg-type]
    np.testing.assert_array_equal(assembler.result(), x)
    assert assembler.first_chunk is not None
    assert assembler.first_chunk.certificate_radius == 3.75  # type: ignore[union-attr]


def test_split_validates_everything_before_the_first_chunk() -> None:
    x = np.zeros((5000, 16), dtype=np.float32)
    x[-1, 3] = np.nan  # in the last chunk
    with pytest.raises(NonFiniteValuesError):
        split_into_chunks(x, config=DEFAULT_CODEC, site_id="s", round=1, max_chunk_bytes=1024)
    x[-1, 3] = 1e6  # does not fit fp16
    with pytest.raises(ValueOutOfRangeError):
        split_into_chunks(x, config=DEFAULT_CODEC, site_id="s", round=1, max_chunk_bytes=1024)
    x[-1, 3] = 0.0
    with pytest.raises(InvalidMessageError, match="site_id"):
        split_into_chunks(x, config=DEFAULT_CODEC, site_id="", round=1)
    with pytest.raises(InvalidMessageError, match="round"):
        split_into_chunks(x, config=DEFAULT_CODEC, site_id="s", round=0)
    with pytest.raises(InvalidMessageError, match="server_coverage_radius"):
        split_bank_into_chunks(
            x,
            config=DEFAULT_CODEC,
            round=1,
            server_coverage_radius=float("nan"),
            max_site_coverage_radius=0.0,
        )


@pytest.mark.parametrize("max_chunk_bytes", [0, -1, MAX_CHUNK_BYTES_LIMIT + 1, True, 1.5])
def test_split_rejects_bad_chunk_sizes(max_chunk_bytes: object) -> None:
    x = np.zeros((4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        split_into_chunks(
            x,
            config=DEFAULT_CODEC,
            site_id="s",
            round=1,
            max_chunk_bytes=max_chunk_bytes,  # type: ignore[arg-type]
        )


def test_split_rejects_a_row_larger_than_a_chunk() -> None:
    x = np.zeros((4, 1024), dtype=np.float32)
    with pytest.raises(ValueError, match="one row of 1024 fp16 values needs 2048 bytes"):
        split_into_chunks(x, config=DEFAULT_CODEC, site_id="s", round=1, max_chunk_bytes=2047)


def test_empty_upload_is_one_last_chunk() -> None:
    chunks = list(
        split_into_chunks(np.empty((0, 8), np.float32), config=DEFAULT_CODEC, site_id="s", round=1)
    )
    assert len(chunks) == 1 and chunks[0].last and chunks[0].features.rows == 0
    assert assemble_chunks(chunks, max_rows=0).shape == (0, 8)


def test_serialized_chunks_stay_under_grpc_default_limit() -> None:
    # Worst case: incompressible values at the largest chunk size. Random bits with the top
    # exponent bit cleared are finite floats (|x| < 2, subnormals included) of ~31 random bits.
    rng = np.random.default_rng(1)
    rows = 2 * (MAX_CHUNK_BYTES_LIMIT // 4096)
    bits = rng.integers(0, 2**32, size=(rows, 1024), dtype=np.uint32) & np.uint32(0xBFFFFFFF)
    x = bits.view(np.float32)
    unshuffled = CodecConfig(value_type="fp32", byte_shuffle=False)
    for config in (unshuffled, CODEC_PRESETS["lossless"], CODEC_PRESETS["int8"]):
        sizes = [
            len(feature_chunk_to_proto(chunk).SerializeToString())
            for chunk in split_into_chunks(
                x,
                config=config,
                site_id="s" * MAX_SITE_ID_BYTES,
                round=2**32 - 1,
                max_chunk_bytes=MAX_CHUNK_BYTES_LIMIT,
            )
        ]
        assert max(sizes) < MAX_CHUNK_BYTES_LIMIT + 8 * 1024 + 400 < GRPC_DEFAULT_MAX_MESSAGE
        if config == unshuffled:
            assert max(sizes) > 0.97 * MAX_CHUNK_BYTES_LIMIT  # the data really is incompressible


def test_compression_ratios_on_dense_features() -> None:
    """Serialized bytes / raw fp32 bytes per preset; bounds ~5-10 % above the measured values."""
    x = dense_features(4096, 1024, seed=0)
    limits = {"lossless": 0.84, "fp16": 0.40, "bf16": 0.33, "int8": 0.25, "int4": 0.12}
    ratios = {}
    for name, config in CODEC_PRESETS.items():
        chunks = split_into_chunks(x, config=config, site_id="site-a", round=1)
        wire = sum(len(feature_chunk_to_proto(c).SerializeToString()) for c in chunks)
        ratios[name] = wire / x.nbytes
    assert set(ratios) == set(limits)
    for name, limit in limits.items():
        assert ratios[name] <= limit, (name, ratios)
    # Smaller value types really are smaller.
    assert ratios["int4"] < ratios["int8"] < ratios["bf16"] < ratios["fp16"] < ratios["lossless"]


def test_default_chunks_are_about_one_mib() -> None:
    x = dense_features(2048, 1024, seed=1)
    chunks = list(split_into_chunks(x, config=DEFAULT_CODEC, site_id="s", round=1))
    assert DEFAULT_MAX_CHUNK_BYTES == 1 << 20
    assert [c.features.rows for c in chunks] == [512] * 4  # 512 rows x 1024 x 2 bytes = 1 MiB


# --- reassembly errors -------------------------------------------------------------------------


@pytest.fixture
def upload() -> tuple[np.ndarray, list[FeatureChunk]]:
    x = np.random.default_rng(2).standard_normal((40, 8)).astype(np.float32)
    chunks = list(
        split_into_chunks(
            x, config=CODEC_PRESETS["lossless"], site_id="site-a", round=1, max_chunk_bytes=320
        )
    )
    assert len(chunks) == 4  # 10 rows each
    return x, chunks


def test_identical_resend_is_ignored(upload: tuple[np.ndarray, list[FeatureChunk]]) -> None:
    x, chunks = upload
    assembler = ChunkAssembler(max_rows=40)
    assert assembler.add(chunks[0]) is True
    assert assembler.add(chunks[1]) is True
    assert assembler.add(chunks[0]) is False
    assert assembler.add(chunks[1]) is False
    assert (assembler.next_sequence, assembler.rows_received) == (2, 20)
    for chunk in chunks[2:]:
        assembler.add(chunk)
    assert assembler.add(chunks[3]) is False  # a resend after completion is still recognised
    np.testing.assert_array_equal(assembler.result(), x)


def test_conflicting_resend_is_rejected(upload: tuple[np.ndarray, list[FeatureChunk]]) -> None:
    _, chunks = upload
    assembler = ChunkAssembler(max_rows=40)
    assembler.add(chunks[0])
    other = encode_matrix(np.zeros((10, 8), np.float32), CODEC_PRESETS["lossless"])
    with pytest.raises(ChunkConflictError, match="chunk 0 was resent with different content"):
        assembler.add(dataclasses.replace(chunks[0], features=other))
    with pytest.raises(ChunkConflictError, match="resent"):
        assembler.add(dataclasses.replace(chunks[0], last=True))


def test_gap_is_rejected(upload: tuple[np.ndarray, list[FeatureChunk]]) -> None:
    _, chunks = upload
    assembler = ChunkAssembler(max_rows=40)
    assembler.add(chunks[0])
    with pytest.raises(ChunkOrderError, match="expected chunk 1, got chunk 2"):
        assembler.add(chunks[2])


def test_discontinuous_row_offset_is_rejected(
    upload: tuple[np.ndarray, list[FeatureChunk]],
) -> None:
    _, chunks = upload
    assembler = ChunkAssembler(max_rows=40)
    assembler.add(chunks[0])
    with pytest.raises(ChunkOrderError, match="row_offset 11, expected 10"):
        assembler.add(dataclasses.replace(chunks[1], row_offset=11))


def test_chunk_after_last_is_rejected(upload: tuple[np.ndarray, list[FeatureChunk]]) -> None:
    _, chunks = upload
    assembler = ChunkAssembler(max_rows=100)
    assembler.add(dataclasses.replace(chunks[0], last=True))
    with pytest.raises(ChunkOrderError, match="after the last chunk"):
        assembler.add(chunks[1])


def test_missing_last_is_incomplete(upload: tuple[np.ndarray, list[FeatureChunk]]) -> None:
    _, chunks = upload
    with pytest.raises(IncompleteUploadError, match="3 chunk"):
        assemble_chunks(chunks[:3], max_rows=40)


def test_too_many_rows_are_rejected(upload: tuple[np.ndarray, list[FeatureChunk]]) -> None:
    _, chunks = upload
    with pytest.raises(UploadTooLargeError, match="40 rows, more than max_rows=39"):
        assemble_chunks(chunks, max_rows=39)


def test_other_streams_are_rejected(upload: tuple[np.ndarray, list[FeatureChunk]]) -> None:
    _, chunks = upload
    assembler = ChunkAssembler(max_rows=40)
    assembler.add(chunks[0])
    with pytest.raises(ChunkConflictError, match="another stream"):
        assembler.add(dataclasses.replace(chunks[1], site_id="site-b"))
    with pytest.raises(ChunkConflictError, match="another stream"):
        assembler.add(dataclasses.replace(chunks[1], round=2))
    bank = BankChunk(1, 1, 10, False, chunks[1].features, 0.0, 0.0)
    with pytest.raises(ChunkConflictError, match="BankChunk in a stream of FeatureChunks"):
        assembler.add(bank)


def test_bank_radii_must_agree_across_chunks() -> None:
    x = np.ones((20, 4), dtype=np.float32)
    chunks = list(
        split_bank_into_chunks(
            x,
            config=DEFAULT_CODEC,
            round=1,
            server_coverage_radius=1.0,
            max_site_coverage_radius=1.0,
            max_chunk_bytes=80,
        )
    )
    assembler = ChunkAssembler(max_rows=20)
    assembler.add(chunks[0])
    with pytest.raises(ChunkConflictError, match="server_coverage_radius"):
        assembler.add(dataclasses.replace(chunks[1], server_coverage_radius=0.5))


def test_column_mismatch_is_rejected(upload: tuple[np.ndarray, list[FeatureChunk]]) -> None:
    _, chunks = upload
    with pytest.raises(ChunkConflictError, match="8 columns, the stream has 16"):
        ChunkAssembler(max_rows=40, expected_cols=16).add(chunks[0])
    assembler = ChunkAssembler(max_rows=40)
    assembler.add(chunks[0])
    narrow = encode_matrix(np.zeros((10, 4), np.float32), CODEC_PRESETS["lossless"])
    with pytest.raises(ChunkConflictError, match="4 columns, the stream has 8"):
        assembler.add(dataclasses.replace(chunks[1], features=narrow))


def test_empty_chunk_mid_stream_is_rejected(
    upload: tuple[np.ndarray, list[FeatureChunk]],
) -> None:
    _, chunks = upload
    assembler = ChunkAssembler(max_rows=40)
    assembler.add(chunks[0])
    empty = encode_matrix(np.zeros((0, 8), np.float32), CODEC_PRESETS["lossless"])
    with pytest.raises(ChunkOrderError, match="empty"):
        assembler.add(dataclasses.replace(chunks[1], features=empty))


def test_rejected_chunk_leaves_the_assembler_unchanged(
    upload: tuple[np.ndarray, list[FeatureChunk]],
) -> None:
    x, chunks = upload
    assembler = ChunkAssembler(max_rows=40)
    assembler.add(chunks[0])
    corrupt = dataclasses.replace(
        chunks[1], features=dataclasses.replace(chunks[1].features, checksum=0)
    )
    with pytest.raises(ChecksumMismatchError):
        assembler.add(corrupt)
    assert (assembler.next_sequence, assembler.rows_received) == (1, 10)
    for chunk in chunks[1:]:  # the sender resends from next_sequence
        assert assembler.add(chunk)
    np.testing.assert_array_equal(assembler.result(), x)


def test_chunk_larger_than_the_receivers_bound_is_rejected(
    upload: tuple[np.ndarray, list[FeatureChunk]],
) -> None:
    _, chunks = upload
    assembler = ChunkAssembler(max_rows=40, max_decoded_bytes_per_chunk=319)
    with pytest.raises(ValueError, match="exceeds the bound of 319 bytes"):
        assembler.add(chunks[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_rows": -1},
        {"max_rows": 1.0},
        {"max_rows": 10, "expected_cols": 0},
        {"max_rows": 10, "max_decoded_bytes_per_chunk": 0},
    ],
)
def test_assembler_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ChunkAssembler(**kwargs)  # type: ignore[arg-type]


# --- layering ----------------------------------------------------------------------------------


def test_core_serde_does_not_import_grpc() -> None:
    code = (
        "import sys, core.serde, core.codec, core.messages; "
        "bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'grpc_'))); "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_streaming_assembler_hands_rows_over_without_keeping_them() -> None:
    x = dense_features(1000, 16, seed=3)
    chunks = list(
        split_into_chunks(
            x, config=CODEC_PRESETS["lossless"], site_id="s", round=1, max_chunk_bytes=4096
        )
    )
    assembler = ChunkAssembler(max_rows=1000, retain=False)
    parts = [assembler.accept(c) for c in chunks]
    assert assembler.accept(chunks[1]) is None  # identical resend: nothing new
    np.testing.assert_array_equal(np.concatenate([p for p in parts if p is not None]), x)
    assert assembler.complete and assembler.rows_received == 1000
    with pytest.raises(RuntimeError, match="retain=False"):
        assembler.result()


def test_later_rounds_may_upload_nothing_but_round_one_may_not() -> None:
    fields = dict(
        site_id="a",
        num_images=1,
        num_patches=10,
        coverage_radius=0.5,
        feature_dim=8,
        backbone="b",
        layers=("l",),
        codec=DEFAULT_CODEC,
        feature_fingerprint="ab" * 32,
    )
    assert SiteSummary(round=2, coreset_rows=0, **fields).coreset_rows == 0  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError, match="coreset_rows"):
        SiteSummary(round=1, coreset_rows=0, **fields)  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageError, match="feature_fingerprint"):
        SiteSummary(round=1, coreset_rows=1, **{**fields, "feature_fingerprint": "xyz"})  # type: ignore[arg-type]


def test_upload_request_wraps_summary_or_chunk() -> None:
    from core.serde import upload_request_from_proto, upload_request_to_proto

    summary = site_summary_from_proto(_summary_proto())
    chunk = next(
        split_into_chunks(dense_features(3, 3, 0), config=DEFAULT_CODEC, site_id="s", round=1)
    )
    for item in (summary, chunk):
        wire = pb.UploadFeaturesRequest.FromString(
            upload_request_to_proto(item).SerializeToString()
        )
        assert upload_request_from_proto(wire) == item
    with pytest.raises(InvalidMessageError, match="no body"):
        upload_request_from_proto(pb.UploadFeaturesRequest())
