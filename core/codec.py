"""Chunk codec for memory-bank features: value type + optional byte-shuffle + zstd + XXH64.

Sites upload PatchCore memory-bank rows (``features: [n, D] float32``, D typically 1024) and the
server sends the global bank back; both travel as :class:`EncodedMatrix` values, the domain twin
of the ``fedpatchcore.v1.EncodedMatrix`` protobuf message (``core.serde`` converts between them;
this module imports neither protobuf nor grpc).

Pipeline (encode; decode runs it backwards):

1. value type: float32 rows become fp32 (bit-exact), fp16, bf16, int8 or int4 codes;
2. byte-shuffle (multi-byte types only): the value array seen as ``[n*D, itemsize]`` bytes is
   transposed, so all low bytes come first, then all high bytes. Float exponents/high mantissa
   bytes are far more repetitive than low mantissa bytes; grouping them helps zstd;
3. one zstd frame with its content size in the header, so a decoder can bound the allocation
   before inflating anything;
4. an XXH64 checksum over the header fields the decoder interprets, the quantisation parameters
   and the zstd frame (layout in ``protos/fedpatchcore/v1/features.proto``), so corruption is
   caught before decompression. It is an integrity check, not authentication.

Worst-case absolute error per value (x: input value, x̂: decoded value; scale_j, max_abs_j are
those of column j *within one encoded matrix*, i.e. one chunk):

=========  =====================================  ============================================
codec      bound on |x - x̂|                       range / notes
=========  =====================================  ============================================
fp32       0 (bit-exact)                          any finite float32
fp16       max(2^-11 * |x|, 2^-25)                |x| >= 65520 raises ValueOutOfRangeError (it
                                                  would round to inf; 65504 is fp16's max)
bf16       max(2^-8 * |x|, 2^-134)                |x| >= 0x7F7F8000 as float32 (~3.3961e38)
                                                  raises ValueOutOfRangeError
int8       scale_j / 2 + 2^-23 * max_abs_j        scale_j = (max_j - min_j) / 255, stored as
                                                  float32 (rounded up); 256 levels per column
int4       scale_j / 2 + 2^-23 * max_abs_j        scale_j = (max_j - min_j) / 15; 16 levels,
                                                  two codes per byte
=========  =====================================  ============================================

The 2^-23 * max_abs_j term of the integer codecs covers float32 rounding of the stored scale and
of the reconstruction; on real features it is negligible next to scale_j / 2. Integer
reconstructions are clamped to the finite float32 range. Rounding is to nearest (ties to even)
everywhere.

Why fp16 raises instead of saturating: a clipped feature silently distorts nearest-neighbour
distances (and so anomaly scores); PatchCore features after ReLU and average pooling are small
(|x| < 100 for WideResNet-50), so an out-of-range value signals a bug or a different backbone.
Use bf16 or fp32 for such features.

Empty matrices (0 rows, >= 1 column) are valid: they encode to an empty zstd frame and decode to
``np.empty((0, D), np.float32)``. The chunking layer uses one as the terminator of an empty
upload.

zstandard compressor/decompressor objects are not thread-safe; this module creates one per call
(about 10 us, negligible next to compressing a chunk), so all functions here are thread-safe.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

import numpy as np
import xxhash
import zstandard
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKSUM_TYPES",
    "CHECKSUM_WIRE_CODES",
    "CODEC_PRESETS",
    "DEFAULT_CODEC",
    "VALUE_TYPES",
    "VALUE_TYPE_WIRE_CODES",
    "ZSTD_LEVEL_RANGE",
    "ChecksumMismatchError",
    "CodecConfig",
    "CodecError",
    "EncodedMatrix",
    "InvalidCodecConfigError",
    "InvalidMatrixError",
    "MalformedPayloadError",
    "NonFiniteValuesError",
    "PayloadTooLargeError",
    "ValueOutOfRangeError",
    "compute_checksum",
    "decode_matrix",
    "decoded_size_for",
    "encode_matrix",
    "validate_feature_matrix",
]

# Wire codes equal the enum numbers of fedpatchcore.v1.ValueType / ChecksumType (tests/test_serde.py
# checks that they stay equal); they also feed the checksum, so they are part of the contract.
VALUE_TYPE_WIRE_CODES: Final[Mapping[str, int]] = MappingProxyType(
    {"fp32": 1, "fp16": 2, "bf16": 3, "int8": 4, "int4": 5}
)
VALUE_TYPES: Final[tuple[str, ...]] = tuple(VALUE_TYPE_WIRE_CODES)
CHECKSUM_WIRE_CODES: Final[Mapping[str, int]] = MappingProxyType({"xxh64": 1})
CHECKSUM_TYPES: Final[tuple[str, ...]] = tuple(CHECKSUM_WIRE_CODES)

# Levels 1..22 are zstd's regular range. Level 0 ("library default") and the negative "fast"
# levels are excluded so that the level recorded on the wire (uint32) is always explicit.
ZSTD_LEVEL_RANGE: Final[tuple[int, int]] = (1, zstandard.MAX_COMPRESSION_LEVEL)

# Bytes per value in the decompressed payload; int4 packs two values per byte (see _pack_int4).
_ITEMSIZE: Final[dict[str, int]] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 1}
_LITTLE_ENDIAN_DTYPE: Final[dict[str, str]] = {"fp32": "<f4", "fp16": "<f2", "bf16": "<u2"}
_QUANT_LEVELS: Final[dict[str, int]] = {"int8": 256, "int4": 16}

# Magnitudes at or above these round to inf in the target type (round to nearest even).
_FP16_OVERFLOW: Final[float] = 65520.0
_BF16_OVERFLOW: Final[float] = float(np.array([0x7F7F8000], dtype=np.uint32).view(np.float32)[0])
_FLOAT32_MAX: Final[float] = float(np.finfo(np.float32).max)

# rows u64 | cols u32 | value_type u8 | byte_shuffle u8 | decoded_size u64, little-endian; then
# quant_scale | quant_offset | payload. Documented in features.proto (EncodedMatrix.checksum).
_CHECKSUM_HEADER: Final[struct.Struct] = struct.Struct("<QIBBQ")
_UINT32_MAX: Final[int] = 2**32 - 1
_UINT64_MAX: Final[int] = 2**64 - 1

# Integer (de)quantisation works in float64 row blocks of about this many bytes so that a large
# matrix never needs full-size float64 temporaries.
_BLOCK_BYTES: Final[int] = 4 << 20


class CodecError(ValueError):
    """Base class of every codec error; a ValueError because each one means bad input."""


class InvalidCodecConfigError(CodecError):
    """A CodecConfig field is out of its documented range."""


class InvalidMatrixError(CodecError):
    """The matrix given to encode_matrix is not a finite 2-D float32 array with >= 1 column."""


class NonFiniteValuesError(InvalidMatrixError):
    """The matrix to encode holds NaN or +-inf."""


class ValueOutOfRangeError(InvalidMatrixError):
    """A value is too large in magnitude for the requested value type (fp16 / bf16)."""


class MalformedPayloadError(CodecError):
    """An EncodedMatrix is structurally invalid: inconsistent fields, bad frame, bad values."""


class ChecksumMismatchError(CodecError):
    """The declared checksum does not match the encoded bytes (corruption in transit/storage)."""


class PayloadTooLargeError(CodecError):
    """The declared decoded size exceeds the caller's bound; nothing was inflated."""


def _is_int(value: object) -> bool:
    """True for Python/numpy integers but not bool (bool is an int subclass)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_uint(name: str, value: object, maximum: int) -> None:
    """Raise MalformedPayloadError unless ``value`` is an int (not bool) in [0, maximum]."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise MalformedPayloadError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= int(value) <= maximum:
        raise MalformedPayloadError(f"{name} must be in [0, {maximum}], got {value}")


@dataclass(frozen=True)
class CodecConfig:
    """How a feature matrix is encoded. The default is the ``"fp16"`` preset.

    value_type: one of ``VALUE_TYPES`` ("fp32", "fp16", "bf16", "int8", "int4").
    byte_shuffle: transpose value bytes before zstd. Only meaningful for multi-byte types
        (fp32/fp16/bf16); must be False for int8/int4, where it would be a silent no-op.
    zstd_level: zstd compression level within ``ZSTD_LEVEL_RANGE`` (1..22).
    checksum: integrity check algorithm, one of ``CHECKSUM_TYPES`` ("xxh64").
    """

    value_type: str = "fp16"
    byte_shuffle: bool = True
    zstd_level: int = 1
    checksum: str = "xxh64"

    def __post_init__(self) -> None:
        if self.value_type not in VALUE_TYPE_WIRE_CODES:
            raise InvalidCodecConfigError(
                f"CodecConfig.value_type must be one of {list(VALUE_TYPES)}, got "
                f"{self.value_type!r}"
            )
        if not isinstance(self.byte_shuffle, bool):
            raise InvalidCodecConfigError(
                f"CodecConfig.byte_shuffle must be a bool, got {type(self.byte_shuffle).__name__}"
            )
        if self.byte_shuffle and _ITEMSIZE[self.value_type] == 1:
            raise InvalidCodecConfigError(
                f"CodecConfig.byte_shuffle must be False for the 1-byte value type "
                f"{self.value_type!r} (shuffling single bytes does nothing)"
            )
        low, high = ZSTD_LEVEL_RANGE
        if not _is_int(self.zstd_level) or not low <= self.zstd_level <= high:
            raise InvalidCodecConfigError(
                f"CodecConfig.zstd_level must be an int in [{low}, {high}], got "
                f"{self.zstd_level!r}"
            )
        if self.checksum not in CHECKSUM_WIRE_CODES:
            raise InvalidCodecConfigError(
                f"CodecConfig.checksum must be one of {list(CHECKSUM_TYPES)}, got "
                f"{self.checksum!r}"
            )


# zstd levels chosen by measurement on dense features (ReLU'd + 3x3 average-pooled Gaussian
# features [20000, 1024], chunks of 1 MiB of decoded payload, 2 CPU cores): level 1 gave the best
# ratio/speed for every value type. fp16 + shuffle: 0.369 of raw fp32 at level 1 vs 0.381 at
# level 3 (about half the speed); bf16: 0.309 vs 0.308; int8/int4: zstd only entropy-codes the
# codes, and levels 1-19 give the same size (int8 0.236, int4 0.106). lossless: 0.809.
CODEC_PRESETS: Final[Mapping[str, CodecConfig]] = MappingProxyType({
    "lossless": CodecConfig(value_type="fp32", byte_shuffle=True, zstd_level=1),
    "fp16": CodecConfig(value_type="fp16", byte_shuffle=True, zstd_level=1),
    "bf16": CodecConfig(value_type="bf16", byte_shuffle=True, zstd_level=1),
    "int8": CodecConfig(value_type="int8", byte_shuffle=False, zstd_level=1),
    "int4": CodecConfig(value_type="int4", byte_shuffle=False, zstd_level=1),
})
DEFAULT_CODEC: Final[CodecConfig] = CODEC_PRESETS["fp16"]


@dataclass(frozen=True)
class EncodedMatrix:
    """One encoded float32 matrix [rows, cols]; field meanings as in features.proto.

    Construction validates every field and the cross-field invariants (decoded_size matches the
    shape and value type, quantisation parameters present exactly for int8/int4 with 4 * cols
    bytes each), raising MalformedPayloadError; so any EncodedMatrix is structurally consistent and
    decode_matrix only has to check the bound, the checksum, the zstd frame and the values.

    rows: number of matrix rows (>= 0). cols: number of columns (>= 1, < 2^32).
    value_type: one of VALUE_TYPES. byte_shuffle: payload bytes are shuffled (see module doc).
    zstd_level: level the encoder used; informational (decoding does not need it).
    decoded_size: bytes of the value payload after zstd decompression, = decoded_size_for(...).
    quant_scale, quant_offset: per-column float32 little-endian [cols] (4 * cols bytes each) for
        int8/int4, empty otherwise. Value = offset + scale * code.
    checksum_type: one of CHECKSUM_TYPES. checksum: unsigned 64-bit digest (see compute_checksum).
    payload: one zstd frame with its content size in the frame header.
    """

    rows: int
    cols: int
    value_type: str
    byte_shuffle: bool
    zstd_level: int
    decoded_size: int
    quant_scale: bytes = field(repr=False)
    quant_offset: bytes = field(repr=False)
    checksum_type: str
    checksum: int
    payload: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_uint("EncodedMatrix.rows", self.rows, _UINT64_MAX)
        _check_uint("EncodedMatrix.cols", self.cols, _UINT32_MAX)
        if self.cols == 0:
            raise MalformedPayloadError("EncodedMatrix.cols must be >= 1, got 0")
        if self.value_type not in VALUE_TYPE_WIRE_CODES:
            raise MalformedPayloadError(
                f"EncodedMatrix.value_type must be one of {list(VALUE_TYPES)}, got "
                f"{self.value_type!r}"
            )
        if not isinstance(self.byte_shuffle, bool):
            raise MalformedPayloadError(
                f"EncodedMatrix.byte_shuffle must be a bool, got {type(self.byte_shuffle).__name__}"
            )
        if self.byte_shuffle and _ITEMSIZE[self.value_type] == 1:
            raise MalformedPayloadError(
                f"EncodedMatrix.byte_shuffle must be False for the 1-byte value type "
                f"{self.value_type!r}"
            )
        _check_uint("EncodedMatrix.zstd_level", self.zstd_level, _UINT32_MAX)
        _check_uint("EncodedMatrix.decoded_size", self.decoded_size, _UINT64_MAX)
        expected = decoded_size_for(self.rows, self.cols, self.value_type)
        if self.decoded_size != expected:
            raise MalformedPayloadError(
                f"EncodedMatrix.decoded_size must be {expected} bytes for a {self.rows} x "
                f"{self.cols} {self.value_type} matrix, got {self.decoded_size}"
            )
        quant_bytes = 4 * self.cols if self.value_type in _QUANT_LEVELS else 0
        for name in ("quant_scale", "quant_offset"):
            value = getattr(self, name)
            if not isinstance(value, bytes):
                raise MalformedPayloadError(
                    f"EncodedMatrix.{name} must be bytes, got {type(value).__name__}"
                )
            if len(value) != quant_bytes:
                raise MalformedPayloadError(
                    f"EncodedMatrix.{name} must hold {quant_bytes} bytes for value type "
                    f"{self.value_type!r} and {self.cols} columns, got {len(value)}"
                )
        if self.checksum_type not in CHECKSUM_WIRE_CODES:
            raise MalformedPayloadError(
                f"EncodedMatrix.checksum_type must be one of {list(CHECKSUM_TYPES)}, got "
                f"{self.checksum_type!r}"
            )
        _check_uint("EncodedMatrix.checksum", self.checksum, _UINT64_MAX)
        if not isinstance(self.payload, bytes):
            raise MalformedPayloadError(
                f"EncodedMatrix.payload must be bytes, got {type(self.payload).__name__}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the decoded matrix."""
        return (self.rows, self.cols)


def decoded_size_for(rows: int, cols: int, value_type: str) -> int:
    """Bytes of the decompressed value payload of a [rows, cols] matrix of ``value_type``.

    int4 packs two values per byte, so it is ceil(rows * cols / 2); the others are
    rows * cols * itemsize (fp32: 4, fp16/bf16: 2, int8: 1).
    """
    if value_type not in _ITEMSIZE:
        raise MalformedPayloadError(
            f"value_type must be one of {list(VALUE_TYPES)}, got {value_type!r}"
        )
    if value_type == "int4":
        return (rows * cols + 1) // 2
    return rows * cols * _ITEMSIZE[value_type]


def validate_feature_matrix(
    features: object, config: CodecConfig | None = None
) -> NDArray[np.float32]:
    """Check that ``features`` can be encoded and return it as a C-contiguous float32 array.

    features: np.ndarray [n, D], dtype float32 (native or little-endian), n >= 0, D >= 1, finite.
    config: when given, also checks that every value fits ``config.value_type`` (fp16/bf16).
    Raises InvalidMatrixError, NonFiniteValuesError or ValueOutOfRangeError. Other dtypes are
    refused rather than cast, so a float64 bank is not silently truncated and integer data is not
    mistaken for features. No copy is made when the input is already C-contiguous.
    """
    if not isinstance(features, np.ndarray):
        raise InvalidMatrixError(f"features must be a numpy ndarray, got {type(features).__name__}")
    if features.ndim != 2:
        raise InvalidMatrixError(
            f"features must be 2-D [n, D], got {features.ndim}-D shape {features.shape}"
        )
    if features.dtype != np.dtype("<f4"):
        raise InvalidMatrixError(f"features must have dtype float32, got {features.dtype}")
    if features.shape[1] == 0:
        raise InvalidMatrixError(
            f"features must have at least one column, got shape {features.shape}"
        )
    if features.shape[1] > _UINT32_MAX:
        raise InvalidMatrixError(
            f"features may have at most {_UINT32_MAX} columns, got shape {features.shape}"
        )
    matrix = np.ascontiguousarray(features)
    if matrix.size == 0:
        return matrix
    # min/max propagate NaN and expose +-inf, so two reductions check finiteness and range
    # without an [n, D] temporary; the offending position is only searched for on failure.
    low, high = float(matrix.min()), float(matrix.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        bad = ~np.isfinite(matrix)
        row, col = np.argwhere(bad)[0]
        raise NonFiniteValuesError(
            f"features must be finite, found {int(bad.sum())} NaN/inf values, the first at "
            f"[{row}, {col}] = {matrix[row, col]!r}"
        )
    if config is not None and config.value_type in ("fp16", "bf16"):
        limit = _FP16_OVERFLOW if config.value_type == "fp16" else _BF16_OVERFLOW
        if max(high, -low) >= limit:
            magnitude = np.abs(matrix)
            row, col = divmod(int(np.argmax(magnitude)), matrix.shape[1])
            raise ValueOutOfRangeError(
                f"features[{row}, {col}] = {matrix[row, col]!r} does not fit "
                f"{config.value_type}: magnitudes must be < {limit!r} (it would round to inf); "
                f"{int((magnitude >= limit).sum())} values are out of range. Use value_type "
                f"'fp32' or 'bf16' for such features"
            )
    return matrix


def encode_matrix(features: NDArray[np.float32], config: CodecConfig) -> EncodedMatrix:
    """Encode ``features`` [n, D] float32 with ``config``; see the module docstring for bounds.

    int8/int4 quantisation parameters are per column of *this* matrix (one chunk), from the
    column's min/max. Raises InvalidMatrixError / NonFiniteValuesError / ValueOutOfRangeError for
    bad input.
    """
    if not isinstance(config, CodecConfig):
        raise InvalidCodecConfigError(f"config must be a CodecConfig, got {type(config).__name__}")
    matrix = validate_feature_matrix(features, config)
    rows, cols = matrix.shape
    value_type = config.value_type
    quant_scale = b""
    quant_offset = b""
    if value_type == "fp32":
        values = matrix.astype("<f4", copy=False)
    elif value_type == "fp16":
        values = matrix.astype("<f2")
    elif value_type == "bf16":
        values = _float32_to_bf16_bits(matrix)
    else:
        levels = _QUANT_LEVELS[value_type]
        scale, offset = _affine_params(matrix, levels)
        # Codes go column-major: a column shares one scale, so its codes are alike and zstd
        # finds more to squeeze (int8 on WRN-50 banks: 0.2234 -> ~0.217 of raw fp32).
        codes = np.ascontiguousarray(_quantize(matrix, scale, offset, levels).T)
        values = _pack_int4(codes) if value_type == "int4" else codes
        quant_scale = scale.astype("<f4").tobytes()
        quant_offset = offset.astype("<f4").tobytes()
    raw = values.reshape(-1)
    if config.byte_shuffle:
        raw = _shuffle(raw)
    value_bytes = raw.tobytes()
    decoded_size = len(value_bytes)
    # One compressor per call: zstandard objects are not thread-safe. write_content_size puts the
    # decoded size into the frame header; the decoder relies on it. zstd's own frame checksum is
    # off because the XXH64 below covers the frame and can be checked before inflating.
    compressor = zstandard.ZstdCompressor(
        level=config.zstd_level, write_content_size=True, write_checksum=False
    )
    payload = compressor.compress(value_bytes)
    checksum = compute_checksum(
        rows=rows,
        cols=cols,
        value_type=value_type,
        byte_shuffle=config.byte_shuffle,
        decoded_size=decoded_size,
        quant_scale=quant_scale,
        quant_offset=quant_offset,
        payload=payload,
        checksum_type=config.checksum,
    )
    logger.debug(
        "encoded [%s, %s] as %s: %s payload bytes (%.3f of raw fp32)",
        rows, cols, value_type, len(payload), len(payload) / max(1, rows * cols * 4),
    )
    return EncodedMatrix(
        rows=rows,
        cols=cols,
        value_type=value_type,
        byte_shuffle=config.byte_shuffle,
        zstd_level=config.zstd_level,
        decoded_size=decoded_size,
        quant_scale=quant_scale,
        quant_offset=quant_offset,
        checksum_type=config.checksum,
        checksum=checksum,
        payload=payload,
    )


def decode_matrix(encoded: EncodedMatrix, *, max_decoded_bytes: int) -> NDArray[np.float32]:
    """Decode ``encoded`` into a new, writable float32 array [rows, cols].

    max_decoded_bytes: the most bytes the caller lets the zstd payload inflate to (a chunk's
        decoded payload is at most its raw fp32 size). Checked against the declared size and the
        frame header *before* anything is decompressed, so a zstd bomb costs no memory.
    Validation order (all before allocating the output): bound, checksum, quantisation
    parameters finite with scale >= 0, zstd frame header (single frame, content size present and
    equal to decoded_size); after inflating: no trailing data, int4 padding nibble zero, decoded
    float values finite. Raises PayloadTooLargeError, ChecksumMismatchError or
    MalformedPayloadError.
    """
    if not isinstance(encoded, EncodedMatrix):
        raise MalformedPayloadError(
            f"encoded must be an EncodedMatrix, got {type(encoded).__name__}"
        )
    if not _is_int(max_decoded_bytes) or max_decoded_bytes < 0:
        raise ValueError(f"max_decoded_bytes must be an int >= 0, got {max_decoded_bytes!r}")
    if encoded.decoded_size > max_decoded_bytes:
        raise PayloadTooLargeError(
            f"declared decoded_size {encoded.decoded_size} bytes ({encoded.rows} x "
            f"{encoded.cols} {encoded.value_type}) exceeds the bound of {max_decoded_bytes} bytes"
        )
    actual = compute_checksum(
        rows=encoded.rows,
        cols=encoded.cols,
        value_type=encoded.value_type,
        byte_shuffle=encoded.byte_shuffle,
        decoded_size=encoded.decoded_size,
        quant_scale=encoded.quant_scale,
        quant_offset=encoded.quant_offset,
        payload=encoded.payload,
        checksum_type=encoded.checksum_type,
    )
    if actual != encoded.checksum:
        raise ChecksumMismatchError(
            f"{encoded.checksum_type} checksum mismatch: declared {encoded.checksum:#018x}, "
            f"computed {actual:#018x} over {len(encoded.payload)} payload bytes"
        )
    scale = offset = None
    if encoded.value_type in _QUANT_LEVELS:
        scale = np.frombuffer(encoded.quant_scale, dtype="<f4")
        offset = np.frombuffer(encoded.quant_offset, dtype="<f4")
        if not (np.isfinite(scale).all() and np.isfinite(offset).all()):
            raise MalformedPayloadError(
                "quant_scale and quant_offset must be finite float32 values"
            )
        if (scale < 0).any():
            column = int(np.argmax(scale < 0))
            raise MalformedPayloadError(
                f"quant_scale must be >= 0, got {float(scale[column])!r} in column {column}"
            )
    raw = _inflate(encoded.payload, encoded.decoded_size)
    values = np.frombuffer(raw, dtype=np.uint8)
    if encoded.byte_shuffle:
        values = _unshuffle(values, _ITEMSIZE[encoded.value_type])
    rows, cols = encoded.rows, encoded.cols
    value_type = encoded.value_type
    if value_type in _LITTLE_ENDIAN_DTYPE:
        typed = values.view(_LITTLE_ENDIAN_DTYPE[value_type]).reshape(rows, cols)
        if value_type == "fp16":
            # All-ones exponent: inf or NaN, refused before the exact bit conversion.
            nonfinite = int(np.count_nonzero(
                (typed.view(np.uint16) & np.uint16(0x7C00)) == np.uint16(0x7C00)))
            if nonfinite:
                raise MalformedPayloadError(
                    f"decoded fp16 payload holds {nonfinite} NaN/inf values; encoders never "
                    "produce them"
                )
            return _fp16_to_float32(typed)
        # Both branches build a new array: the result is writable and native-endian.
        out = _bf16_bits_to_float32(typed) if value_type == "bf16" else typed.astype(np.float32)
        if out.size and not np.isfinite(out).all():
            raise MalformedPayloadError(
                f"decoded {value_type} payload holds {int((~np.isfinite(out)).sum())} NaN/inf "
                f"values; encoders never produce them"
            )
        return out
    assert scale is not None and offset is not None  # set above for int8/int4
    codes = _unpack_int4(values, rows * cols) if value_type == "int4" else values
    return _dequantize(codes.reshape(cols, rows).T, scale, offset)


def compute_checksum(
    *,
    rows: int,
    cols: int,
    value_type: str,
    byte_shuffle: bool,
    decoded_size: int,
    quant_scale: bytes,
    quant_offset: bytes,
    payload: bytes,
    checksum_type: str,
) -> int:
    """The EncodedMatrix checksum: XXH64 (seed 0) over a 22-byte header and the byte fields.

    Header (little-endian): rows u64, cols u32, value_type wire code u8 (VALUE_TYPE_WIRE_CODES),
    byte_shuffle u8 (0/1), decoded_size u64; then quant_scale, quant_offset, payload. Covering the
    header means a corrupted shape or value type is caught too, not only a corrupted frame.
    zstd_level is informational and not covered.
    """
    if checksum_type != "xxh64":
        raise MalformedPayloadError(
            f"checksum_type must be one of {list(CHECKSUM_TYPES)}, got {checksum_type!r}"
        )
    digest = xxhash.xxh64(seed=0)
    digest.update(
        _CHECKSUM_HEADER.pack(
            rows, cols, VALUE_TYPE_WIRE_CODES[value_type], int(byte_shuffle), decoded_size
        )
    )
    digest.update(quant_scale)
    digest.update(quant_offset)
    digest.update(payload)
    return digest.intdigest()


def _inflate(payload: bytes, decoded_size: int) -> bytes:
    """Decompress one zstd frame whose header must declare exactly ``decoded_size`` bytes.

    python-zstandard sizes its output buffer from the frame header's content size and ignores
    max_output_size when that is present, so the header is checked first; a frame that claims
    fewer bytes than it holds fails inside zstd ("destination buffer too small") without
    growing the buffer.
    """
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as exc:
        raise MalformedPayloadError(
            f"payload is not a zstd frame ({len(payload)} bytes): {exc}"
        ) from exc
    if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise MalformedPayloadError(
            "payload zstd frame does not declare its content size; encoders must write it"
        )
    if params.content_size != decoded_size:
        raise MalformedPayloadError(
            f"payload zstd frame declares {params.content_size} bytes, decoded_size says "
            f"{decoded_size}"
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(
            payload, max_output_size=decoded_size, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise MalformedPayloadError(f"payload zstd frame is corrupt: {exc}") from exc
    if len(raw) != decoded_size:
        raise MalformedPayloadError(
            f"payload inflated to {len(raw)} bytes, decoded_size says {decoded_size}"
        )
    return raw


def _shuffle(values: NDArray[np.generic]) -> NDArray[np.uint8]:
    """[m] values of itemsize k -> [k * m] bytes: byte 0 of every value, then byte 1, ..."""
    itemsize = values.dtype.itemsize
    return np.ascontiguousarray(values.view(np.uint8).reshape(-1, itemsize).T).reshape(-1)


def _unshuffle(data: NDArray[np.uint8], itemsize: int) -> NDArray[np.uint8]:
    """Inverse of _shuffle: [k * m] planar bytes -> [k * m] interleaved bytes.

    Built as little-endian words from the byte planes with shifts and ors (sequential passes)
    instead of a strided transpose copy: 1.2 ms against 8.2 ms for a 1 MiB fp16 chunk on the
    2-core machine, where decoding is most of what the server's ingest costs.
    """
    if itemsize not in (2, 4):
        return np.ascontiguousarray(data.reshape(itemsize, -1).T).reshape(-1)
    planes = data.reshape(itemsize, -1)
    word = np.uint16 if itemsize == 2 else np.uint32
    out = planes[itemsize - 1].astype(word)
    for plane in range(itemsize - 2, -1, -1):
        out <<= word(8)
        out |= planes[plane]
    return out.astype(f"<u{itemsize}", copy=False).view(np.uint8)


def _fp16_to_float32(half: NDArray[np.float16]) -> NDArray[np.float32]:
    """Finite float16 [rows, cols] -> float32, exactly, with integer passes.

    numpy's float16 -> float32 cast runs element by element (6 ms per 1 MiB chunk here). The
    float16 exponent and mantissa bits, moved into a float32's, give the value times 2^-112
    (a float32 normal, or a float32 subnormal for a float16 subnormal); multiplying by 2^112 is
    then exact. Inf and NaN bit patterns are not mapped: the caller refuses them first.
    """
    bits = half.view(np.uint16).astype(np.uint32)
    sign = bits & np.uint32(0x8000)
    sign <<= np.uint32(16)
    bits &= np.uint32(0x7FFF)
    bits <<= np.uint32(13)
    out = bits.view(np.float32)
    out *= np.float32(2.0**112)
    out.view(np.uint32)[...] |= sign
    return out


def _float32_to_bf16_bits(matrix: NDArray[np.float32]) -> NDArray[np.uint16]:
    """Round float32 to bfloat16 (nearest, ties to even) and return the upper 16 bits.

    Adding 0x7FFF plus the lowest kept bit rounds the dropped 16 bits to nearest-even; a carry
    moves into the exponent correctly (also for subnormals). Inputs are finite and below
    _BF16_OVERFLOW (checked by validate_feature_matrix), so nothing rounds to inf.
    """
    bits = matrix.astype("<f4", copy=False).view("<u4")
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype("<u2")


def _bf16_bits_to_float32(bits: NDArray[np.uint16]) -> NDArray[np.float32]:
    """bfloat16 bit patterns [rows, cols] -> float32 (exact: bf16 is a truncated float32)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _row_blocks(rows: int, cols: int) -> Iterator[slice]:
    """Row slices of about _BLOCK_BYTES of float64 temporaries each."""
    step = max(1, _BLOCK_BYTES // (8 * cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _affine_params(
    matrix: NDArray[np.float32], levels: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-column (scale, offset) [cols] for ``levels`` codes, already rounded to float32.

    offset = column min, scale = (max - min) / (levels - 1), computed in float64 (a float32
    span of two huge values of opposite sign can overflow) and rounded *up* to float32, which is
    what travels: then (levels - 1) * scale covers the column's range, no code saturates and the
    error bound scale / 2 holds even when the span is subnormal (rounding to nearest could give
    scale 0 there). A constant column gets scale 0 and decodes exactly. An empty matrix gets
    scale 0 and offset 0.
    """
    cols = matrix.shape[1]
    if matrix.shape[0] == 0:
        return np.zeros(cols), np.zeros(cols)
    low = matrix.min(axis=0).astype(np.float64)
    high = matrix.max(axis=0).astype(np.float64)
    exact = (high - low) / (levels - 1)
    scale32 = exact.astype(np.float32)
    scale32 = np.where(
        scale32.astype(np.float64) < exact, np.nextafter(scale32, np.float32(np.inf)), scale32
    )
    return scale32.astype(np.float64), low


def _quantize(
    matrix: NDArray[np.float32],
    scale: NDArray[np.float64],
    offset: NDArray[np.float64],
    levels: int,
) -> NDArray[np.uint8]:
    """codes = clip(rint((x - offset) / scale), 0, levels - 1) per column, as uint8 [rows, cols].

    Uses the float32-rounded scale/offset that travel, so the codes are nearest for the grid the
    decoder reconstructs. Columns with scale 0 get code 0.
    """
    rows, cols = matrix.shape
    divisor = np.where(scale > 0, scale, 1.0)
    codes = np.empty((rows, cols), dtype=np.uint8)
    for block in _row_blocks(rows, cols):
        scaled = (matrix[block].astype(np.float64) - offset) / divisor
        np.clip(np.rint(scaled), 0, levels - 1, out=scaled)
        codes[block] = scaled
    return codes


def _dequantize(
    codes: NDArray[np.uint8], scale: NDArray[np.float32], offset: NDArray[np.float32]
) -> NDArray[np.float32]:
    """x̂ = offset + scale * code per column, in float64, clamped to finite float32, as float32.

    float64 keeps the only rounding at the final cast; the clamp matters only for columns whose
    values reach the float32 maximum, where the float32-rounded scale can overshoot to inf.
    """
    rows, cols = codes.shape
    scale64 = scale.astype(np.float64)
    offset64 = offset.astype(np.float64)
    out = np.empty((rows, cols), dtype=np.float32)
    for block in _row_blocks(rows, cols):
        values = codes[block] * scale64
        values += offset64
        np.clip(values, -_FLOAT32_MAX, _FLOAT32_MAX, out=values)
        out[block] = values
    return out


def _pack_int4(codes: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Codes 0..15 (any shape) -> bytes [ceil(size/2)] in memory order, low nibble first.

    Value 2k goes to the low nibble of byte k, value 2k+1 to its high nibble; an odd count is
    padded with a zero high nibble.
    """
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.uint8)])
    return flat[0::2] | (flat[1::2] << np.uint8(4))


def _unpack_int4(packed: NDArray[np.uint8], count: int) -> NDArray[np.uint8]:
    """Inverse of _pack_int4: bytes -> ``count`` codes 0..15; a non-zero pad nibble is refused."""
    if count % 2 and packed[-1] >> 4:
        raise MalformedPayloadError(
            f"int4 payload has an odd value count ({count}) but its padding nibble is "
            f"{int(packed[-1] >> 4)}, expected 0"
        )
    codes = np.empty(2 * packed.size, dtype=np.uint8)
    codes[0::2] = packed & np.uint8(0x0F)
    codes[1::2] = packed >> np.uint8(4)
    return codes[:count]

