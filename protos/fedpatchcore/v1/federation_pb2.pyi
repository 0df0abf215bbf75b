import datetime

from fedpatchcore.v1 import features_pb2 as _features_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_COLLECTING: _ClassVar[RoundState]
    ROUND_STATE_SELECTING: _ClassVar[RoundState]
    ROUND_STATE_READY: _ClassVar[RoundState]
    ROUND_STATE_FAILED: _ClassVar[RoundState]
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_COLLECTING: RoundState
ROUND_STATE_SELECTING: RoundState
ROUND_STATE_READY: RoundState
ROUND_STATE_FAILED: RoundState

class JoinRoundRequest(_message.Message):
    __slots__ = ("site_id", "feature_fingerprint")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    feature_fingerprint: str
    def __init__(self, site_id: _Optional[str] = ..., feature_fingerprint: _Optional[str] = ...) -> None: ...

class JoinRoundResponse(_message.Message):
    __slots__ = ("config", "upload", "status")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    config: RoundConfig
    upload: UploadStatus
    status: RoundStatus
    def __init__(self, config: _Optional[_Union[RoundConfig, _Mapping]] = ..., upload: _Optional[_Union[UploadStatus, _Mapping]] = ..., status: _Optional[_Union[RoundStatus, _Mapping]] = ...) -> None: ...

class FeatureExtractor(_message.Message):
    __slots__ = ("backbone", "layers", "pretrained", "pretrain_embed_dim", "target_embed_dim", "patch_size", "resize", "crop", "init_seed")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    PRETRAIN_EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    TARGET_EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    INIT_SEED_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    pretrained: bool
    pretrain_embed_dim: int
    target_embed_dim: int
    patch_size: int
    resize: _containers.RepeatedScalarFieldContainer[int]
    crop: int
    init_seed: int
    def __init__(self, backbone: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., pretrained: _Optional[bool] = ..., pretrain_embed_dim: _Optional[int] = ..., target_embed_dim: _Optional[int] = ..., patch_size: _Optional[int] = ..., resize: _Optional[_Iterable[int]] = ..., crop: _Optional[int] = ..., init_seed: _Optional[int] = ...) -> None: ...

class RoundConfig(_message.Message):
    __slots__ = ("round", "feature_fingerprint", "extractor", "codec", "max_chunk_bytes", "global_bank_size", "max_rows_per_site", "feature_dim", "deadline", "expected_sites", "quorum", "novelty_threshold", "base_bank_version", "federation_id", "full_coreset")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BANK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_SITE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SITES_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    NOVELTY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BASE_BANK_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    FULL_CORESET_FIELD_NUMBER: _ClassVar[int]
    round: int
    feature_fingerprint: str
    extractor: FeatureExtractor
    codec: _features_pb2.CodecConfig
    max_chunk_bytes: int
    global_bank_size: int
    max_rows_per_site: int
    feature_dim: int
    deadline: _timestamp_pb2.Timestamp
    expected_sites: int
    quorum: int
    novelty_threshold: float
    base_bank_version: int
    federation_id: str
    full_coreset: bool
    def __init__(self, round: _Optional[int] = ..., feature_fingerprint: _Optional[str] = ..., extractor: _Optional[_Union[FeatureExtractor, _Mapping]] = ..., codec: _Optional[_Union[_features_pb2.CodecConfig, _Mapping]] = ..., max_chunk_bytes: _Optional[int] = ..., global_bank_size: _Optional[int] = ..., max_rows_per_site: _Optional[int] = ..., feature_dim: _Optional[int] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expected_sites: _Optional[int] = ..., quorum: _Optional[int] = ..., novelty_threshold: _Optional[float] = ..., base_bank_version: _Optional[int] = ..., federation_id: _Optional[str] = ..., full_coreset: _Optional[bool] = ...) -> None: ...

class QueryUploadStatusRequest(_message.Message):
    __slots__ = ("site_id", "round")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round: int
    def __init__(self, site_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class QueryUploadStatusResponse(_message.Message):
    __slots__ = ("upload",)
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    upload: UploadStatus
    def __init__(self, upload: _Optional[_Union[UploadStatus, _Mapping]] = ...) -> None: ...

class UploadStatus(_message.Message):
    __slots__ = ("site_id", "round", "summary_committed", "committed_sequence", "committed_rows", "complete")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROWS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round: int
    summary_committed: bool
    committed_sequence: int
    committed_rows: int
    complete: bool
    def __init__(self, site_id: _Optional[str] = ..., round: _Optional[int] = ..., summary_committed: _Optional[bool] = ..., committed_sequence: _Optional[int] = ..., committed_rows: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class UploadFeaturesResponse(_message.Message):
    __slots__ = ("upload", "chunks_accepted", "chunks_ignored")
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_IGNORED_FIELD_NUMBER: _ClassVar[int]
    upload: UploadStatus
    chunks_accepted: int
    chunks_ignored: int
    def __init__(self, upload: _Optional[_Union[UploadStatus, _Mapping]] = ..., chunks_accepted: _Optional[int] = ..., chunks_ignored: _Optional[int] = ...) -> None: ...

class DownloadBankRequest(_message.Message):
    __slots__ = ("site_id", "version", "have_version")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    version: int
    have_version: int
    def __init__(self, site_id: _Optional[str] = ..., version: _Optional[int] = ..., have_version: _Optional[int] = ...) -> None: ...

class DownloadBankResponse(_message.Message):
    __slots__ = ("header", "removed", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: BankHeader
    removed: RemovedRows
    chunk: _features_pb2.BankChunk
    def __init__(self, header: _Optional[_Union[BankHeader, _Mapping]] = ..., removed: _Optional[_Union[RemovedRows, _Mapping]] = ..., chunk: _Optional[_Union[_features_pb2.BankChunk, _Mapping]] = ...) -> None: ...

class BankHeader(_message.Message):
    __slots__ = ("version", "round", "base_version", "total_rows", "feature_dim", "rows_in_stream", "rows_removed", "bank_checksum", "server_coverage_radius", "max_site_coverage_radius", "value_type", "federation_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_IN_STREAM_FIELD_NUMBER: _ClassVar[int]
    ROWS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BANK_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SERVER_COVERAGE_RADIUS_FIELD_NUMBER: _ClassVar[int]
    MAX_SITE_COVERAGE_RADIUS_FIELD_NUMBER: _ClassVar[int]
    VALUE_TYPE_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    round: int
    base_version: int
    total_rows: int
    feature_dim: int
    rows_in_stream: int
    rows_removed: int
    bank_checksum: int
    server_coverage_radius: float
    max_site_coverage_radius: float
    value_type: _features_pb2.ValueType
    federation_id: str
    def __init__(self, version: _Optional[int] = ..., round: _Optional[int] = ..., base_version: _Optional[int] = ..., total_rows: _Optional[int] = ..., feature_dim: _Optional[int] = ..., rows_in_stream: _Optional[int] = ..., rows_removed: _Optional[int] = ..., bank_checksum: _Optional[int] = ..., server_coverage_radius: _Optional[float] = ..., max_site_coverage_radius: _Optional[float] = ..., value_type: _Optional[_Union[_features_pb2.ValueType, str]] = ..., federation_id: _Optional[str] = ...) -> None: ...

class RemovedRows(_message.Message):
    __slots__ = ("indices",)
    INDICES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, indices: _Optional[_Iterable[int]] = ...) -> None: ...

class WatchRoundRequest(_message.Message):
    __slots__ = ("site_id", "round", "min_interval_ms")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    round: int
    min_interval_ms: int
    def __init__(self, site_id: _Optional[str] = ..., round: _Optional[int] = ..., min_interval_ms: _Optional[int] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round", "state", "sites_expected", "quorum", "sites_joined", "sites_complete", "rows_received", "deadline", "bank_version", "bank_rows", "message", "global_bank_size")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SITES_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    SITES_JOINED_FIELD_NUMBER: _ClassVar[int]
    SITES_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    ROWS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    BANK_VERSION_FIELD_NUMBER: _ClassVar[int]
    BANK_ROWS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BANK_SIZE_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: RoundState
    sites_expected: int
    quorum: int
    sites_joined: int
    sites_complete: int
    rows_received: int
    deadline: _timestamp_pb2.Timestamp
    bank_version: int
    bank_rows: int
    message: str
    global_bank_size: int
    def __init__(self, round: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., sites_expected: _Optional[int] = ..., quorum: _Optional[int] = ..., sites_joined: _Optional[int] = ..., sites_complete: _Optional[int] = ..., rows_received: _Optional[int] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., bank_version: _Optional[int] = ..., bank_rows: _Optional[int] = ..., message: _Optional[str] = ..., global_bank_size: _Optional[int] = ...) -> None: ...
