"""Tests for core.codec: round-trips, documented error bounds, byte layouts and typed rejections."""

from __future__ import annotations

import dataclasses
import io
import struct
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core import codec
from core.codec import (
    CODEC_PRESETS,
    DEFAULT_CODEC,
    VALUE_TYPE_WIRE_CODES,
    ChecksumMismatchError,
    CodecConfig,
    CodecError,
    EncodedMatrix,
    InvalidCodecConfigError,
    InvalidMatrixError,
    MalformedPayloadError,
    NonFiniteValuesError,
    PayloadTooLargeError,
    ValueOutOfRangeError,
    compute_checksum,
    decode_matrix,
    encode_matrix,
)

UNBOUNDED = 1 << 40  # a max_decoded_bytes that never triggers, for tests about other checks
FLOAT32_MAX = float(np.finfo(np.float32).max)
GIB = 1 << 30

SHAPES = hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=24).filter(
    lambda shape: shape[1] >= 1
)


def matrices(low: float, high: float) -> st.SearchStrategy[np.ndarray]:
    """float32 [n, D] matrices (n >= 0, D >= 1), finite values in [low, high], subnormals too."""
    elements = st.floats(
        min_value=float(np.float32(low)), max_value=float(np.float32(high)), width=32,
        allow_nan=False, allow_infinity=False, allow_subnormal=True,
    )
    return hnp.arrays(np.float32, SHAPES, elements=elements)


def configs(value_type: str) -> st.SearchStrategy[CodecConfig]:
    shuffle = st.booleans() if value_type in ("fp32", "fp16", "bf16") else st.just(False)
    return st.builds(
        CodecConfig, value_type=st.just(value_type), byte_shuffle=shuffle,
        zstd_level=st.integers(1, 6),
    )


def roundtrip(x: np.ndarray, config: CodecConfig) -> tuple[EncodedMatrix, np.ndarray]:
    encoded = encode_matrix(x, config)
    decoded = decode_matrix(encoded, max_decoded_bytes=encoded.decoded_size)
    assert decoded.shape == x.shape
    assert decoded.dtype == np.float32
    assert decoded.flags.writeable and decoded.flags.c_contiguous
    return encoded, decoded


def resign(encoded: EncodedMatrix, **changes: object) -> EncodedMatrix:
    """A copy of ``encoded`` with ``changes`` and a checksum recomputed to match them.

    Models a consistent but buggy or hostile sender: the checksum cannot catch what it signs.
    """
    fields = {f.name: getattr(encoded, f.name) for f in dataclasses.fields(encoded)}
    fields.update(changes)
    fields["checksum"] = compute_checksum(
        rows=fields["rows"], cols=fields["cols"], value_type=fields["value_type"],
        byte_shuffle=fields["byte_shuffle"], decoded_size=fields["decoded_size"],
        quant_scale=fields["quant_scale"], quant_offset=fields["quant_offset"],
        payload=fields["payload"], checksum_type=fields["checksum_type"],
    )
    return EncodedMatrix(**fields)  # type: ignore[arg-type]


def inflate(encoded: EncodedMatrix) -> bytes:
    """Independent decompression of the payload (to check byte layouts)."""
    return zstandard.ZstdDecompressor().decompress(encoded.payload)


def quant_params(encoded: EncodedMatrix) -> tuple[np.ndarray, np.ndarray]:
    scale = np.frombuffer(encoded.quant_scale, dtype="<f4").astype(np.float64)
    offset = np.frombuffer(encoded.quant_offset, dtype="<f4").astype(np.float64)
    return scale, offset


# --- round-trips and documented bounds ---------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(x=matrices(-FLOAT32_MAX, FLOAT32_MAX), config=configs("fp32"))
def test_fp32_is_bit_exact(x: np.ndarray, config: CodecConfig) -> None:
    _, decoded = roundtrip(x, config)
    # Compare bit patterns so that -0.0 vs 0.0 would be caught too.
    np.testing.assert_array_equal(decoded.view(np.uint32), x.view(np.uint32))


@settings(max_examples=60, deadline=None)
@given(x=matrices(-65504.0, 65504.0), config=configs("fp16"))
def test_fp16_matches_ieee_half_and_documented_bound(x: np.ndarray, config: CodecConfig) -> None:
    _, decoded = roundtrip(x, config)
    # numpy's float16 cast is an independent round-to-nearest-even implementation.
    np.testing.assert_array_equal(decoded, x.astype(np.float16).astype(np.float32))
    err = np.abs(decoded.astype(np.float64) - x.astype(np.float64))
    bound = np.maximum(2.0**-11 * np.abs(x.astype(np.float64)), 2.0**-25)
    assert (err <= bound).all()


@settings(max_examples=60, deadline=None)
@given(x=matrices(-3.0e38, 3.0e38), config=configs("bf16"))
def test_bf16_matches_torch_and_documented_bound(x: np.ndarray, config: CodecConfig) -> None:
    _, decoded = roundtrip(x, config)
    reference = torch.from_numpy(x.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(decoded.view(np.uint32), reference.view(np.uint32))
    err = np.abs(decoded.astype(np.float64) - x.astype(np.float64))
    bound = np.maximum(2.0**-8 * np.abs(x.astype(np.float64)), 2.0**-134)
    assert (err <= bound).all()


@pytest.mark.parametrize(("value_type", "levels"), [("int8", 256), ("int4", 16)])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_int_codecs_within_documented_bound(
    value_type: str, levels: int, data: st.DataObject
) -> None:
    x = data.draw(matrices(-1.0e6, 1.0e6))
    encoded, decoded = roundtrip(x, data.draw(configs(value_type)))
    scale, offset = quant_params(encoded)
    x64 = x.astype(np.float64)
    if x.shape[0]:
        low, high = x64.min(axis=0), x64.max(axis=0)
        np.testing.assert_array_equal(offset, low)
        # scale is (max - min) / (levels - 1) rounded up to float32: covers the range, tightly.
        assert ((levels - 1) * scale >= high - low).all()
        assert (scale <= (high - low) / (levels - 1) * (1 + 2.0**-23) + 2.0**-149).all()
        max_abs = np.abs(x64).max(axis=0)
        bound = scale / 2 + 2.0**-23 * max_abs
        assert (np.abs(decoded - x64) <= bound).all()


@pytest.mark.parametrize("value_type", ["int8", "int4"])
def test_int_codecs_handle_the_whole_float32_range(value_type: str) -> None:
    x = np.array(
        [[-FLOAT32_MAX, 0.0, 1.0], [FLOAT32_MAX, 0.0, 1.0], [1.0e38, 0.0, 1.0 + 2.0**-23]],
        dtype=np.float32,
    )
    encoded, decoded = roundtrip(x, CodecConfig(value_type=value_type, byte_shuffle=False))
    assert np.isfinite(decoded).all()
    scale, _ = quant_params(encoded)
    bound = scale / 2 + 2.0**-23 * np.abs(x.astype(np.float64)).max(axis=0)
    assert (np.abs(decoded.astype(np.float64) - x) <= bound).all()
    # Constant column: scale 0, exact.
    assert scale[1] == 0 and (decoded[:, 1] == 0).all()


@pytest.mark.parametrize("value_type", ["int8", "int4"])
def test_int_codecs_really_quantize_to_the_documented_levels(value_type: str) -> None:
    levels = {"int8": 256, "int4": 16}[value_type]
    x = np.linspace(0.0, 1.0, 1001, dtype=np.float32).reshape(-1, 1)
    _, decoded = roundtrip(x, CodecConfig(value_type=value_type, byte_shuffle=False))
    assert len(np.unique(decoded)) == levels
    # Uniform data hits errors close to the worst case scale / 2, not far below it.
    assert np.abs(decoded - x).max() > 0.4 / (levels - 1)


@pytest.mark.parametrize("preset", sorted(CODEC_PRESETS))
@pytest.mark.parametrize("cols", [1, 3, 1024])
def test_empty_matrix_roundtrips(preset: str, cols: int) -> None:
    x = np.empty((0, cols), dtype=np.float32)
    encoded, decoded = roundtrip(x, CODEC_PRESETS[preset])
    assert encoded.decoded_size == 0
    assert decoded.shape == (0, cols)


def test_non_contiguous_input_encodes_like_its_copy() -> None:
    x = np.random.default_rng(1).standard_normal((40, 30)).astype(np.float32)
    view = x[::2, 1::3]
    assert not view.flags.c_contiguous
    assert encode_matrix(view, DEFAULT_CODEC) == encode_matrix(view.copy(), DEFAULT_CODEC)


def test_encoding_is_deterministic() -> None:
    x = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    for config in CODEC_PRESETS.values():
        assert encode_matrix(x, config) == encode_matrix(x.copy(), config)


# --- byte layouts that are part of the contract -------------------------------------------------


def test_checksum_follows_the_documented_layout() -> None:
    x = np.random.default_rng(3).standard_normal((5, 7)).astype(np.float32)
    for config in CODEC_PRESETS.values():
        encoded = encode_matrix(x, config)
        header = struct.pack(
            "<QIBBQ", 5, 7, VALUE_TYPE_WIRE_CODES[config.value_type], int(config.byte_shuffle),
            encoded.decoded_size,
        )
        assert len(header) == 22
        expected = xxhash.xxh64(
            header + encoded.quant_scale + encoded.quant_offset + encoded.payload, seed=0
        ).intdigest()
        assert encoded.checksum == expected


def test_byte_shuffle_layout_is_planar() -> None:
    x = np.random.default_rng(4).standard_normal((3, 5)).astype(np.float32)
    shuffled = encode_matrix(x, CodecConfig(value_type="fp32", byte_shuffle=True))
    plain = encode_matrix(x, CodecConfig(value_type="fp32", byte_shuffle=False))
    le_bytes = x.astype("<f4").tobytes()
    assert inflate(plain) == le_bytes
    planes = b"".join(le_bytes[k::4] for k in range(4))  # byte k of every value, k = 0..3
    assert inflate(shuffled) == planes


def test_int4_packs_low_nibble_first_and_pads_odd_counts() -> None:
    # One column 0..1 with 16 levels: values i/15 get code i exactly.
    x = (np.array([0, 15, 3, 4, 9], dtype=np.float32) / 15).reshape(-1, 1)
    encoded = encode_matrix(x, CODEC_PRESETS["int4"])
    assert inflate(encoded) == bytes([0 | 15 << 4, 3 | 4 << 4, 9])
    assert encoded.decoded_size == 3


def test_int8_codes_are_nearest_levels() -> None:
    x = np.array([[0.0], [1.0], [0.5], [0.2]], dtype=np.float32)
    encoded = encode_matrix(x, CODEC_PRESETS["int8"])
    scale, _ = quant_params(encoded)
    codes = np.frombuffer(inflate(encoded), dtype=np.uint8)
    np.testing.assert_array_equal(codes, np.rint(x[:, 0].astype(np.float64) / scale[0]))


# --- config validation -------------------------------------------------------------------------


def test_default_config_is_the_fp16_preset() -> None:
    assert CodecConfig() == DEFAULT_CODEC == CODEC_PRESETS["fp16"]
    assert DEFAULT_CODEC.value_type == "fp16" and DEFAULT_CODEC.byte_shuffle
    assert set(CODEC_PRESETS) == {"lossless", "fp16", "bf16", "int8", "int4"}
    with pytest.raises(TypeError):
        CODEC_PRESETS["fp16"] = CodecConfig(value_type="fp32")  # type: ignore[index]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"value_type": "float16"}, "value_type"),
        ({"value_type": "int8", "byte_shuffle": True}, "byte_shuffle"),
        ({"byte_shuffle": 1}, "byte_shuffle"),
        ({"zstd_level": 0}, "zstd_level"),
        ({"zstd_level": 23}, "zstd_level"),
        ({"zstd_level": True}, "zstd_level"),
        ({"zstd_level": "1"}, "zstd_level"),
        ({"checksum": "crc32"}, "checksum"),
    ],
)
def test_config_rejects_bad_fields(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidCodecConfigError, match=f"CodecConfig.{field}"):
        CodecConfig(**changes)  # type: ignore[arg-type]


# --- bad input to encode -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("preset", sorted(CODEC_PRESETS))
def test_non_finite_input_is_rejected(bad: float, preset: str) -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    x[2, 1] = bad
    with pytest.raises(NonFiniteValuesError, match=r"\[2, 1\]"):
        encode_matrix(x, CODEC_PRESETS[preset])


@pytest.mark.parametrize(
    ("features", "fragment"),
    [
        (np.zeros(5, dtype=np.float32), "2-D"),
        (np.zeros((2, 3, 4), dtype=np.float32), "2-D"),
        (np.zeros((2, 3), dtype=np.float64), "float32"),
        (np.zeros((2, 3), dtype=np.float16), "float32"),
        (np.zeros((2, 3), dtype=np.int32), "float32"),
        (np.zeros((2, 3), dtype=">f4"), "float32"),
        (np.zeros((2, 0), dtype=np.float32), "at least one column"),
        ([[1.0, 2.0]], "ndarray"),
    ],
)
def test_malformed_input_is_rejected(features: object, fragment: str) -> None:
    with pytest.raises(InvalidMatrixError, match=fragment):
        encode_matrix(features, DEFAULT_CODEC)  # type: ignore[arg-type]


def test_fp16_range_limit() -> None:
    fp16 = CODEC_PRESETS["fp16"]
    ok = np.array([[65504.0, -65519.0]], dtype=np.float32)  # 65519 rounds down to 65504
    _, decoded = roundtrip(ok, fp16)
    np.testing.assert_array_equal(decoded, [[65504.0, -65504.0]])
    for bad in (65520.0, -70000.0, 1e30):
        x = np.array([[0.0, bad]], dtype=np.float32)
        with pytest.raises(ValueOutOfRangeError, match=r"features\[0, 1\]"):
            encode_matrix(x, fp16)
    # Other value types take the same values.
    roundtrip(np.array([[70000.0]], dtype=np.float32), CODEC_PRESETS["bf16"])


def test_bf16_range_limit() -> None:
    below = np.array([0x7F7F7FFF], dtype=np.uint32).view(np.float32).reshape(1, 1)
    _, decoded = roundtrip(below, CODEC_PRESETS["bf16"])
    assert decoded[0, 0] == np.array([0x7F7F0000], dtype=np.uint32).view(np.float32)[0]
    at = np.array([0x7F7F8000], dtype=np.uint32).view(np.float32).reshape(1, 1)
    with pytest.raises(ValueOutOfRangeError):
        encode_matrix(-at, CODEC_PRESETS["bf16"])


def test_codec_errors_are_value_errors() -> None:
    for error in (InvalidMatrixError, MalformedPayloadError, ChecksumMismatchError,
                  PayloadTooLargeError, InvalidCodecConfigError):
        assert issubclass(error, CodecError) and issubclass(error, ValueError)


# --- bad input to decode -----------------------------------------------------------------------


@pytest.fixture
def encoded() -> EncodedMatrix:
    x = np.random.default_rng(5).standard_normal((32, 16)).astype(np.float32)
    return encode_matrix(x, CODEC_PRESETS["lossless"])


def test_flipped_checksum_is_rejected(encoded: EncodedMatrix) -> None:
    bad = dataclasses.replace(encoded, checksum=encoded.checksum ^ 1)
    with pytest.raises(ChecksumMismatchError, match=f"{bad.checksum:#018x}"):
        decode_matrix(bad, max_decoded_bytes=UNBOUNDED)


def test_corrupt_payload_is_rejected_by_checksum(encoded: EncodedMatrix) -> None:
    payload = bytearray(encoded.payload)
    payload[len(payload) // 2] ^= 0x40
    bad = dataclasses.replace(encoded, payload=bytes(payload))
    with pytest.raises(ChecksumMismatchError):
        decode_matrix(bad, max_decoded_bytes=UNBOUNDED)


def test_corrupt_quant_params_are_rejected_by_checksum() -> None:
    x = np.random.default_rng(6).standard_normal((8, 4)).astype(np.float32)
    good = encode_matrix(x, CODEC_PRESETS["int8"])
    bad = dataclasses.replace(good, quant_offset=bytes(16))
    with pytest.raises(ChecksumMismatchError):
        decode_matrix(bad, max_decoded_bytes=UNBOUNDED)


def _no_content_size(encoded: EncodedMatrix) -> bytes:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(inflate(encoded))
    assert zstandard.get_frame_parameters(frame).content_size == zstandard.CONTENTSIZE_UNKNOWN
    return frame


@pytest.mark.parametrize(
    "make_payload",
    [
        pytest.param(lambda e: b"", id="empty"),
        pytest.param(lambda e: b"not a zstd frame at all", id="garbage"),
        pytest.param(lambda e: e.payload[:-3], id="truncated"),
        pytest.param(lambda e: e.payload + b"\x00", id="trailing-bytes"),
        pytest.param(lambda e: e.payload + e.payload, id="two-frames"),
        pytest.param(_no_content_size, id="no-content-size"),
    ],
)
def test_bad_frames_are_rejected_even_with_valid_checksum(
    encoded: EncodedMatrix, make_payload: Callable[[EncodedMatrix], bytes]
) -> None:
    forged = resign(encoded, payload=make_payload(encoded))
    with pytest.raises(MalformedPayloadError, match="frame"):
        decode_matrix(forged, max_decoded_bytes=UNBOUNDED)


def test_wrong_declared_shape_is_rejected(encoded: EncodedMatrix) -> None:
    # Inconsistent with decoded_size: refused on construction.
    with pytest.raises(MalformedPayloadError, match="decoded_size"):
        dataclasses.replace(encoded, rows=encoded.rows + 1)
    # Consistent but not what was signed: the checksum covers the header.
    swapped = dataclasses.replace(encoded, rows=encoded.cols, cols=encoded.rows)
    with pytest.raises(ChecksumMismatchError):
        decode_matrix(swapped, max_decoded_bytes=UNBOUNDED)
    grown = dataclasses.replace(
        encoded, rows=encoded.rows + 1, decoded_size=encoded.decoded_size + 4 * encoded.cols
    )
    with pytest.raises(ChecksumMismatchError):
        decode_matrix(grown, max_decoded_bytes=UNBOUNDED)
    # Consistent and signed (a buggy sender): the zstd frame header disagrees.
    with pytest.raises(MalformedPayloadError, match="frame declares"):
        decode_matrix(
            resign(grown, rows=grown.rows, decoded_size=grown.decoded_size),
            max_decoded_bytes=UNBOUNDED,
        )


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"value_type": "fp64"}, "value_type"),
        ({"checksum_type": "md5"}, "checksum_type"),
        ({"cols": 0, "decoded_size": 0}, "cols"),
        ({"rows": -1}, "rows"),
        ({"rows": True}, "rows"),
        ({"checksum": 2**64}, "checksum"),
        ({"quant_scale": b"\x00" * 4}, "quant_scale"),
        ({"payload": bytearray(b"x")}, "payload"),
    ],
)
def test_encoded_matrix_rejects_bad_fields(
    encoded: EncodedMatrix, changes: dict[str, object], fragment: str
) -> None:
    with pytest.raises(MalformedPayloadError, match=fragment):
        dataclasses.replace(encoded, **changes)  # type: ignore[arg-type]


def test_int_types_need_quant_params_and_no_shuffle() -> None:
    x = np.random.default_rng(7).standard_normal((4, 4)).astype(np.float32)
    good = encode_matrix(x, CODEC_PRESETS["int4"])
    with pytest.raises(MalformedPayloadError, match="quant_offset must hold 16 bytes"):
        dataclasses.replace(good, quant_offset=b"")
    with pytest.raises(MalformedPayloadError, match="byte_shuffle"):
        dataclasses.replace(good, byte_shuffle=True)
    float_encoded = encode_matrix(x, DEFAULT_CODEC)
    with pytest.raises(MalformedPayloadError, match="quant_scale must hold 0 bytes"):
        dataclasses.replace(float_encoded, quant_scale=good.quant_scale)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_bad_quant_params_are_rejected_before_inflating(bad: float) -> None:
    x = np.random.default_rng(8).standard_normal((4, 2)).astype(np.float32)
    good = encode_matrix(x, CODEC_PRESETS["int8"])
    scale = np.frombuffer(good.quant_scale, dtype="<f4").copy()
    scale[1] = bad
    with pytest.raises(MalformedPayloadError, match="quant_scale"):
        decode_matrix(resign(good, quant_scale=scale.tobytes()), max_decoded_bytes=UNBOUNDED)


@pytest.mark.parametrize(("value_type", "bits"), [("fp16", 0x7C00), ("bf16", 0x7FC0)])
def test_non_finite_decoded_values_are_rejected(value_type: str, bits: int) -> None:
    # A hand-made payload holding +inf (fp16) / NaN (bf16) at position 1 of a 1 x 2 matrix.
    raw = np.array([0, bits], dtype="<u2").tobytes()
    payload = zstandard.ZstdCompressor().compress(raw)
    template = encode_matrix(np.zeros((1, 2), dtype=np.float32), CODEC_PRESETS[value_type])
    forged = resign(template, byte_shuffle=False, payload=payload)
    with pytest.raises(MalformedPayloadError, match="NaN/inf"):
        decode_matrix(forged, max_decoded_bytes=UNBOUNDED)


def test_int4_padding_nibble_must_be_zero() -> None:
    x = np.arange(3, dtype=np.float32).reshape(3, 1)
    good = encode_matrix(x, CODEC_PRESETS["int4"])
    raw = bytearray(inflate(good))
    raw[-1] |= 0x50
    forged = resign(good, payload=zstandard.ZstdCompressor().compress(bytes(raw)))
    with pytest.raises(MalformedPayloadError, match="padding nibble"):
        decode_matrix(forged, max_decoded_bytes=UNBOUNDED)


def test_decoded_size_bound_is_inclusive_and_enforced(encoded: EncodedMatrix) -> None:
    decode_matrix(encoded, max_decoded_bytes=encoded.decoded_size)
    with pytest.raises(PayloadTooLargeError, match=str(encoded.decoded_size)):
        decode_matrix(encoded, max_decoded_bytes=encoded.decoded_size - 1)
    with pytest.raises(ValueError, match="max_decoded_bytes"):
        decode_matrix(encoded, max_decoded_bytes=-1)


# --- zstd bombs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gib_of_zeros_frame() -> bytes:
    """A real zstd frame of 1 GiB of zeros (~33 kB), built without holding 1 GiB in memory."""
    sink = io.BytesIO()
    zeros = bytes(1 << 20)
    compressor = zstandard.ZstdCompressor(level=1)
    with compressor.stream_writer(sink, size=GIB, closefd=False) as writer:
        for _ in range(GIB // len(zeros)):
            writer.write(zeros)
    frame = sink.getvalue()
    assert len(frame) < 100_000
    assert zstandard.get_frame_parameters(frame).content_size == GIB
    return frame


def _forbid_decompression(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("decode_matrix tried to decompress")

    monkeypatch.setattr(codec.zstandard, "ZstdDecompressor", refuse)


def test_honest_bomb_is_rejected_without_inflating(
    gib_of_zeros_frame: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    cols = 1024
    rows = GIB // (4 * cols)
    bomb = resign(
        encode_matrix(np.zeros((0, cols), dtype=np.float32), CODEC_PRESETS["lossless"]),
        rows=rows, decoded_size=GIB, byte_shuffle=False, payload=gib_of_zeros_frame,
    )
    _forbid_decompression(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(PayloadTooLargeError, match=f"{GIB} bytes"):
        decode_matrix(bomb, max_decoded_bytes=64 << 20)
    assert time.perf_counter() - start < 1.0


def _frame_with_lying_content_size(gib_frame: bytes) -> bytes:
    """The 1 GiB frame with its 4-byte content size field patched down to 4096 bytes."""
    frame = bytearray(gib_frame)
    descriptor = frame[4]
    # Content size field of 4 bytes (flag 2), not single-segment, no dictionary id.
    assert descriptor >> 6 == 2 and not descriptor & 0x20 and not descriptor & 0x03
    field_at = 4 + 1 + 1  # magic, descriptor, window descriptor
    assert struct.unpack_from("<I", frame, field_at)[0] == GIB
    struct.pack_into("<I", frame, field_at, 4096)
    return bytes(frame)


@pytest.mark.parametrize(
    ("make_frame", "fragment"),
    [
        # The matrix header claims 4096 bytes, the frame honestly declares 1 GiB: python-zstandard
        # would allocate the frame's declared size, so the decoder must compare them first.
        pytest.param(lambda frame: frame, "frame declares 1073741824", id="honest-frame"),
        # Everything claims 4096 bytes but the frame holds 1 GiB: zstd stops at the buffer end.
        pytest.param(_frame_with_lying_content_size, "corrupt", id="lying-frame"),
    ],
)
def test_bomb_behind_a_small_declared_size_is_rejected_without_allocating(
    gib_of_zeros_frame: bytes, make_frame: Callable[[bytes], bytes], fragment: str
) -> None:
    template = encode_matrix(np.zeros((1, 1024), dtype=np.float32), CODEC_PRESETS["lossless"])
    bomb = resign(template, byte_shuffle=False, payload=make_frame(gib_of_zeros_frame))
    assert bomb.decoded_size == 4096
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(MalformedPayloadError, match=fragment):
            decode_matrix(bomb, max_decoded_bytes=64 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 16 << 20


def test_quantised_codes_travel_column_major() -> None:
    """Wire contract: INT8 codes are column-major (all rows of column 0 first)."""
    import zstandard

    x = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0]], dtype=np.float32)
    encoded = encode_matrix(x, CodecConfig(value_type="int8", byte_shuffle=False))
    codes = np.frombuffer(zstandard.ZstdDecompressor().decompress(encoded.payload), np.uint8)
    # column-major: [col0 rows..., col1 rows...]; row-major would read [0, 0, m, m, 255, 255]
    assert codes[0] == codes[3] == 0 and codes[2] == codes[5] == 255
    assert 0 < codes[1] == codes[4] < 255
    np.testing.assert_allclose(
        decode_matrix(encoded, max_decoded_bytes=1 << 20), x, atol=0.05
    )


def test_fp16_decoding_is_exact_for_every_finite_bit_pattern() -> None:
    """The decoder's integer fp16 -> float32 conversion equals numpy's cast on all 63,488
    finite float16 values (subnormals, -0 included), and its byte unshuffle inverts the
    encoder's shuffle for 2- and 4-byte values."""
    from core.codec import _fp16_to_float32, _shuffle, _unshuffle

    half = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = half[np.isfinite(half)]
    assert finite.size == 63488
    np.testing.assert_array_equal(
        _fp16_to_float32(finite.copy()).view(np.uint32), finite.astype(np.float32).view(np.uint32)
    )
    for values in (finite, np.random.default_rng(0).standard_normal(999).astype(np.float32)):
        shuffled = _shuffle(values)
        assert not np.array_equal(shuffled, values.view(np.uint8))
        np.testing.assert_array_equal(_unshuffle(shuffled, values.dtype.itemsize),
                                      values.view(np.uint8))
