"""Domain twins of the fedpatchcore.v1 wire messages: FeatureChunk, SiteSummary, BankChunk.

Frozen dataclasses validated on construction, so a message that exists is well-formed; the field
meanings, units and limits are those documented in protos/fedpatchcore/v1/features.proto.
``core.serde`` converts them to and from the generated protobuf classes; this module imports
neither protobuf nor grpc. The matrix field is a ``core.codec.EncodedMatrix`` (still
compressed): decoding is the receiver's decision, with its own size bound.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from core.codec import CodecConfig, EncodedMatrix

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_SITE_ID_BYTES",
    "BankChunk",
    "FeatureChunk",
    "InvalidMessageError",
    "SiteSummary",
]

# Site ids end up in logs, file names and metric labels; 256 bytes is plenty for a name or UUID.
MAX_SITE_ID_BYTES: Final[int] = 256
_UINT32_MAX: Final[int] = 2**32 - 1
_UINT64_MAX: Final[int] = 2**64 - 1


class InvalidMessageError(ValueError):
    """A message field is missing, out of range or inconsistent (the message names the field)."""


@dataclass(frozen=True)
class FeatureChunk:
    """Site -> server upload unit: rows [row_offset, row_offset + features.rows) of the upload.

    site_id: non-empty, <= MAX_SITE_ID_BYTES of UTF-8. round: uint32, from 1.
    sequence: 0-based position in this site's upload for this round (idempotent resends).
    row_offset: first row of this chunk within the upload. last: True on the final chunk only.
    features: the encoded rows [features.rows, D].
    """

    site_id: str
    round: int
    sequence: int
    row_offset: int
    last: bool
    features: EncodedMatrix

    def __post_init__(self) -> None:
        _check_site_id("FeatureChunk.site_id", self.site_id)
        _check_uint("FeatureChunk.round", self.round, _UINT32_MAX, minimum=1)
        _check_position("FeatureChunk", self.sequence, self.row_offset, self.last, self.features)


@dataclass(frozen=True)
class SiteSummary:
    """Site -> server, once per round: what the site uploads and how it was produced.

    round >= 1. num_images >= 1 training images; num_patches >= coreset_rows training patch
    vectors; coreset_rows rows uploaded this round (>= 1 in round 1, may be 0 later: no novel
    patches). coverage_radius: r_i, the largest Euclidean distance from
    any of the site's training patches to its coreset (original feature space), finite >= 0.
    feature_dim: D >= 1. backbone / layers: the feature extractor (e.g. "wide_resnet50_2",
    ("layer2", "layer3")); layers may be given as any sequence of str and is stored as a tuple.
    codec: the CodecConfig of the site's chunks. feature_fingerprint: 64 lowercase hex chars
    (SHA-256 of the full feature-extraction config, see FeatureConfig.fingerprint).
    """

    site_id: str
    round: int
    num_images: int
    num_patches: int
    coreset_rows: int
    coverage_radius: float
    feature_dim: int
    backbone: str
    layers: tuple[str, ...]
    codec: CodecConfig
    feature_fingerprint: str

    def __post_init__(self) -> None:
        _check_site_id("SiteSummary.site_id", self.site_id)
        _check_uint("SiteSummary.round", self.round, _UINT32_MAX, minimum=1)
        _check_uint("SiteSummary.num_images", self.num_images, _UINT64_MAX, minimum=1)
        _check_uint(
            "SiteSummary.coreset_rows",
            self.coreset_rows,
            _UINT64_MAX,
            minimum=1 if self.round == 1 else 0,
        )
        _check_uint(
            "SiteSummary.num_patches", self.num_patches, _UINT64_MAX, minimum=self.coreset_rows
        )
        _check_radius("SiteSummary.coverage_radius", self.coverage_radius)
        _check_uint("SiteSummary.feature_dim", self.feature_dim, _UINT32_MAX, minimum=1)
        _check_name("SiteSummary.backbone", self.backbone)
        layers = self.layers
        if isinstance(layers, str) or not isinstance(layers, Sequence):
            raise InvalidMessageError(
                f"SiteSummary.layers must be a sequence of str, got {type(layers).__name__}"
            )
        if not layers:
            raise InvalidMessageError("SiteSummary.layers must name at least one layer, got none")
        for index, layer in enumerate(layers):
            _check_name(f"SiteSummary.layers[{index}]", layer)
        # Normalise to a tuple so the dataclass stays immutable and hashable.
        object.__setattr__(self, "layers", tuple(layers))
        if not isinstance(self.codec, CodecConfig):
            raise InvalidMessageError(
                f"SiteSummary.codec must be a CodecConfig, got {type(self.codec).__name__}"
            )
        fingerprint = self.feature_fingerprint
        if (
            not isinstance(fingerprint, str)
            or len(fingerprint) != 64
            or any(c not in "0123456789abcdef" for c in fingerprint)
        ):
            raise InvalidMessageError(
                "SiteSummary.feature_fingerprint must be 64 lowercase hex characters, got "
                f"{fingerprint!r}"
            )


@dataclass(frozen=True)
class BankChunk:
    """Server -> sites unit of the global bank: rows [row_offset, row_offset + features.rows).

    round: uint32, from 1. sequence / row_offset / last: as in FeatureChunk. features: encoded rows.
    server_coverage_radius: r_S, largest distance from any uploaded coreset row to the global
        bank (original feature space), >= 0; +inf when the strategy certifies nothing (random
        sampling).
    max_site_coverage_radius: max_i r_i over the merged sites, finite >= 0.
    Both radii are the same in every chunk of one bank.
    """

    round: int
    sequence: int
    row_offset: int
    last: bool
    features: EncodedMatrix
    server_coverage_radius: float
    max_site_coverage_radius: float

    def __post_init__(self) -> None:
        _check_uint("BankChunk.round", self.round, _UINT32_MAX, minimum=1)
        _check_position("BankChunk", self.sequence, self.row_offset, self.last, self.features)
        _check_radius(
            "BankChunk.server_coverage_radius", self.server_coverage_radius, allow_inf=True
        )
        _check_radius("BankChunk.max_site_coverage_radius", self.max_site_coverage_radius)

    @property
    def certificate_radius(self) -> float:
        """max_i r_i + r_S: every training patch of every merged site lies this close to the bank.

        By the triangle inequality (patch -> its site coreset row -> that row's nearest bank
        row), so a 1-NN anomaly score exceeds full-memory-bank PatchCore's by at most this much.
        Derived, hence not sent on the wire.
        """
        return self.max_site_coverage_radius + self.server_coverage_radius


def _check_uint(name: str, value: object, maximum: int, *, minimum: int = 0) -> None:
    """Raise InvalidMessageError unless ``value`` is an int (not bool) in [minimum, maximum]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidMessageError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidMessageError(f"{name} must be in [{minimum}, {maximum}], got {value}")


def _check_name(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidMessageError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidMessageError(f"{name} must be a non-empty name, got {value!r}")


def _check_site_id(name: str, value: object) -> None:
    _check_name(name, value)
    assert isinstance(value, str)  # checked by _check_name
    size = len(value.encode("utf-8"))
    if size > MAX_SITE_ID_BYTES:
        raise InvalidMessageError(
            f"{name} must be at most {MAX_SITE_ID_BYTES} bytes of UTF-8, got {size}"
        )


def _check_radius(name: str, value: object, *, allow_inf: bool = False) -> None:
    if not isinstance(value, float | int) or isinstance(value, bool):
        raise InvalidMessageError(f"{name} must be a float, got {type(value).__name__}")
    if math.isnan(value) or value < 0 or (math.isinf(value) and not allow_inf):
        expected = ">= 0 (inf allowed)" if allow_inf else "finite and >= 0"
        raise InvalidMessageError(f"{name} must be {expected}, got {value!r}")


def _check_position(
    kind: str, sequence: object, row_offset: object, last: object, features: object
) -> None:
    """Checks shared by FeatureChunk and BankChunk: stream position fields and the matrix."""
    _check_uint(f"{kind}.sequence", sequence, _UINT64_MAX)
    _check_uint(f"{kind}.row_offset", row_offset, _UINT64_MAX)
    if not isinstance(last, bool):
        raise InvalidMessageError(f"{kind}.last must be a bool, got {type(last).__name__}")
    if not isinstance(features, EncodedMatrix):
        raise InvalidMessageError(
            f"{kind}.features must be an EncodedMatrix, got {type(features).__name__}"
        )
    assert isinstance(row_offset, int)  # checked above
    if row_offset + features.rows > _UINT64_MAX:
        raise InvalidMessageError(
            f"{kind}.row_offset + features.rows must fit in uint64, got {row_offset} + "
            f"{features.rows}"
        )
