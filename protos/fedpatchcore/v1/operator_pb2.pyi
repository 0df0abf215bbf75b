from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AddSiteRequest(_message.Message):
    __slots__ = ("site_id",)
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    def __init__(self, site_id: _Optional[str] = ...) -> None: ...

class AddSiteResponse(_message.Message):
    __slots__ = ("site_id", "token", "joins_round")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    JOINS_ROUND_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    token: str
    joins_round: int
    def __init__(self, site_id: _Optional[str] = ..., token: _Optional[str] = ..., joins_round: _Optional[int] = ...) -> None: ...

class RevokeSiteRequest(_message.Message):
    __slots__ = ("site_id",)
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    def __init__(self, site_id: _Optional[str] = ...) -> None: ...

class RevokeSiteResponse(_message.Message):
    __slots__ = ("site_id", "message")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    message: str
    def __init__(self, site_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class WithdrawSiteRequest(_message.Message):
    __slots__ = ("site_id",)
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    def __init__(self, site_id: _Optional[str] = ...) -> None: ...

class SiteDelta(_message.Message):
    __slots__ = ("site_id", "have_version", "delta_bytes", "full_bytes", "rows_removed", "rows_added")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DELTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    FULL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROWS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    ROWS_ADDED_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    have_version: int
    delta_bytes: int
    full_bytes: int
    rows_removed: int
    rows_added: int
    def __init__(self, site_id: _Optional[str] = ..., have_version: _Optional[int] = ..., delta_bytes: _Optional[int] = ..., full_bytes: _Optional[int] = ..., rows_removed: _Optional[int] = ..., rows_added: _Optional[int] = ...) -> None: ...

class WithdrawSiteResponse(_message.Message):
    __slots__ = ("site_id", "rows_removed_from_journal", "rows_removed_from_bank", "bank_version_before", "bank_version_after", "versions_deleted", "versions_redacted", "journal_bytes_before", "journal_bytes_after", "deltas", "message")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_REMOVED_FROM_JOURNAL_FIELD_NUMBER: _ClassVar[int]
    ROWS_REMOVED_FROM_BANK_FIELD_NUMBER: _ClassVar[int]
    BANK_VERSION_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BANK_VERSION_AFTER_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_DELETED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_REDACTED_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    rows_removed_from_journal: int
    rows_removed_from_bank: int
    bank_version_before: int
    bank_version_after: int
    versions_deleted: _containers.RepeatedScalarFieldContainer[int]
    versions_redacted: _containers.RepeatedScalarFieldContainer[int]
    journal_bytes_before: int
    journal_bytes_after: int
    deltas: _containers.RepeatedCompositeFieldContainer[SiteDelta]
    message: str
    def __init__(self, site_id: _Optional[str] = ..., rows_removed_from_journal: _Optional[int] = ..., rows_removed_from_bank: _Optional[int] = ..., bank_version_before: _Optional[int] = ..., bank_version_after: _Optional[int] = ..., versions_deleted: _Optional[_Iterable[int]] = ..., versions_redacted: _Optional[_Iterable[int]] = ..., journal_bytes_before: _Optional[int] = ..., journal_bytes_after: _Optional[int] = ..., deltas: _Optional[_Iterable[_Union[SiteDelta, _Mapping]]] = ..., message: _Optional[str] = ...) -> None: ...

class OpenRoundRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenRoundResponse(_message.Message):
    __slots__ = ("round", "expected_sites")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SITES_FIELD_NUMBER: _ClassVar[int]
    round: int
    expected_sites: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., expected_sites: _Optional[_Iterable[str]] = ...) -> None: ...

class ListSitesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiteEntry(_message.Message):
    __slots__ = ("site_id", "state", "rounds")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    state: str
    rounds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, site_id: _Optional[str] = ..., state: _Optional[str] = ..., rounds: _Optional[_Iterable[int]] = ...) -> None: ...

class ListSitesResponse(_message.Message):
    __slots__ = ("sites", "current_round", "phase", "bank_version")
    SITES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BANK_VERSION_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SiteEntry]
    current_round: int
    phase: str
    bank_version: int
    def __init__(self, sites: _Optional[_Iterable[_Union[SiteEntry, _Mapping]]] = ..., current_round: _Optional[int] = ..., phase: _Optional[str] = ..., bank_version: _Optional[int] = ...) -> None: ...
