"""Protobuf <-> domain conversion for fedpatchcore.v1, and feature-matrix chunking.

``x_to_proto`` / ``x_from_proto`` pairs convert between the frozen dataclasses of
``core.codec`` / ``core.messages`` and the generated classes of ``fedpatchcore.v1.features_pb2``.
``_from_proto`` validates everything (unknown or unspecified enum values, missing required
sub-messages, empty ids, ranges) and raises a ValueError subclass naming the field, so a
transport can map any of them to INVALID_ARGUMENT.

Chunking: a bank of 20,000 x 1024 float32 is 80 MiB raw, far above gRPC's default 4 MiB message
limit, so uploads and downloads are streams of chunks. ``split_into_chunks`` /
``split_bank_into_chunks`` cut a matrix into chunks whose *decoded value payload* (rows x D x
bytes per value of the codec's value type) is at most ``max_chunk_bytes`` (default 1 MiB, at
most 3 MiB). Sizing by the encoded value type, not by raw fp32 bytes, keeps every message near
the same ~1 MiB size (fast on gRPC streams) and amortises int8/int4's 8 x D bytes of per-chunk
quantisation parameters over more rows: on dense features int4 costs 0.106 of raw fp32 with 1 MiB
payload chunks (2048 rows of D=1024) against 0.121 with 256-row chunks. A serialized chunk is at
most about max_chunk_bytes + 8 x D + 100 bytes (zstd never expands by more than a few bytes per
128 KiB block), i.e. under 3.1 MiB for D = 1024.

``ChunkAssembler`` reassembles a stream on the receiving side: chunks must arrive in sequence
order with contiguous row offsets; a resent chunk that was already accepted is recognised and
ignored when identical (idempotent retries) and rejected when it differs; gaps, chunks after the
last one and unbounded uploads are rejected. A rejected chunk leaves the assembler unchanged, so
the sender can resend from ``next_sequence``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
import xxhash
from numpy.typing import NDArray

from core.codec import (
    CHECKSUM_WIRE_CODES,
    VALUE_TYPE_WIRE_CODES,
    CodecConfig,
    EncodedMatrix,
    InvalidCodecConfigError,
    MalformedPayloadError,
    decode_matrix,
    decoded_size_for,
    encode_matrix,
    validate_feature_matrix,
)
from core.messages import BankChunk, FeatureChunk, InvalidMessageError, SiteSummary
from fedpatchcore.v1 import features_pb2 as pb

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_CHUNK_BYTES",
    "MAX_CHUNK_BYTES_LIMIT",
    "ChunkAssembler",
    "ChunkConflictError",
    "ChunkError",
    "ChunkOrderError",
    "IncompleteUploadError",
    "UploadTooLargeError",
    "assemble_chunks",
    "bank_chunk_from_proto",
    "bank_chunk_to_proto",
    "chunk_identity",
    "chunked_roundtrip",
    "codec_config_from_proto",
    "codec_config_to_proto",
    "codec_error",
    "encoded_matrix_from_proto",
    "encoded_matrix_to_proto",
    "feature_chunk_from_proto",
    "feature_chunk_to_proto",
    "site_summary_from_proto",
    "site_summary_to_proto",
    "split_bank_into_chunks",
    "split_into_chunks",
    "upload_request_from_proto",
    "upload_request_to_proto",
]

DEFAULT_MAX_CHUNK_BYTES: Final[int] = 1 << 20
# 3 MiB of payload + quantisation parameters + framing stays under gRPC's default 4 MiB receive
# limit for D up to ~100k, so a peer that forgot to raise the limit still accepts our chunks.
MAX_CHUNK_BYTES_LIMIT: Final[int] = 3 << 20

_VALUE_TYPE_BY_CODE: Final[dict[int, str]] = {c: n for n, c in VALUE_TYPE_WIRE_CODES.items()}
_CHECKSUM_BY_CODE: Final[dict[int, str]] = {c: n for n, c in CHECKSUM_WIRE_CODES.items()}


class ChunkError(ValueError):
    """A chunk does not fit the stream being assembled."""


class ChunkOrderError(ChunkError):
    """A gap in sequence numbers, a row_offset that is not contiguous, or a chunk after the last."""


class ChunkConflictError(ChunkError):
    """A chunk contradicts the stream: a resend that differs, another stream's chunk, other D."""


class UploadTooLargeError(ChunkError):
    """The stream carries more rows than the receiver's bound."""


class IncompleteUploadError(ChunkError):
    """The result was requested before the chunk with ``last`` = True arrived."""


# --- EncodedMatrix / CodecConfig ---------------------------------------------------------------


def encoded_matrix_to_proto(matrix: EncodedMatrix) -> pb.EncodedMatrix:
    """Domain EncodedMatrix -> fedpatchcore.v1.EncodedMatrix (bytes are shared, not re-encoded)."""
    return pb.EncodedMatrix(
        rows=matrix.rows,
        cols=matrix.cols,
        value_type=VALUE_TYPE_WIRE_CODES[matrix.value_type],  # type: ignore[arg-type]
        byte_shuffle=matrix.byte_shuffle,
        zstd_level=matrix.zstd_level,
        decoded_size=matrix.decoded_size,
        quant_scale=matrix.quant_scale,
        quant_offset=matrix.quant_offset,
        checksum_type=CHECKSUM_WIRE_CODES[matrix.checksum_type],  # type: ignore[arg-type]
        checksum=matrix.checksum,
        payload=matrix.payload,
    )


def encoded_matrix_from_proto(message: pb.EncodedMatrix) -> EncodedMatrix:
    """fedpatchcore.v1.EncodedMatrix -> domain EncodedMatrix; raises MalformedPayloadError.

    Only structure is checked here (enums known, sizes consistent); the checksum and the payload
    are checked by core.codec.decode_matrix, under the receiver's size bound.
    """
    _check_type(message, pb.EncodedMatrix)
    return EncodedMatrix(
        rows=message.rows,
        cols=message.cols,
        value_type=_enum_name(
            "EncodedMatrix.value_type", message.value_type, _VALUE_TYPE_BY_CODE,
            MalformedPayloadError,
        ),
        byte_shuffle=message.byte_shuffle,
        zstd_level=message.zstd_level,
        decoded_size=message.decoded_size,
        quant_scale=message.quant_scale,
        quant_offset=message.quant_offset,
        checksum_type=_enum_name(
            "EncodedMatrix.checksum_type", message.checksum_type, _CHECKSUM_BY_CODE,
            MalformedPayloadError,
        ),
        checksum=message.checksum,
        payload=message.payload,
    )


def codec_config_to_proto(config: CodecConfig) -> pb.CodecConfig:
    """Domain CodecConfig -> fedpatchcore.v1.CodecConfig."""
    return pb.CodecConfig(
        value_type=VALUE_TYPE_WIRE_CODES[config.value_type],  # type: ignore[arg-type]
        byte_shuffle=config.byte_shuffle,
        zstd_level=config.zstd_level,
        checksum_type=CHECKSUM_WIRE_CODES[config.checksum],  # type: ignore[arg-type]
    )


def codec_config_from_proto(message: pb.CodecConfig) -> CodecConfig:
    """fedpatchcore.v1.CodecConfig -> domain CodecConfig; raises InvalidCodecConfigError."""
    _check_type(message, pb.CodecConfig)
    return CodecConfig(
        value_type=_enum_name(
            "CodecConfig.value_type", message.value_type, _VALUE_TYPE_BY_CODE,
            InvalidCodecConfigError,
        ),
        byte_shuffle=message.byte_shuffle,
        zstd_level=message.zstd_level,
        checksum=_enum_name(
            "CodecConfig.checksum_type", message.checksum_type, _CHECKSUM_BY_CODE,
            InvalidCodecConfigError,
        ),
    )


# --- FeatureChunk / SiteSummary / BankChunk ----------------------------------------------------


def feature_chunk_to_proto(chunk: FeatureChunk) -> pb.FeatureChunk:
    """Domain FeatureChunk -> fedpatchcore.v1.FeatureChunk."""
    return pb.FeatureChunk(
        site_id=chunk.site_id,
        round=chunk.round,
        sequence=chunk.sequence,
        row_offset=chunk.row_offset,
        last=chunk.last,
        features=encoded_matrix_to_proto(chunk.features),
    )


def feature_chunk_from_proto(message: pb.FeatureChunk) -> FeatureChunk:
    """fedpatchcore.v1.FeatureChunk -> domain; raises InvalidMessageError/MalformedPayloadError."""
    _check_type(message, pb.FeatureChunk)
    _require_field(message, "features", "FeatureChunk")
    return FeatureChunk(
        site_id=message.site_id,
        round=message.round,
        sequence=message.sequence,
        row_offset=message.row_offset,
        last=message.last,
        features=encoded_matrix_from_proto(message.features),
    )


def site_summary_to_proto(summary: SiteSummary) -> pb.SiteSummary:
    """Domain SiteSummary -> fedpatchcore.v1.SiteSummary."""
    return pb.SiteSummary(
        site_id=summary.site_id,
        round=summary.round,
        num_images=summary.num_images,
        num_patches=summary.num_patches,
        coreset_rows=summary.coreset_rows,
        coverage_radius=summary.coverage_radius,
        feature_dim=summary.feature_dim,
        backbone=summary.backbone,
        layers=summary.layers,
        codec=codec_config_to_proto(summary.codec),
        feature_fingerprint=summary.feature_fingerprint,
    )


def site_summary_from_proto(message: pb.SiteSummary) -> SiteSummary:
    """fedpatchcore.v1.SiteSummary -> domain; raises InvalidMessageError/InvalidCodecConfigError."""
    _check_type(message, pb.SiteSummary)
    _require_field(message, "codec", "SiteSummary")
    return SiteSummary(
        site_id=message.site_id,
        round=message.round,
        num_images=message.num_images,
        num_patches=message.num_patches,
        coreset_rows=message.coreset_rows,
        coverage_radius=message.coverage_radius,
        feature_dim=message.feature_dim,
        backbone=message.backbone,
        layers=tuple(message.layers),
        codec=codec_config_from_proto(message.codec),
        feature_fingerprint=message.feature_fingerprint,
    )


def bank_chunk_to_proto(chunk: BankChunk) -> pb.BankChunk:
    """Domain BankChunk -> fedpatchcore.v1.BankChunk."""
    return pb.BankChunk(
        round=chunk.round,
        sequence=chunk.sequence,
        row_offset=chunk.row_offset,
        last=chunk.last,
        features=encoded_matrix_to_proto(chunk.features),
        server_coverage_radius=chunk.server_coverage_radius,
        max_site_coverage_radius=chunk.max_site_coverage_radius,
    )


def bank_chunk_from_proto(message: pb.BankChunk) -> BankChunk:
    """fedpatchcore.v1.BankChunk -> domain; raises InvalidMessageError/MalformedPayloadError."""
    _check_type(message, pb.BankChunk)
    _require_field(message, "features", "BankChunk")
    return BankChunk(
        round=message.round,
        sequence=message.sequence,
        row_offset=message.row_offset,
        last=message.last,
        features=encoded_matrix_from_proto(message.features),
        server_coverage_radius=message.server_coverage_radius,
        max_site_coverage_radius=message.max_site_coverage_radius,
    )


def upload_request_to_proto(item: SiteSummary | FeatureChunk) -> pb.UploadFeaturesRequest:
    """A site's upload-stream element (its summary or one chunk) -> UploadFeaturesRequest."""
    if isinstance(item, SiteSummary):
        return pb.UploadFeaturesRequest(summary=site_summary_to_proto(item))
    if isinstance(item, FeatureChunk):
        return pb.UploadFeaturesRequest(chunk=feature_chunk_to_proto(item))
    raise TypeError(f"expected a SiteSummary or FeatureChunk, got {type(item).__name__}")


def upload_request_from_proto(message: pb.UploadFeaturesRequest) -> SiteSummary | FeatureChunk:
    """UploadFeaturesRequest -> SiteSummary or FeatureChunk; an empty body is rejected."""
    _check_type(message, pb.UploadFeaturesRequest)
    body = message.WhichOneof("body")
    if body == "summary":
        return site_summary_from_proto(message.summary)
    if body == "chunk":
        return feature_chunk_from_proto(message.chunk)
    raise InvalidMessageError("UploadFeaturesRequest has no body (neither summary nor chunk)")


# --- chunking ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """One encoded slice of a matrix and its stream position."""

    sequence: int
    row_offset: int
    last: bool
    features: EncodedMatrix


def split_into_chunks(
    features: NDArray[np.float32],
    *,
    config: CodecConfig,
    site_id: str,
    round: int,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> Iterator[FeatureChunk]:
    """Encode a site's upload ``features`` [n, D] float32 as FeatureChunks, lazily, in order.

    Each chunk holds the most rows whose decoded value payload fits ``max_chunk_bytes`` (see the
    module docstring); n = 0 gives one empty chunk with last = True. The whole matrix and the
    arguments are validated, and the first chunk encoded, before this returns, so a stream never
    breaks off half-way because of a bad value. Chunks are encoded from a view of ``features``:
    do not modify it while iterating. Raises InvalidMatrixError (and subclasses),
    InvalidMessageError or ValueError.
    """
    pieces = _split(features, config, max_chunk_bytes)

    def make(piece: _Piece) -> FeatureChunk:
        return FeatureChunk(
            site_id=site_id,
            round=round,
            sequence=piece.sequence,
            row_offset=piece.row_offset,
            last=piece.last,
            features=piece.features,
        )

    # The first chunk is built now so that site_id and round are validated before returning.
    first = make(next(pieces))

    def chunks() -> Iterator[FeatureChunk]:
        yield first
        yield from map(make, pieces)

    return chunks()


def split_bank_into_chunks(
    features: NDArray[np.float32],
    *,
    config: CodecConfig,
    round: int,
    server_coverage_radius: float,
    max_site_coverage_radius: float,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> Iterator[BankChunk]:
    """Encode the global bank ``features`` [n, D] float32 as BankChunks, lazily, in order.

    Same sizing and eager validation as split_into_chunks; every chunk carries both radii.
    """
    pieces = _split(features, config, max_chunk_bytes)

    def make(piece: _Piece) -> BankChunk:
        return BankChunk(
            round=round,
            sequence=piece.sequence,
            row_offset=piece.row_offset,
            last=piece.last,
            features=piece.features,
            server_coverage_radius=server_coverage_radius,
            max_site_coverage_radius=max_site_coverage_radius,
        )

    first = make(next(pieces))  # validates round and the radii before returning

    def chunks() -> Iterator[BankChunk]:
        yield first
        yield from map(make, pieces)

    return chunks()


def _split(
    features: NDArray[np.float32], config: CodecConfig, max_chunk_bytes: int
) -> Iterator[_Piece]:
    """Validate eagerly, then return a generator of encoded pieces (at least one)."""
    if not isinstance(config, CodecConfig):
        raise InvalidCodecConfigError(f"config must be a CodecConfig, got {type(config).__name__}")
    if (
        not isinstance(max_chunk_bytes, int)
        or isinstance(max_chunk_bytes, bool)
        or not 1 <= max_chunk_bytes <= MAX_CHUNK_BYTES_LIMIT
    ):
        raise ValueError(
            f"max_chunk_bytes must be an int in [1, {MAX_CHUNK_BYTES_LIMIT}], got "
            f"{max_chunk_bytes!r}"
        )
    matrix = validate_feature_matrix(features, config)
    rows, cols = matrix.shape
    step = _rows_per_chunk(cols, config.value_type, max_chunk_bytes)
    count = max(1, -(-rows // step))
    logger.debug(
        "splitting [%s, %s] into %s chunk(s) of <= %s rows (%s)", rows, cols, count, step,
        config.value_type,
    )

    def pieces() -> Iterator[_Piece]:
        for sequence in range(count):
            start = sequence * step
            block = matrix[start : start + step]
            yield _Piece(sequence, start, sequence == count - 1, encode_matrix(block, config))

    return pieces()


def chunked_roundtrip(
    features: NDArray[np.float32],
    *,
    config: CodecConfig,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> tuple[NDArray[np.float32], float]:
    """What a receiver decodes from ``features`` [n, D] sent as chunks, and the codec's error.

    Encodes and decodes chunk by chunk exactly as :func:`split_into_chunks` /
    :func:`split_bank_into_chunks` cut the matrix (int8/int4 quantisation parameters are per
    chunk, so the chunking is part of the result), so the returned rows equal, bit for bit, what
    the other side's :class:`ChunkAssembler` yields for the same ``config`` and
    ``max_chunk_bytes``.

    Returns:
        (decoded [n, D] float32, error): error is max_j ||features_j - decoded_j|| (Euclidean,
        computed in float64), 0.0 for n = 0. A coverage radius r measured on ``features`` holds
        for the decoded rows as r + error (triangle inequality): that is how sites and the
        server certify radii for the rows as decoded under a lossy codec.
    """
    matrix = validate_feature_matrix(features, config)
    decoded = np.empty(matrix.shape, dtype=np.float32)
    error = _roundtrip_error(matrix, config, max_chunk_bytes, decoded)
    return decoded, error


def codec_error(
    features: NDArray[np.float32],
    *,
    config: CodecConfig,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> float:
    """The error of :func:`chunked_roundtrip` without keeping the decoded rows: memory is one
    chunk, not another [n, D] matrix (a 100,000-row bank's is 400 MB the server never uses)."""
    return _roundtrip_error(validate_feature_matrix(features, config), config, max_chunk_bytes,
                            None)


def _roundtrip_error(
    matrix: NDArray[np.float32],
    config: CodecConfig,
    max_chunk_bytes: int,
    decoded: NDArray[np.float32] | None,
) -> float:
    """max_j ||matrix_j - decoded_j|| over the chunks as sent (float64, one chunk at a time);
    each chunk's decoded rows are written to ``decoded`` when given."""
    squared = 0.0
    for piece in _split(matrix, config, max_chunk_bytes):
        part = decode_matrix(piece.features, max_decoded_bytes=piece.features.decoded_size)
        rows = slice(piece.row_offset, piece.row_offset + part.shape[0])
        if decoded is not None:
            decoded[rows] = part
        if part.shape[0]:  # float64, one chunk at a time: no [n, D] float64 temporary
            difference = matrix[rows].astype(np.float64) - part
            squared = max(squared, float(np.einsum("ij,ij->i", difference, difference).max()))
    return math.sqrt(squared)


def _rows_per_chunk(cols: int, value_type: str, max_chunk_bytes: int) -> int:
    """Largest row count whose decoded payload fits max_chunk_bytes; ValueError if not one row."""
    one_row = decoded_size_for(1, cols, value_type)
    if one_row > max_chunk_bytes:
        raise ValueError(
            f"one row of {cols} {value_type} values needs {one_row} bytes, more than "
            f"max_chunk_bytes={max_chunk_bytes}"
        )
    if value_type == "int4":  # two values per byte: ceil(rows * cols / 2) <= max_chunk_bytes
        return (2 * max_chunk_bytes) // cols
    return max_chunk_bytes // one_row


# --- reassembly --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Received:
    """What identifies an accepted chunk, to recognise an identical resend without decoding."""

    row_offset: int
    last: bool
    rows: int
    cols: int
    value_type: str
    checksum: int
    # XXH64 of the encoded bytes (payload + quantisation parameters): a resend whose declared
    # fields match but whose bytes differ is decoded and verified like a first send.
    content_digest: int = dataclasses.field(default=0, compare=False)

    def __str__(self) -> str:
        return (f"rows {self.row_offset}..{self.row_offset + self.rows} x {self.cols} "
                f"{self.value_type}, checksum {self.checksum:#018x}"
                + (", last" if self.last else ""))


class ChunkAssembler:
    """Reassembles one chunk stream (one site's upload, or one global bank) into [rows, D].

    max_rows: the most rows the receiver accepts (bounds memory: the decoded parts are kept
        until ``result``, which concatenates them, so the peak is about 2 x rows x D x 4 bytes).
    expected_cols: when given, every chunk must have this many columns.
    max_decoded_bytes_per_chunk: bound passed to decode_matrix (a chunk's decoded payload).
    retain: keep decoded rows for ``result`` (default); False only tracks the stream's order,
        resends and bounds while :meth:`accept` hands each new chunk's rows to the caller.
    The first accepted chunk fixes the stream: its kind (FeatureChunk / BankChunk), its
    site_id and round (FeatureChunk) or round and radii (BankChunk), and D. Not thread-safe:
    one assembler per stream, fed by one thread.
    """

    def __init__(
        self,
        *,
        max_rows: int,
        expected_cols: int | None = None,
        max_decoded_bytes_per_chunk: int = MAX_CHUNK_BYTES_LIMIT,
        retain: bool = True,
    ) -> None:
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0:
            raise ValueError(f"max_rows must be an int >= 0, got {max_rows!r}")
        if expected_cols is not None and (
            not isinstance(expected_cols, int) or isinstance(expected_cols, bool)
            or expected_cols < 1
        ):
            raise ValueError(f"expected_cols must be None or an int >= 1, got {expected_cols!r}")
        if (
            not isinstance(max_decoded_bytes_per_chunk, int)
            or isinstance(max_decoded_bytes_per_chunk, bool)
            or max_decoded_bytes_per_chunk < 1
        ):
            raise ValueError(
                f"max_decoded_bytes_per_chunk must be an int >= 1, got "
                f"{max_decoded_bytes_per_chunk!r}"
            )
        self._max_rows = max_rows
        self._expected_cols = expected_cols
        self._cols = expected_cols
        self._max_decoded_bytes = max_decoded_bytes_per_chunk
        self._retain = retain
        self._first: FeatureChunk | BankChunk | None = None
        self._received: list[_Received] = []
        self._parts: list[NDArray[np.float32]] = []
        self._rows = 0
        self._complete = False

    @property
    def next_sequence(self) -> int:
        """Sequence number the sender should send next (where a retried upload resumes)."""
        return len(self._received)

    @property
    def rows_received(self) -> int:
        """Rows accepted so far."""
        return self._rows

    @property
    def complete(self) -> bool:
        """True once the chunk with last = True was accepted."""
        return self._complete

    @property
    def first_chunk(self) -> FeatureChunk | BankChunk | None:
        """The first accepted chunk (its site_id / round / radii describe the stream), or None."""
        return self._first

    def add(self, chunk: FeatureChunk | BankChunk) -> bool:
        """Accept ``chunk``; True if it was new, False for an identical resend (ignored).

        Raises ChunkOrderError, ChunkConflictError, UploadTooLargeError, or a CodecError if the
        matrix does not decode; on any error the assembler is left unchanged.
        """
        return self.accept(chunk) is not None

    def accept(self, chunk: FeatureChunk | BankChunk) -> NDArray[np.float32] | None:
        """Like :meth:`add`, but return the decoded rows [rows, D] of a new chunk (None for an
        identical resend). With ``retain=False`` this is how a streaming receiver (the server's
        incremental selector) consumes rows without the assembler keeping them."""
        if not isinstance(chunk, FeatureChunk | BankChunk):
            raise TypeError(
                f"chunk must be a FeatureChunk or BankChunk, got {type(chunk).__name__}"
            )
        self._check_same_stream(chunk)
        received = _Received(
            row_offset=chunk.row_offset,
            last=chunk.last,
            rows=chunk.features.rows,
            cols=chunk.features.cols,
            value_type=chunk.features.value_type,
            checksum=chunk.features.checksum,
            content_digest=_content_digest(chunk),
        )
        if chunk.sequence < len(self._received):
            first = self._received[chunk.sequence]
            if first != received:
                raise ChunkConflictError(
                    f"chunk {chunk.sequence} was resent with different content: first "
                    f"({first}), now ({received})"
                )
            if first.content_digest != received.content_digest:
                # Same declared fields, other bytes: verify them as a first send would be
                # (a payload that does not match its checksum is DATA_LOSS, not "identical").
                decode_matrix(chunk.features, max_decoded_bytes=self._max_decoded_bytes)
            logger.debug("ignoring identical resend of chunk %s", chunk.sequence)
            return None
        if self._complete:
            raise ChunkOrderError(
                f"chunk {chunk.sequence} arrived after the last chunk "
                f"({len(self._received) - 1}); the stream is complete"
            )
        if chunk.sequence > len(self._received):
            raise ChunkOrderError(
                f"expected chunk {len(self._received)}, got chunk {chunk.sequence}; chunks must "
                f"arrive in order (resend from {len(self._received)})"
            )
        if chunk.row_offset != self._rows:
            raise ChunkOrderError(
                f"chunk {chunk.sequence} has row_offset {chunk.row_offset}, expected {self._rows} "
                f"(the rows received so far)"
            )
        if chunk.features.rows == 0 and not (chunk.sequence == 0 and chunk.last):
            raise ChunkOrderError(
                f"chunk {chunk.sequence} is empty; only an empty stream's single chunk "
                f"(sequence 0, last) may be"
            )
        cols = self._cols if self._cols is not None else chunk.features.cols
        if chunk.features.cols != cols:
            raise ChunkConflictError(
                f"chunk {chunk.sequence} has {chunk.features.cols} columns, the stream has {cols}"
            )
        if self._rows + chunk.features.rows > self._max_rows:
            raise UploadTooLargeError(
                f"chunk {chunk.sequence} would bring the stream to "
                f"{self._rows + chunk.features.rows} rows, more than max_rows={self._max_rows}"
            )
        part = decode_matrix(chunk.features, max_decoded_bytes=self._max_decoded_bytes)
        # Everything checked: commit.
        if self._first is None:
            self._first = chunk
        self._cols = cols
        self._received.append(received)
        if self._retain:
            self._parts.append(part)
        self._rows += part.shape[0]
        self._complete = chunk.last
        return part

    def truncate(self, sequence: int) -> None:
        """Forget every chunk from ``sequence`` on, as if it had never been accepted.

        For a receiver whose own commit of those chunks failed after the assembler took them
        (the server's journal append): the stream then resumes from ``sequence``. Rows kept
        with ``retain=True`` are dropped with their chunks.
        """
        if not 0 <= sequence <= len(self._received):
            raise ValueError(
                f"cannot truncate to chunk {sequence}: {len(self._received)} chunk(s) accepted"
            )
        del self._received[sequence:]
        if self._retain:
            del self._parts[sequence:]
        self._rows = sum(r.rows for r in self._received)
        self._complete = bool(self._received) and self._received[-1].last
        if not self._received:
            self._first = None
            self._cols = self._expected_cols

    def result(self) -> NDArray[np.float32]:
        """The assembled matrix [rows_received, D] float32 (a new array on each call).

        Raises IncompleteUploadError before the last chunk was accepted.
        """
        if not self._retain:
            raise RuntimeError("this assembler was created with retain=False: it keeps no rows")
        if not self._complete:
            raise IncompleteUploadError(
                f"stream incomplete: {len(self._received)} chunk(s), {self._rows} rows received "
                f"and no chunk with last = True"
            )
        return np.concatenate(self._parts, axis=0)

    def _check_same_stream(self, chunk: FeatureChunk | BankChunk) -> None:
        first = self._first
        if first is None:
            return
        if type(chunk) is not type(first):
            raise ChunkConflictError(
                f"got a {type(chunk).__name__} in a stream of {type(first).__name__}s"
            )
        if _stream_key(chunk) != _stream_key(first):
            raise ChunkConflictError(
                f"chunk {chunk.sequence} belongs to another stream: {_stream_key(chunk)}, this "
                f"stream is {_stream_key(first)}"
            )


def assemble_chunks(
    chunks: Iterable[FeatureChunk | BankChunk],
    *,
    max_rows: int,
    expected_cols: int | None = None,
) -> NDArray[np.float32]:
    """Reassemble a complete stream (resends allowed) into [rows, D] float32.

    Raises IncompleteUploadError if the stream ends without its last chunk, and whatever
    ChunkAssembler.add raises.
    """
    assembler = ChunkAssembler(max_rows=max_rows, expected_cols=expected_cols)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.result()


def chunk_identity(chunk: FeatureChunk | BankChunk) -> tuple[object, ...]:
    """What makes two sends of a chunk the same chunk: position, shape, value type, declared
    checksum and the XXH64 of its encoded bytes. A receiver keeps this (a few dozen bytes)
    instead of the chunk to recognise a resend without decoding it."""
    features = chunk.features
    return (chunk.sequence, chunk.row_offset, chunk.last, features.rows, features.cols,
            features.value_type, features.checksum, _content_digest(chunk))


def _content_digest(chunk: FeatureChunk | BankChunk) -> int:
    """XXH64 over a chunk's encoded bytes (quantisation parameters, then payload)."""
    digest = xxhash.xxh64()
    digest.update(chunk.features.quant_scale)
    digest.update(chunk.features.quant_offset)
    digest.update(chunk.features.payload)
    return digest.intdigest()


def _stream_key(chunk: FeatureChunk | BankChunk) -> dict[str, object]:
    """Fields that must be equal in every chunk of one stream."""
    if isinstance(chunk, FeatureChunk):
        return {"site_id": chunk.site_id, "round": chunk.round}
    return {
        "round": chunk.round,
        "server_coverage_radius": chunk.server_coverage_radius,
        "max_site_coverage_radius": chunk.max_site_coverage_radius,
    }


# --- helpers -----------------------------------------------------------------------------------


def _check_type(message: object, expected: type) -> None:
    if not isinstance(message, expected):
        raise TypeError(
            f"expected a {expected.__module__}.{expected.__name__}, got "
            f"{type(message).__module__}.{type(message).__name__}"
        )


def _require_field(message: object, field_name: str, kind: str) -> None:
    if not message.HasField(field_name):  # type: ignore[attr-defined]
        raise InvalidMessageError(f"{kind}.{field_name} is required but not set")


def _enum_name(
    field_name: str, code: int, names: dict[int, str], error: type[ValueError]
) -> str:
    """Wire enum number -> codec name; UNSPECIFIED (0) and unknown numbers raise ``error``."""
    if code == 0:
        raise error(f"{field_name} is UNSPECIFIED (0); the sender must set it")
    if code not in names:
        raise error(f"{field_name} has unknown enum value {code}; known: {sorted(names)}")
    return names[code]
