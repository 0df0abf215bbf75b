"""The state directory: an append-only journal of what the server accepted, and bank versions.

Layout::

    STATE_DIR/journal.log          records, appended; fsync'ed before a chunk is acknowledged
    STATE_DIR/banks/v000001.npy    bank version 1, float32 [rows, D] (np.save, no pickle)
    STATE_DIR/banks/v000001.json   its metadata (round, radii, checksum, ...)

Why an append-only log and not sqlite in WAL mode: what must be durable is a sequence of
~1 MiB blobs (the serialized upload messages themselves, so a replay feeds the aggregator
exactly the bytes it saw), written once, read back only at start, in order. A log writes each
byte once and syncs it with one fsync; sqlite would store each blob in overflow pages, write it
twice (WAL, then checkpoint) and add a query layer this access pattern never uses. What the log
must handle itself, it does: every record carries its length and an XXH64 checksum, so a torn
last record (a crash mid-append, never acknowledged) is detected and cut off at start, while a
damaged record before the tail stops the server (JournalCorruptError) instead of silently
dropping acknowledged data.

Record: ``<u32 length> <u8 kind> <u64 xxh64(payload)> <u32 xxh32(the 13 bytes before)>
<payload>``, little-endian; the file starts with the 8-byte magic ``FPCJRNL1``. The header's own
checksum tells a torn append (a short header, or a valid header whose payload runs to or past
the end of the file) from a damaged length field, which must not be mistaken for a tail.
Kinds: ROUND_OPENED / ROUND_CUTOFF / ROUND_CLOSED / ROUND_FAILED (JSON payloads), SUMMARY /
CHUNK (serialized fedpatchcore.v1.UploadFeaturesRequest).

Permissions: the state directory and ``banks/`` are created (or tightened to) mode 0700 and
every file in them is created 0600 whatever the umask: the journal holds every site's features.

A failed append (disk full, I/O error, directory made unwritable) raises OSError after cutting
the file back to where the record began, so the log never keeps a partial record in its middle
(a later, successful append after it would otherwise make the damage look like corruption of
acknowledged data at the next start). If even that cut fails, the journal refuses every later
append (``JournalBrokenError``) until the server is restarted and repairs the tail.

Not thread-safe: the caller (fedserver.federation) serialises appends under its lock.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import xxhash

logger = logging.getLogger(__name__)

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "BankVersion",
    "Journal",
    "JournalBrokenError",
    "JournalCorruptError",
    "Record",
    "RecordKind",
    "write_private",
]

MAGIC: Final[bytes] = b"FPCJRNL1"
_HEADER: Final[struct.Struct] = struct.Struct("<IBQI")
_HEADER_BODY: Final[int] = 13  # bytes the header checksum covers
#: A record larger than this is not something this server wrote (chunks are < 4 MiB).
MAX_RECORD_BYTES: Final[int] = 64 << 20
#: Owner-only permissions of the state directory's folders and files.
DIR_MODE: Final[int] = 0o700
FILE_MODE: Final[int] = 0o600


class JournalCorruptError(RuntimeError):
    """A journal record before the last one is damaged: acknowledged data cannot be trusted."""


class JournalBrokenError(OSError):
    """An earlier append failed and its partial record could not be cut off: no more appends."""


class RecordKind(enum.IntEnum):
    """What a journal record holds."""

    ROUND_OPENED = 1
    SUMMARY = 2
    CHUNK = 3
    ROUND_CUTOFF = 4
    ROUND_CLOSED = 5
    ROUND_FAILED = 6


@dataclass(frozen=True)
class Record:
    """One journal record: its kind and payload bytes."""

    kind: RecordKind
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload of a JSON record kind, parsed."""
        value = json.loads(self.payload)
        if not isinstance(value, dict):
            raise JournalCorruptError(f"{self.kind.name} record is not a JSON object")
        return value


@dataclass(frozen=True)
class BankVersion:
    """A stored global bank and what describes it.

    bank: [rows, D] float32, in the stable order deltas rely on (fedserver.federation).
    meta: round, version, server_radius, max_site_radius, checksum (see BankHeader).
    """

    version: int
    bank: np.ndarray
    meta: dict[str, Any]


class Journal:
    """Append-only record log plus bank version files under ``state_dir``.

    Args:
        state_dir: created if missing.
        fsync: fsync after every append (the durability promise); False only for tests that
            measure nothing about durability.
    """

    def __init__(self, state_dir: Path, *, fsync: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.bank_dir = self.state_dir / "banks"
        _private_dir(self.state_dir)
        _private_dir(self.bank_dir)
        self.path = self.state_dir / "journal.log"
        self._fsync = fsync
        self.records_at_open = self._read_and_repair()
        # Unbuffered: a failed write leaves nothing in a Python buffer to be flushed later.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        self._file = os.fdopen(fd, "ab", buffering=0)
        self._broken: str | None = None
        if self._file.seek(0, os.SEEK_END) == 0:
            self._write_all(MAGIC)
            self._sync()
            _fsync_dir(self.state_dir)
        self.bytes_written = 0

    def records(self) -> Iterator[Record]:
        """Every record on disk, in append order, read one at a time (replay at start, and the
        rebuild after a round's cutoff). Call between appends, from the appending thread."""
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            handle.seek(len(MAGIC))
            for record, end in _parse(handle, size):
                if record is None:
                    raise JournalCorruptError(f"{self.path}: record at byte {end} is damaged")
                yield record

    def append(self, kind: RecordKind, payload: bytes) -> None:
        """Append one record and (with fsync) make it durable before returning.

        Raises OSError when it could not (the file is then as before the call; module
        docstring), JournalBrokenError after an append whose damage could not be undone.
        """
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
        if self._broken is not None:
            raise JournalBrokenError(
                f"journal {self.path} refuses appends after an earlier failure ({self._broken}); "
                "restart the server to repair it"
            )
        body = struct.pack("<IBQ", len(payload), int(kind), xxhash.xxh64_intdigest(payload))
        header = body + struct.pack("<I", xxhash.xxh32_intdigest(body))
        start = self._file.seek(0, os.SEEK_END)
        try:
            self._write_all(header)
            self._write_all(payload)
            self._sync()
        except OSError as error:
            self._undo(start, error)
            raise
        self.bytes_written += len(header) + len(payload)

    def append_json(self, kind: RecordKind, value: dict[str, Any]) -> None:
        """Append a JSON record (round lifecycle events)."""
        self.append(kind, json.dumps(value, sort_keys=True).encode("utf-8"))

    def close(self) -> None:
        if not self._file.closed:
            try:
                if self._broken is None:
                    self._sync()
            finally:
                self._file.close()

    # -- bank versions --------------------------------------------------------------------

    def save_bank(self, version: int, bank: np.ndarray, meta: dict[str, Any]) -> None:
        """Write bank version ``version`` atomically (temp file, fsync, rename, fsync dir)."""
        stem = self.bank_dir / f"v{version:06d}"
        array = np.ascontiguousarray(bank, dtype=np.float32)
        tmp = stem.with_suffix(".npy.tmp")
        with _open_private(tmp) as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, stem.with_suffix(".npy"))
        tmp_meta = stem.with_suffix(".json.tmp")
        with _open_private(tmp_meta) as handle:
            handle.write(json.dumps({**meta, "version": version, "rows": int(array.shape[0])},
                                    sort_keys=True).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_meta, stem.with_suffix(".json"))
        _fsync_dir(self.bank_dir)
        logger.info("saved bank version %d (%d rows) to %s", version, array.shape[0], stem)

    def load_bank(self, version: int) -> BankVersion:
        """Read a stored version; FileNotFoundError if there is none."""
        stem = self.bank_dir / f"v{version:06d}"
        bank = np.load(stem.with_suffix(".npy"), allow_pickle=False)
        meta = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        return BankVersion(version=version, bank=bank, meta=meta)

    def bank_versions(self) -> list[int]:
        """Versions with both files present, ascending."""
        versions = []
        for path in self.bank_dir.glob("v*.json"):
            if path.with_suffix(".npy").is_file() and path.stem[1:].isdigit():
                versions.append(int(path.stem[1:]))
        return sorted(versions)

    # -- internals ------------------------------------------------------------------------

    def _sync(self) -> None:
        if self._fsync:
            os.fsync(self._file.fileno())

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            if not written:
                raise OSError(f"short write to {self.path}")
            view = view[written:]

    def _undo(self, start: int, error: OSError) -> None:
        """Cut a failed append's partial record off (``start``: where it began)."""
        logger.error("journal %s: append failed (%s); cutting the file back to byte %d",
                     self.path, error, start)
        try:
            os.ftruncate(self._file.fileno(), start)
            if self._fsync:
                os.fsync(self._file.fileno())
        except OSError as undo_error:
            self._broken = f"{error}; cutting it off failed too: {undo_error}"
            logger.critical("journal %s: %s", self.path, self._broken)

    def _read_and_repair(self) -> int:
        """Check the existing log; cut off a torn last record; raise on damage before it.

        Returns the number of intact records. Reads record by record: memory is one record.
        """
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0
        count, good_end, bad_at = 0, len(MAGIC), None
        with open(self.path, "rb") as handle:
            if handle.read(len(MAGIC)) != MAGIC:
                raise JournalCorruptError(f"{self.path} does not start with {MAGIC!r}")
            size = self.path.stat().st_size
            for record, end in _parse(handle, size):
                if record is None:
                    bad_at = end
                    break
                count, good_end = count + 1, end
            if bad_at is not None and not _is_tail_damage(handle, bad_at, size):
                raise JournalCorruptError(
                    f"{self.path}: damaged record at byte {bad_at} is followed by more data; "
                    "refusing to start (acknowledged records may be lost)"
                )
        if bad_at is not None:
            logger.warning(
                "%s: cutting off a torn last record at byte %d (%d bytes; never acknowledged)",
                self.path, good_end, size - good_end,
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())
        logger.info("journal %s: %d record(s) replayable", self.path, count)
        return count


def _parse(handle: BinaryIO, size: int) -> Iterator[tuple[Record | None, int]]:
    """Yield (record, end offset) from the handle's position; (None, start) at the first record
    that does not check out, then stop."""
    offset = handle.tell()
    while offset < size:
        header = handle.read(_HEADER.size)
        if len(header) < _HEADER.size:
            yield None, offset
            return
        length, kind, digest, header_digest = _HEADER.unpack(header)
        end = offset + _HEADER.size + length
        if (
            xxhash.xxh32_intdigest(header[:_HEADER_BODY]) != header_digest
            or length > MAX_RECORD_BYTES
            or end > size
            or kind not in RecordKind._value2member_map_
        ):
            yield None, offset
            return
        payload = handle.read(length)
        if len(payload) != length or xxhash.xxh64_intdigest(payload) != digest:
            yield None, offset
            return
        yield Record(RecordKind(kind), payload), end
        offset = end


def _is_tail_damage(handle: BinaryIO, offset: int, size: int) -> bool:
    """True if the bad record at ``offset`` is the last thing in the file (a torn append).

    A torn append leaves fewer bytes than a header, or an intact header (its own checksum
    holds) whose payload reaches the end of the file or beyond. Anything else (a damaged
    header, or a damaged payload with more records after it) is corruption of acknowledged data.
    """
    if offset + _HEADER.size > size:
        return True
    handle.seek(offset)
    header = handle.read(_HEADER.size)
    length, _, _, header_digest = _HEADER.unpack(header)
    if xxhash.xxh32_intdigest(header[:_HEADER_BODY]) != header_digest:
        return False
    return offset + _HEADER.size + length >= size


def write_private(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, created mode 0600 whatever the umask (no moment at
    which another user could open it), replacing what was there."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def _open_private(path: Path) -> BinaryIO:
    """A new binary file opened for writing, mode 0600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "wb")


def _private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if missing; make ``path`` itself mode 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    if path.stat().st_mode & 0o777 != DIR_MODE:
        path.chmod(DIR_MODE)


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a created/renamed entry survives a power loss (POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
