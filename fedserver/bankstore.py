"""Bank versions on disk and the streams sites download them by (full, or a delta).

Each round that changes the bank stores a new version in stable order (core.bankdelta), so a
site holding an older version downloads only the change: the indices of removed rows, then the
added rows in chunks. The stored r_S includes the codec's error for the bank as the sites hold
it, whichever versions they downloaded and by which deltas (:meth:`BankStore.held_codec_error`).

Thread safety: :meth:`store` runs on the selection worker, everything else on rpc threads; the
version table is replaced, never mutated in place, so readers take no lock (``_latest`` and
``_versions`` are read as one immutable pair).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from core.bankdelta import ELEMENTWISE_VALUE_TYPES, bank_delta, decoded_checksum, stable_order
from core.codec import CodecConfig
from core.messages import BankChunk
from core.serde import codec_error, split_bank_into_chunks
from fedserver.errors import BankNotReadyError, NotFoundError
from fedserver.journal import BankVersion, Journal, JournalCorruptError

logger = logging.getLogger(__name__)

__all__ = ["REDACTED", "BankDownload", "BankHeaderView", "BankStore", "row_digest"]

#: Metadata key of a version a withdrawal redacted: the positions its purged rows had.
REDACTED = "redacted_positions"


def row_digest(row: np.ndarray) -> bytes:
    """XXH3-128 of a row's float32 bytes: how a withdrawn site's rows are found in the banks
    (bank rows are the decoded uploaded rows, bit for bit)."""
    return xxhash.xxh3_128_digest(np.ascontiguousarray(row, dtype=np.float32).tobytes())


@dataclass(frozen=True)
class BankHeaderView:
    """BankHeader in federation.proto."""

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
    value_type: str
    federation_id: str = ""


@dataclass(frozen=True)
class BankDownload:
    """A DownloadBank reply: the header, removed indices [r] int64, then the chunks (lazy)."""

    header: BankHeaderView
    removed: np.ndarray
    chunks: Iterator[BankChunk]


class _SharedStream:
    """One download's header, removed indices and chunks, shared by every download of the same
    (target, base) pair that is in flight at the same time.

    When a round's bank is ready, every site asks for the same delta (or full bank) at once:
    256 sites used to encode the same 16.5 MiB 256 times (benchmarks/scale.py: the round was
    download-bound). Chunks are encoded once, lazily and in order, by whichever download needs
    the next one first (the others wait for it, then reuse it), so the first chunk still goes
    out before the last is encoded. The object lives only while a download iterates it
    (:class:`BankStore` holds it weakly): no encoded copy of the bank stays in memory between
    rounds, only while sites download it.
    """

    def __init__(self, header: BankHeaderView, removed: np.ndarray,
                 source: Iterator[BankChunk]) -> None:
        self.header = header
        self.removed = removed
        self._source = source
        self._encoded: list[BankChunk] = []
        self._exhausted = False
        self._lock = threading.Lock()

    def chunks(self) -> Iterator[BankChunk]:
        """The chunks in order; the generator keeps this stream (and its encodings) alive."""
        index = 0
        while True:
            with self._lock:
                if index == len(self._encoded):
                    if self._exhausted:
                        return
                    try:
                        self._encoded.append(next(self._source))
                    except StopIteration:
                        self._exhausted = True
                        return
                chunk = self._encoded[index]
            yield chunk
            index += 1


@dataclass(frozen=True)
class _Table:
    """The versions' metadata and the latest version (replaced whole on every store or
    purge), and the download streams in flight for them: (target version, base version) ->
    :class:`_SharedStream`, held weakly, so a new table starts with none."""

    versions: dict[int, dict[str, Any]]
    latest: BankVersion | None
    streams: weakref.WeakValueDictionary[tuple[int, int], _SharedStream] = field(
        default_factory=weakref.WeakValueDictionary, compare=False, repr=False)


class BankStore:
    """The bank versions of one state directory.

    Args:
        journal: where versions are saved and loaded (``banks/vNNNNNN.{npy,json}``).
        codec: the codec banks are sent with; max_chunk_bytes: their chunking.
        codec_name: the preset's name, recorded in each version's metadata.
        federation_id: the state directory's federation id, sent in every BankHeader.
    """

    def __init__(
        self, journal: Journal, codec: CodecConfig, codec_name: str, max_chunk_bytes: int,
        federation_id: str = "",
    ) -> None:
        self._journal = journal
        self._federation_id = federation_id
        self._codec = codec
        self._codec_name = codec_name
        self._chunk_bytes = max_chunk_bytes
        self._table = _Table({}, None)
        self._streams_lock = threading.Lock()

    @property
    def latest(self) -> BankVersion | None:
        return self._table.latest

    def meta(self, version: int) -> dict[str, Any] | None:
        return self._table.versions.get(version)

    def server_radius(self, version: int) -> float:
        return float(self._table.versions[version]["server_radius"])

    def store(
        self, round_number: int, bank: np.ndarray, server_radius: float, max_site_radius: float
    ) -> tuple[int, int]:
        """Store ``bank`` as a new version in stable order, unless it equals the latest.

        Returns (version, rows). The stored r_S is the selector's ``server_radius`` plus
        :meth:`held_codec_error`: it holds for the rows a site holds after downloading this
        version by any path (full, or a delta from any older version, after any earlier path).
        The version records the chunking its errors were measured with (``bank_chunk_bytes``);
        every stream to it is cut that way (:meth:`download`), whatever the server's
        max_chunk_bytes is after a restart.
        """
        table = self._table
        previous = table.latest
        ordered = stable_order(None if previous is None else previous.bank, bank)
        if (previous is not None and previous.bank.shape == ordered.shape
                and REDACTED not in previous.meta):
            delta = bank_delta(previous.bank, ordered)
            if delta.removed.size == 0 and delta.added.shape[0] == 0:
                logger.info("round %d left the bank unchanged (version %d)", round_number,
                            previous.version)
                return previous.version, previous.bank.shape[0]
        version = 1 if previous is None else previous.version + 1
        codec_error = self.held_codec_error(ordered, previous)
        meta = {
            "round": round_number,
            "server_radius": server_radius + codec_error,
            "bank_codec_error": codec_error,
            "bank_chunk_bytes": self._chunk_bytes,
            "max_site_radius": max_site_radius,
            "codec": self._codec_name,
            "checksum": decoded_checksum(ordered, self._codec),
        }
        self._journal.save_bank(version, ordered, meta)
        full = {**meta, "version": version, "rows": ordered.shape[0]}
        self._table = _Table({**table.versions, version: full},
                             BankVersion(version, ordered, full))
        return version, ordered.shape[0]

    def held_codec_error(self, ordered: np.ndarray, previous: BankVersion | None) -> float:
        """E(v): the largest row error, against ``ordered`` (the new version v [k, D] in stable
        order), of what a site can hold after downloading v by any path.

        A site's copy of v is v's full stream, or a delta from an older version u: u's rows
        that survive (as the site holds them: error <= E(u) by induction) then the added rows
        ``ordered[s_u:]`` (s_u: u's survivors), decoded from a stream of their own. So

            E(v) = max(F(v), max over u < v of D(u, v), E(v - 1))

        with F the full stream's error, D(u, v) the delta stream's, and E(v - 1) >= E(u) for
        every older u. int8/int4 quantise per chunk, so every delta's stream is measured (each
        distinct s_u once); element-wise value types decode a row the same in any chunk, so
        E(v) = F(v) exactly. All measured with this store's chunking, which :meth:`download`
        then uses for every stream to v.
        """
        error = codec_error(ordered, config=self._codec,
                                     max_chunk_bytes=self._chunk_bytes)
        if previous is None or self._codec.value_type in ELEMENTWISE_VALUE_TYPES:
            return error
        survivors: set[int] = set()
        for u in sorted(self._table.versions):
            base = previous if u == previous.version else self._journal.load_bank(u)
            survivors.add(base.bank.shape[0] - bank_delta(base.bank, ordered).removed.size)
        for start in sorted(survivors):
            if start < ordered.shape[0]:
                added_error = codec_error(ordered[start:], config=self._codec,
                                                   max_chunk_bytes=self._chunk_bytes)
                error = max(error, added_error)
        return max(error, float(previous.meta.get("bank_codec_error", 0.0)))

    # -- withdrawal (fedserver.membership) --------------------------------------------------

    def rows_of(self, digests: set[bytes]) -> dict[int, list[int]]:
        """Per stored version, the positions of its rows whose :func:`row_digest` is in
        ``digests`` (a withdrawn site's decoded uploads); versions without any are left out."""
        found: dict[int, list[int]] = {}
        for version in sorted(self._table.versions):
            if REDACTED in self._table.versions[version]:
                continue
            bank = self._journal.load_bank(version).bank
            positions = [i for i in range(bank.shape[0]) if row_digest(bank[i]) in digests]
            if positions:
                found[version] = positions
        return found

    def purge(self, deleted: list[int], redacted: dict[int, list[int]]) -> None:
        """Remove a withdrawn site's rows from the stored versions (idempotent: a replay of the
        withdrawal's journal record finishes a purge a crash interrupted).

        ``deleted`` versions lose both files (a site holding one downloads the full bank next
        time). Each ``redacted`` version (the latest, which the sites hold) is rewritten without
        the rows at the given positions; its metadata keeps the positions (not the rows), so a
        delta from it to a newer version still tells a site which rows of its copy to drop."""
        versions = dict(self._table.versions)
        latest = self._table.latest
        for version in deleted:
            for suffix in (".npy", ".json"):
                path = self._journal.bank_dir / f"v{version:06d}{suffix}"
                path.unlink(missing_ok=True)
            versions.pop(version, None)
            if latest is not None and latest.version == version:
                latest = None
            logger.info("purged bank version %d (held a withdrawn site's rows)", version)
        for version, positions in redacted.items():
            try:
                stored = self._journal.load_bank(version)
            except FileNotFoundError:  # a later withdrawal deleted it (replay)
                continue
            if REDACTED not in stored.meta:
                keep = np.ones(stored.bank.shape[0], dtype=bool)
                keep[np.asarray(positions, dtype=np.int64)] = False
                meta = {k: v for k, v in stored.meta.items() if k not in ("version", "rows")}
                meta[REDACTED] = sorted(int(p) for p in positions)
                meta["rows_before_redaction"] = int(stored.bank.shape[0])
                self._journal.save_bank(version, stored.bank[keep], meta)
                stored = self._journal.load_bank(version)
                logger.info("bank version %d: %d row(s) of a withdrawn site removed", version,
                            len(positions))
            versions[version] = stored.meta
            if latest is None or latest.version <= version:
                latest = stored
        self._table = _Table(versions, latest)

    def adopt(self, version: int) -> int:
        """At start, for a round closed before a withdrawal (its selection, replayed without
        the withdrawn site, no longer reproduces the version): adopt the stored version
        unverified if it still exists (kept, or redacted as a delta base). Returns its rows,
        0 if it was deleted."""
        try:
            stored = self._journal.load_bank(version)
        except FileNotFoundError:
            return 0
        table = self._table
        latest = table.latest if table.latest and table.latest.version > version else stored
        self._table = _Table({**table.versions, version: stored.meta}, latest)
        return int(stored.bank.shape[0])

    def verify_replayed(self, round_number: int, version: int, bank: np.ndarray) -> int:
        """At start: check that the replayed selection of ``round_number`` reproduces the
        stored ``version``, and adopt it. Returns its rows; JournalCorruptError otherwise."""
        stored = self._journal.load_bank(version)
        ordered = stable_order(stored.bank, bank)
        if not np.array_equal(ordered, stored.bank):
            raise JournalCorruptError(
                f"replaying round {round_number} does not reproduce bank version {version}: the "
                "journal and the stored bank disagree"
            )
        table = self._table
        latest = table.latest
        if latest is None or version > latest.version:
            latest = stored
        self._table = _Table({**table.versions, version: stored.meta}, latest)
        return stored.bank.shape[0]

    def download(self, version: int = 0, have_version: int = 0, *, waiting_for: str = ""
                 ) -> BankDownload:
        """DownloadBank: the header, removed indices and chunks of a full bank or a delta.

        version: 0 = the latest. have_version: the version the site holds (0: none); a delta
        from it is sent when it exists and is not newer than the target. ``waiting_for`` says
        what the round is doing, for the error before any bank exists.
        """
        table = self._table
        if table.latest is None:
            raise BankNotReadyError(
                f"no bank is ready yet ({waiting_for}); watch the round with WatchRound"
            )
        if version and version not in table.versions:
            raise NotFoundError(
                f"bank version {version} does not exist; the latest is {table.latest.version}"
            )
        if version and REDACTED in table.versions[version]:
            raise NotFoundError(
                f"bank version {version} held a withdrawn site's rows and was purged; ask for "
                f"the latest ({table.latest.version})"
            )
        target_version = table.latest.version if version in (0, table.latest.version) else version
        # An up-to-date site (have == target) gets an empty delta, not the whole bank again.
        base_version = (have_version if have_version and have_version <= target_version
                        and have_version in table.versions else 0)
        key = (target_version, base_version)
        with self._streams_lock:
            shared = table.streams.get(key)
            if shared is None:
                shared = self._encode(table, target_version, base_version)
                table.streams[key] = shared
        return BankDownload(header=shared.header, removed=shared.removed,
                            chunks=shared.chunks())

    def _encode(self, table: _Table, target_version: int, base_version: int) -> _SharedStream:
        """The header, removed indices and (lazy) chunks of the stream from ``base_version``
        (0: none, a full download) to ``target_version``."""
        assert table.latest is not None
        target = table.latest if target_version == table.latest.version else (
            self._journal.load_bank(target_version)
        )
        meta = table.versions[target.version]
        base = self._journal.load_bank(base_version) if base_version else None
        if base is not None:
            delta = bank_delta(base.bank, target.bank)
            removed, rows = delta.removed, delta.added
            cut = base.meta.get(REDACTED)
            if cut:  # indices into the site's copy, which still has the purged rows
                kept = np.setdiff1d(np.arange(int(base.meta["rows_before_redaction"])), cut)
                removed = np.union1d(np.asarray(cut, dtype=np.int64), kept[removed])
        else:
            removed, rows = np.empty(0, dtype=np.int64), target.bank
        header = BankHeaderView(
            version=target.version,
            round=int(meta["round"]),
            base_version=0 if base is None else base.version,
            total_rows=target.bank.shape[0],
            feature_dim=target.bank.shape[1],
            rows_in_stream=rows.shape[0],
            rows_removed=removed.size,
            bank_checksum=int(meta["checksum"]),
            server_coverage_radius=float(meta["server_radius"]),
            max_site_coverage_radius=float(meta["max_site_radius"]),
            value_type=self._codec.value_type,
            federation_id=self._federation_id,
        )
        chunks = split_bank_into_chunks(
            rows,
            config=self._codec,
            round=header.round,
            server_coverage_radius=header.server_coverage_radius,
            max_site_coverage_radius=header.max_site_coverage_radius,
            # The chunking the version's codec error was measured with (store): the header's
            # r_S holds for exactly these chunks. Versions stored before it was recorded use
            # the current setting.
            max_chunk_bytes=int(meta.get("bank_chunk_bytes", self._chunk_bytes)),
        )
        return _SharedStream(header, removed, chunks)
