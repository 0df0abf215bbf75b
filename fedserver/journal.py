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
Kinds: ROUND_OPENED / ROUND_CUTOFF / ROUND_CLOSED / ROUND_FAILED / SITE_ADDED / SITE_REVOKED /
SITE_WITHDRAWN (JSON payloads), SUMMARY / CHUNK (serialized
fedpatchcore.v1.UploadFeaturesRequest).

The log is append-only with one exception: withdrawing a site (fedserver.membership) rewrites it
without that site's SUMMARY/CHUNK records (:meth:`Journal.rewrite`: a new file, fsync'ed, renamed
over the old one, directory fsync'ed), so its features leave the state directory.

Permissions: the state directory and ``banks/`` are created (or tightened to) mode 0700 and
every file in them is created 0600 whatever the umask: the journal holds every site's features.

A failed append (disk full, I/O error, directory made unwritable) raises OSError after cutting
the file back to where the record began, so the log never keeps a partial record in its middle
(a later, successful append after it would otherwise make the damage look like corruption of
acknowledged data at the next start). If even that cut fails, the journal refuses every later
append (``JournalBrokenError``) until the server is restarted and repairs the tail.

Group commit: :meth:`Journal.submit` queues a record and returns at once; one writer thread
writes every queued record, then makes them durable together with one fsync (PostgreSQL's
``commit_delay``, RocksDB's write groups), and only then runs each record's ``on_durable``
callback, in append order, and resolves its future. So **when a record's future is resolved
(and its callback ran), the record and every record submitted before it are on disk and
fsync'ed**; the daemon acknowledges a chunk (counts it in the committed position a site is
told) from that callback, never earlier. A batch is written all or nothing: if any write or
the fsync fails, the file is cut back to where the batch began and every record of the batch
fails (OSError); none of their callbacks runs, and later records of the same stream (a site's
next chunks) fail unwritten until the submitter rolls that stream back (``generation``).
:meth:`append` is submit-and-wait.

One server per state directory: :class:`StateDirLock` (an exclusive ``flock`` on
``STATE_DIR/fedserver.lock``, which records the holder's pid) is taken by the daemon before it
opens the journal; a second server on the same directory gets StateDirLockedError naming the pid.
"""

from __future__ import annotations

import enum
import fcntl
import json
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
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
    "StateDirLock",
    "StateDirLockedError",
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


class StateDirLockedError(RuntimeError):
    """Another fedserver process holds the state directory (the message names its pid)."""


#: Most bytes the writer gathers into one batch (one fsync) before it writes them.
_BATCH_BYTES: Final[int] = 64 << 20


@dataclass
class _Pending:
    """A submitted record waiting for the writer: its encoded bytes, callback and future, and
    the stream it belongs to with the stream's generation (see :meth:`Journal.submit`)."""

    data: bytes
    on_durable: Callable[[], None] | None
    future: Future[None]
    stream: object = None
    generation: int = 0


class RecordKind(enum.IntEnum):
    """What a journal record holds."""

    ROUND_OPENED = 1
    SUMMARY = 2
    CHUNK = 3
    ROUND_CUTOFF = 4
    ROUND_CLOSED = 5
    ROUND_FAILED = 6
    SITE_ADDED = 7  # {"site"}: an operator added the site; it joins at the next round
    SITE_REVOKED = 8  # {"site"}: its token was revoked; later rounds do not expect it
    SITE_WITHDRAWN = 9  # {"site", ...}: its uploads were removed (Journal.rewrite)


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
        self.batches = 0  # fsync'ed batches so far (records / batches = the group-commit gain)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._closed = False
        # stream -> (generation, error) of its latest failed record (writer thread only)
        self._failed_streams: dict[object, tuple[int, OSError]] = {}

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

    def submit(
        self,
        kind: RecordKind,
        payload: bytes,
        on_durable: Callable[[], None] | None = None,
        *,
        stream: object = None,
        generation: int = 0,
    ) -> Future[None]:
        """Queue one record for the writer; returns its future (module docstring).

        The future resolves once the record is written and fsync'ed (with fsync on), right
        after ``on_durable`` ran on the writer thread; it fails with OSError if the record's
        batch could not be made durable (then the file holds none of that batch and
        ``on_durable`` never runs), JournalBrokenError after an earlier failure that could not
        be undone. Records become durable in submission order.

        ``stream`` (hashable, e.g. a site's upload in a round) names records that depend on
        each other: once one of its records fails, every later record of that stream with a
        ``generation`` not above the failed one's fails too, unwritten, so the log never
        holds a chunk without the chunk before it. The submitter starts a new generation once
        it has rolled its stream back to what is durable.
        """
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
        body = struct.pack("<IBQ", len(payload), int(kind), xxhash.xxh64_intdigest(payload))
        header = body + struct.pack("<I", xxhash.xxh32_intdigest(body))
        future: Future[None] = Future()
        with self._writer_lock:
            if self._closed:
                raise JournalBrokenError(f"journal {self.path} is closed")
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="journal-writer", daemon=True
                )
                self._writer.start()
            self._queue.put(_Pending(header + payload, on_durable, future, stream, generation))
        return future

    def rewrite(self, records: Iterator[Record] | list[Record]) -> int:
        """Replace the whole log by ``records`` atomically; returns the new file's size.

        The caller must have stopped every submitter and called :meth:`barrier` (the writer is
        idle). The records go to ``journal.log.tmp`` (mode 0600), which is fsync'ed and renamed
        over the log, and the directory is fsync'ed: a crash leaves the old log or the new one.
        Later appends go to the new file. The old file's blocks are freed by the file system
        (not overwritten: see docs/operator.md on what remains on the disk)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with _open_private(tmp) as handle:
            handle.write(MAGIC)
            for record in records:
                body = struct.pack("<IBQ", len(record.payload), int(record.kind),
                                   xxhash.xxh64_intdigest(record.payload))
                handle.write(body + struct.pack("<I", xxhash.xxh32_intdigest(body)))
                handle.write(record.payload)
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        with self._writer_lock:
            os.replace(tmp, self.path)
            _fsync_dir(self.state_dir)
            old = self._file
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND, FILE_MODE)
            self._file = os.fdopen(fd, "ab", buffering=0)
            old.close()
        logger.info("journal %s rewritten: %d bytes", self.path, size)
        return size

    def barrier(self) -> None:
        """Wait until every record submitted so far is written and fsync'ed (or failed), so
        that :meth:`records` then reads a log with no append in progress."""
        future: Future[None] = Future()
        with self._writer_lock:
            if self._writer is None or self._closed:
                return
            self._queue.put(_Pending(b"", None, future))
        future.exception()  # waits; a failed batch is its records' business, not the barrier's

    def append(self, kind: RecordKind, payload: bytes) -> None:
        """Append one record and (with fsync) make it durable before returning.

        Raises OSError when it could not (the file is then as before the call; module
        docstring), JournalBrokenError after an append whose damage could not be undone.
        """
        self.submit(kind, payload).result()

    def append_json(self, kind: RecordKind, value: dict[str, Any]) -> None:
        """Append a JSON record (round lifecycle events)."""
        self.append(kind, json.dumps(value, sort_keys=True).encode("utf-8"))

    def close(self) -> None:
        """Write what was submitted, stop the writer, close the file."""
        with self._writer_lock:
            self._closed = True
            writer = self._writer
            if writer is not None:
                self._queue.put(None)
        if writer is not None:
            writer.join()
        if not self._file.closed:
            try:
                if self._broken is None:
                    self._sync()
            finally:
                self._file.close()

    def _write_loop(self) -> None:
        """The writer thread: gather queued records into a batch, write, fsync, then ack."""
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch, size = [first], len(first.data)
            while size < _BATCH_BYTES:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
                size += len(more.data)
            batch = self._without_failed_streams(batch)
            if not batch:
                continue
            try:
                self._write_batch(batch)
            except OSError as error:
                for pending in batch:
                    if pending.stream is not None:
                        failed = self._failed_streams.get(pending.stream)
                        if failed is None or failed[0] < pending.generation:
                            self._failed_streams[pending.stream] = (pending.generation, error)
                for pending in batch:
                    pending.future.set_exception(error)
                continue
            for pending in batch:
                if pending.on_durable is not None:
                    try:
                        pending.on_durable()
                    except Exception as error:  # a bug in a callback must not stop the writer
                        logger.exception("journal: a durable-record callback failed")
                        pending.future.set_exception(error)
                        continue
                pending.future.set_result(None)

    def _without_failed_streams(self, batch: list[_Pending]) -> list[_Pending]:
        """Fail (unwritten) the records of streams whose earlier record failed in the same or
        a later generation; returns the rest."""
        kept = []
        for pending in batch:
            failed = (self._failed_streams.get(pending.stream)
                      if pending.stream is not None else None)
            if failed is not None and pending.generation <= failed[0]:
                pending.future.set_exception(OSError(
                    f"not written: an earlier record of its stream failed ({failed[1]})"
                ))
            else:
                kept.append(pending)
        return kept

    def _write_batch(self, batch: list[_Pending]) -> None:
        """Write ``batch`` and fsync once; on failure cut the file back and raise OSError."""
        if self._broken is not None:
            raise JournalBrokenError(
                f"journal {self.path} refuses appends after an earlier failure ({self._broken}); "
                "restart the server to repair it"
            )
        start = self._file.seek(0, os.SEEK_END)
        try:
            for pending in batch:
                self._write_all(pending.data)
            self._sync()
        except OSError as error:
            self._undo(start, error)
            raise
        self.bytes_written += sum(len(p.data) for p in batch)
        self.batches += 1

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

    A crash between write and fsync can leave, after the last durable record: fewer bytes than
    a header; an intact header (its own checksum holds) whose payload reaches the end of the
    file or beyond, or is followed by zeros only; or a partly written header followed by zeros
    only (the file system's unwritten extents and lost page-cache pages read back as zeros,
    up to the size the file had reached). None of it was acknowledged, since the fsync that
    would have covered it never returned. Anything else (a damaged header or payload with
    nonzero bytes after it) is corruption of acknowledged data.
    """
    if offset + _HEADER.size > size:
        return True
    handle.seek(offset)
    header = handle.read(_HEADER.size)
    length, _, _, header_digest = _HEADER.unpack(header)
    if xxhash.xxh32_intdigest(header[:_HEADER_BODY]) == header_digest:
        end = offset + _HEADER.size + length
        return end >= size or _zeros_from(handle, end, size)
    # A damaged header: torn if its nonzero bytes end within one header's length and zeros
    # follow to the end of the file (a header cut short, then unwritten extents).
    last_nonzero = len(header.rstrip(b"\0"))
    return last_nonzero < _HEADER.size and _zeros_from(handle, offset + _HEADER.size, size)


def _zeros_from(handle: BinaryIO, start: int, size: int) -> bool:
    """True if every byte of the file from ``start`` to ``size`` is zero (read in 1 MiB blocks)."""
    handle.seek(start)
    left = size - start
    while left > 0:
        block = handle.read(min(left, 1 << 20))
        if not block:
            return True
        if block.count(0) != len(block):
            return False
        left -= len(block)
    return True


class StateDirLock:
    """An exclusive lock on a state directory, held while this object is open.

    ``flock`` on ``STATE_DIR/fedserver.lock`` (released by the kernel when the process dies, so
    a crashed server leaves no stale lock); the file holds the holder's pid for the message a
    second server prints.
    """

    FILE_NAME: Final[str] = "fedserver.lock"

    def __init__(self, state_dir: Path) -> None:
        state_dir = Path(state_dir)
        _private_dir(state_dir)
        self.path = state_dir / self.FILE_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateDirLockedError(
                f"state directory {state_dir} is in use by another fedserver (pid {holder}); "
                "stop it first, or give this server another state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> StateDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def write_private(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably: a temporary file created mode
    0600 whatever the umask (no moment at which another user could open it), fsync'ed, renamed
    over ``path``, and the directory fsync'ed; a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with _open_private(tmp) as handle:
        handle.write(text.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
