from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValueType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALUE_TYPE_UNSPECIFIED: _ClassVar[ValueType]
    VALUE_TYPE_FLOAT32: _ClassVar[ValueType]
    VALUE_TYPE_FLOAT16: _ClassVar[ValueType]
    VALUE_TYPE_BFLOAT16: _ClassVar[ValueType]
    VALUE_TYPE_INT8: _ClassVar[ValueType]
    VALUE_TYPE_INT4: _ClassVar[ValueType]

class ChecksumType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKSUM_TYPE_UNSPECIFIED: _ClassVar[ChecksumType]
    CHECKSUM_TYPE_XXH64: _ClassVar[ChecksumType]
VALUE_TYPE_UNSPECIFIED: ValueType
VALUE_TYPE_FLOAT32: ValueType
VALUE_TYPE_FLOAT16: ValueType
VALUE_TYPE_BFLOAT16: ValueType
VALUE_TYPE_INT8: ValueType
VALUE_TYPE_INT4: ValueType
CHECKSUM_TYPE_UNSPECIFIED: ChecksumType
CHECKSUM_TYPE_XXH64: ChecksumType

class CodecConfig(_message.Message):
    __slots__ = ("value_type", "byte_shuffle", "zstd_level", "checksum_type")
    VALUE_TYPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    ZSTD_LEVEL_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_TYPE_FIELD_NUMBER: _ClassVar[int]
    value_type: ValueType
    byte_shuffle: bool
    zstd_level: int
    checksum_type: ChecksumType
    def __init__(self, value_type: _Optional[_Union[ValueType, str]] = ..., byte_shuffle: _Optional[bool] = ..., zstd_level: _Optional[int] = ..., checksum_type: _Optional[_Union[ChecksumType, str]] = ...) -> None: ...

class EncodedMatrix(_message.Message):
    __slots__ = ("rows", "cols", "value_type", "byte_shuffle", "zstd_level", "decoded_size", "quant_scale", "quant_offset", "checksum_type", "checksum", "payload")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUE_TYPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    ZSTD_LEVEL_FIELD_NUMBER: _ClassVar[int]
    DECODED_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUANT_SCALE_FIELD_NUMBER: _ClassVar[int]
    QUANT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_TYPE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    value_type: ValueType
    byte_shuffle: bool
    zstd_level: int
    decoded_size: int
    quant_scale: bytes
    quant_offset: bytes
    checksum_type: ChecksumType
    checksum: int
    payload: bytes
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., value_type: _Optional[_Union[ValueType, str]] = ..., byte_shuffle: _Optional[bool] = ..., zstd_level: _Optional[int] = ..., decoded_size: _Optional[int] = ..., quant_scale: _Optional[bytes] = ..., quant_offset: _Optional[bytes] = ..., checksum_type: _Optional[_Union[ChecksumType, str]] = ..., checksum: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class FeatureChunk(_message.Message):
    __slots__ = ("site_id", "round", "sequence", "row_offset", "last", "features")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round: int
    sequence: int
    row_offset: int
    last: bool
    features: EncodedMatrix
    def __init__(self, site_id: _Optional[str] = ..., round: _Optional[int] = ..., sequence: _Optional[int] = ..., row_offset: _Optional[int] = ..., last: _Optional[bool] = ..., features: _Optional[_Union[EncodedMatrix, _Mapping]] = ...) -> None: ...

class SiteSummary(_message.Message):
    __slots__ = ("site_id", "round", "num_images", "num_patches", "coreset_rows", "coverage_radius", "feature_dim", "backbone", "layers", "codec", "feature_fingerprint")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_PATCHES_FIELD_NUMBER: _ClassVar[int]
    CORESET_ROWS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_RADIUS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round: int
    num_images: int
    num_patches: int
    coreset_rows: int
    coverage_radius: float
    feature_dim: int
    backbone: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    codec: CodecConfig
    feature_fingerprint: str
    def __init__(self, site_id: _Optional[str] = ..., round: _Optional[int] = ..., num_images: _Optional[int] = ..., num_patches: _Optional[int] = ..., coreset_rows: _Optional[int] = ..., coverage_radius: _Optional[float] = ..., feature_dim: _Optional[int] = ..., backbone: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., codec: _Optional[_Union[CodecConfig, _Mapping]] = ..., feature_fingerprint: _Optional[str] = ...) -> None: ...

class BankChunk(_message.Message):
    __slots__ = ("round", "sequence", "row_offset", "last", "features", "server_coverage_radius", "max_site_coverage_radius")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SERVER_COVERAGE_RADIUS_FIELD_NUMBER: _ClassVar[int]
    MAX_SITE_COVERAGE_RADIUS_FIELD_NUMBER: _ClassVar[int]
    round: int
    sequence: int
    row_offset: int
    last: bool
    features: EncodedMatrix
    server_coverage_radius: float
    max_site_coverage_radius: float
    def __init__(self, round: _Optional[int] = ..., sequence: _Optional[int] = ..., row_offset: _Optional[int] = ..., last: _Optional[bool] = ..., features: _Optional[_Union[EncodedMatrix, _Mapping]] = ..., server_coverage_radius: _Optional[float] = ..., max_site_coverage_radius: _Optional[float] = ...) -> None: ...

class UploadFeaturesRequest(_message.Message):
    __slots__ = ("summary", "chunk")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    summary: SiteSummary
    chunk: FeatureChunk
    def __init__(self, summary: _Optional[_Union[SiteSummary, _Mapping]] = ..., chunk: _Optional[_Union[FeatureChunk, _Mapping]] = ...) -> None: ...
