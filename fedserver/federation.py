"""The daemon's transport-agnostic core: rounds, uploads, durability, bank versions.

``Federation`` is what the gRPC servicer delegates to (as Flower's fleet servicer delegates to its
message handler); it imports no grpc, so tests drive it without sockets. It wraps
:class:`core.federated.GlobalBankAggregator` (all aggregation and selection happen there) and a
:class:`fedserver.journal.Journal` (durability), and adds what a long-running server needs:

* **Rounds**: a round opens (journaled, with its deadline), collects one upload per expected
  site, and closes when every expected site is complete, or at the deadline with at least
  ``quorum`` complete uploads (the others are cut off); below quorum it fails. Selection runs
  in a background thread; the round is then READY and the next one opens (``config.rounds``).
* **Uploads**: each message is validated and handed to the aggregator as it arrives (decoded and
  buffered there), then appended to the journal and fsync'ed; only then is it acknowledged. The
  committed position per site is what the journal holds. A chunk beyond it is OutOfRangeError;
  an identical resend below it is ignored.
* **Replay**: on start the journal is replayed into a fresh aggregator in the order it was
  written, which is the order the aggregator first saw, so it rebuilds exactly the same state;
  each closed round's selection is recomputed and checked against its stored bank version.
* **Bank versions**: each round that changes the bank stores a new version in stable order
  (core.bankdelta), so a site holding an older version downloads only the change.
* **Round reports**: when a round closes (ready or failed) its report is written to
  ``state_dir/reports/round-N.{json,html}`` (fedserver.report), and rewritten as sites finish
  downloading its bank (the servicer reports each download's bytes with ``record_download``).

Thread safety: one lock guards everything but the selection itself, which runs while the round
is SELECTING (no handler touches the aggregator then). Decoding and the fsync happen under the
lock, so concurrent uploads are serialised per chunk (a few ms each).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.bankdelta import bank_delta, decoded_checksum, stable_order
from core.codec import CodecConfig, PayloadTooLargeError
from core.federated.aggregator import GlobalBankAggregator, IncompatibleSiteError
from core.messages import BankChunk, FeatureChunk, SiteSummary
from core.serde import chunked_roundtrip, split_bank_into_chunks, upload_request_from_proto
from fedpatchcore.v1 import features_pb2 as pb
from fedserver.config import ServerConfig
from fedserver.journal import (
    BankVersion,
    Journal,
    JournalCorruptError,
    Record,
    RecordKind,
    write_private,
)
from fedserver.report import write_round_report

logger = logging.getLogger(__name__)

__all__ = [
    "BankDownload",
    "BankNotReadyError",
    "DimensionMismatchError",
    "Federation",
    "FederationError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "Phase",
    "RoundClosedError",
    "RoundSnapshot",
    "RoundTerms",
    "StateMismatchError",
    "StorageError",
    "UploadLimitError",
    "UploadProgress",
]

#: RemovedRows messages carry at most this many indices (8 bytes each: 512 KiB).
REMOVED_BATCH = 65536
#: Rejected messages a round report keeps per site (the latest ones; all are counted).
_REJECTIONS_KEPT = 5


class FederationError(Exception):
    """Base of the errors the servicer maps to status codes (each names what was wrong)."""


class PermissionDeniedError(FederationError):
    """The caller's site may not do this (another site's upload, a site not in the round)."""


class NotFoundError(FederationError):
    """A round or bank version the server has no record of."""


class OutOfRangeError(FederationError):
    """A chunk beyond the committed position: the client must resume from it."""


class RoundClosedError(FederationError):
    """The round does not accept this now (closed, selecting, failed, or not this round)."""


class BankNotReadyError(FederationError):
    """No bank version exists yet."""


class DimensionMismatchError(FederationError):
    """A summary's feature dimension differs from the federation's."""


class UploadLimitError(FederationError):
    """An upload larger than the server accepts from one site."""


class StateMismatchError(FederationError):
    """The state directory was created with other selection settings than the config's."""


class StorageError(FederationError):
    """The server could not make a message durable; it was not acknowledged."""


class Phase(enum.Enum):
    """Round lifecycle (RoundState in federation.proto)."""

    COLLECTING = "collecting"
    SELECTING = "selecting"
    READY = "ready"
    FAILED = "failed"


@dataclass
class UploadProgress:
    """A site's durable position in one round (UploadStatus in federation.proto)."""

    site_id: str
    round: int
    summary: SiteSummary | None = None
    committed_sequence: int = 0
    committed_rows: int = 0
    complete: bool = False

    @property
    def summary_committed(self) -> bool:
        return self.summary is not None


@dataclass(frozen=True)
class RoundSnapshot:
    """A round's state as counts (RoundStatus in federation.proto). deadline: unix seconds."""

    round: int
    phase: Phase
    sites_expected: int
    quorum: int
    sites_joined: int
    sites_complete: int
    rows_received: int
    deadline: float | None
    bank_version: int
    bank_rows: int
    message: str


@dataclass(frozen=True)
class RoundTerms:
    """What a site needs to take part in a round (RoundConfig in federation.proto)."""

    round: int
    feature_fingerprint: str
    extractor: dict[str, Any] | None
    codec_name: str
    codec: CodecConfig
    max_chunk_bytes: int
    global_bank_size: int
    max_rows_per_site: int
    feature_dim: int
    deadline: float | None
    expected_sites: int
    quorum: int
    novelty_threshold: float
    base_bank_version: int


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


@dataclass(frozen=True)
class BankDownload:
    """A DownloadBank reply: the header, removed indices [r] int64, then the chunks (lazy)."""

    header: BankHeaderView
    removed: np.ndarray
    chunks: Iterator[BankChunk]


@dataclass
class _SiteStats:
    """What a round report says about one site (unix times from time.time(); None: unknown)."""

    joined_at: float | None = None
    upload_complete_at: float | None = None
    messages_up: int = 0
    bytes_up: int = 0
    chunks_resent: int = 0
    rejected_count: int = 0
    rejected: list[str] = field(default_factory=list)  # latest first, at most _REJECTIONS_KEPT
    downloads: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Round:
    number: int
    expected: tuple[str, ...]
    quorum: int
    deadline: float | None
    novelty_threshold: float
    base_version: int
    phase: Phase = Phase.COLLECTING
    sites: dict[str, UploadProgress] = field(default_factory=dict)
    included: tuple[str, ...] | None = None
    bank_version: int = 0
    bank_rows: int = 0
    message: str = ""
    completed_at: float | None = None  # perf_counter when the last upload completed
    ready_at: float | None = None  # perf_counter when the bank was stored and announced
    # For the round report: per-site stats, unix times, selection; ``reported`` is False for a
    # round that had closed before this process started (its report was written then).
    stats: dict[str, _SiteStats] = field(default_factory=dict)
    opened_at: float | None = None
    uploads_complete_at: float | None = None
    ready_unix: float | None = None
    selection_seconds: float | None = None
    restarted: bool = False
    reported: bool = True

    def snapshot(self) -> RoundSnapshot:
        return RoundSnapshot(
            round=self.number,
            phase=self.phase,
            sites_expected=len(self.expected),
            quorum=self.quorum,
            sites_joined=sum(1 for p in self.sites.values() if p.summary_committed),
            sites_complete=sum(1 for p in self.sites.values() if p.complete),
            rows_received=sum(p.committed_rows for p in self.sites.values()),
            deadline=self.deadline,
            bank_version=self.bank_version,
            bank_rows=self.bank_rows,
            message=self.message,
        )

    def complete_sites(self) -> list[str]:
        return sorted(s for s in self.expected if s in self.sites and self.sites[s].complete)


_Receive = Callable[["Federation", str, "SiteSummary | FeatureChunk", bytes], bool]


def _accounted(receive: _Receive) -> _Receive:
    """Count every upload message of a site in the current round's report: messages, bytes
    (the serialized request, accepted or not) and rejections with their reason. Holds the
    federation's (re-entrant) lock around the call, so the count and the outcome agree."""

    @functools.wraps(receive)
    def counted(self: Federation, site_id: str, item: SiteSummary | FeatureChunk,
                raw: bytes) -> bool:
        with self._lock:
            stats = self._current.stats.setdefault(site_id, _SiteStats())
            stats.messages_up += 1
            stats.bytes_up += len(raw)
            try:
                return receive(self, site_id, item, raw)
            except (FederationError, ValueError) as error:
                stats.rejected_count += 1
                stats.rejected.insert(0, f"{type(error).__name__}: {error}")
                del stats.rejected[_REJECTIONS_KEPT:]
                raise

    return counted


class Federation:
    """Rounds over the aggregator, made durable by the journal (module docstring).

    Args:
        config: the validated server configuration.
        journal: the open state directory (replayed here).
        site_ids: the sites that hold tokens; round 1 expects ``config.expected_sites`` or,
            when that is empty, all of them.
        device: where selection runs ("cpu" / "cuda"); see ServerConfig.selection_device.
        clock: unix time source (tests move deadlines with it).
    """

    def __init__(
        self,
        config: ServerConfig,
        journal: Journal,
        site_ids: Sequence[str],
        *,
        device: str = "cpu",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.journal = journal
        self.device = device
        self._clock = clock
        expected = config.expected_sites or tuple(site_ids)
        unknown = sorted(set(expected) - set(site_ids))
        if unknown:
            raise ValueError(f"expected_sites {unknown} have no token in the tokens file")
        self._expected_round1 = tuple(sorted(expected))
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._rounds: dict[int, _Round] = {}
        self._fingerprint = config.feature_fingerprint
        self._feature_dim = config.feature_dim
        self._versions: dict[int, dict[str, Any]] = {}
        self._latest: BankVersion | None = None
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._aggregator = self._new_aggregator()
        self._check_state_settings()
        self._replay()
        if not self._rounds:
            self._open_round(1)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the deadline watcher; select at once if the replayed round is complete."""
        thread = threading.Thread(target=self._deadline_loop, name="fedserver-deadline",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)
        with self._lock:
            current = self._current
            if current.phase is Phase.COLLECTING and current.included is not None:
                self._start_selection(current)  # cut off before a restart: select as decided
            else:
                self._maybe_close(current)

    def begin_shutdown(self) -> None:
        """End watch streams and the deadline watcher; uploads are still accepted (drain)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()

    def close(self) -> None:
        """Stop background threads (a running selection completes), close the journal."""
        self.begin_shutdown()
        for thread in list(self._threads):
            thread.join()
        self.journal.close()

    @property
    def closing(self) -> bool:
        return self._closing

    # -- queries ----------------------------------------------------------------------------

    @property
    def _current(self) -> _Round:
        return self._rounds[max(self._rounds)]

    def snapshot(self, round_number: int = 0) -> RoundSnapshot:
        with self._lock:
            return self._round(round_number).snapshot()

    def timings(self, round_number: int) -> tuple[float | None, float | None]:
        """(perf_counter when the round's last upload completed, when its bank was ready)."""
        with self._lock:
            rnd = self._round(round_number)
            return rnd.completed_at, rnd.ready_at

    def terms(self, round_number: int = 0) -> RoundTerms:
        with self._lock:
            rnd = self._round(round_number)
            features = self.config.feature_config()
            extractor = None
            if features is not None:
                extractor = {**features.to_dict(), "pretrained": features.pretrained}
            return RoundTerms(
                round=rnd.number,
                feature_fingerprint=self._fingerprint,
                extractor=extractor,
                codec_name=self.config.codec,
                codec=self.config.codec_config,
                max_chunk_bytes=self.config.max_chunk_bytes,
                global_bank_size=self.config.global_bank_size,
                max_rows_per_site=self.config.max_rows_per_site,
                feature_dim=self._feature_dim,
                deadline=rnd.deadline,
                expected_sites=len(rnd.expected),
                quorum=rnd.quorum,
                novelty_threshold=rnd.novelty_threshold,
                base_bank_version=rnd.base_version,
            )

    def progress(self, site_id: str, round_number: int = 0) -> UploadProgress:
        """A copy of the site's committed position in the round (QueryUploadStatus)."""
        with self._lock:
            rnd = self._round(round_number)
            found = rnd.sites.get(site_id)
            if found is None:
                return UploadProgress(site_id, rnd.number)
            return dataclasses.replace(found)

    def join(
        self, site_id: str, fingerprint: str = ""
    ) -> tuple[RoundTerms, UploadProgress, RoundSnapshot]:
        """JoinRound: the round the site is to take part in (the latest one), its position."""
        with self._lock:
            rnd = self._current
            if site_id not in rnd.expected:
                if rnd.number > 1 and site_id in self._expected_round1:
                    raise RoundClosedError(
                        f"site {site_id!r} did not complete round 1, so it cannot take part in "
                        f"round {rnd.number}"
                    )
                raise PermissionDeniedError(
                    f"site {site_id!r} is not one of the {len(rnd.expected)} sites this "
                    "federation expects"
                )
            if fingerprint and self._fingerprint and fingerprint != self._fingerprint:
                raise IncompatibleSiteError(
                    f"site {site_id!r} extracts features with fingerprint {fingerprint[:12]}..., "
                    f"the federation uses {self._fingerprint[:12]}... (backbone, weights, "
                    "layers, dims and image size must match)"
                )
            stats = rnd.stats.setdefault(site_id, _SiteStats())
            if stats.joined_at is None:
                stats.joined_at = time.time()
            logger.info("round %d: site %s joined (%s)", rnd.number, site_id, rnd.phase.value)
            return self.terms(rnd.number), self.progress(site_id, rnd.number), rnd.snapshot()

    # -- uploads ----------------------------------------------------------------------------

    @_accounted
    def receive(self, site_id: str, item: SiteSummary | FeatureChunk, raw: bytes) -> bool:
        """Accept one upload message of ``site_id`` (the authenticated caller); durable on return.

        ``raw`` is the serialized UploadFeaturesRequest the item came from (journaled as is).
        Returns True if new, False for an identical resend of something already committed.
        Raises a FederationError or the aggregator's/assembler's typed ValueErrors; a rejected
        message changes nothing.
        """
        arrived = time.perf_counter()
        with self._changed:
            if item.site_id != site_id:
                raise PermissionDeniedError(
                    f"site {site_id!r} cannot upload as site {item.site_id!r}"
                )
            rnd = self._current
            if item.round != rnd.number:
                raise RoundClosedError(
                    f"message for round {item.round}, but round {rnd.number} is the current "
                    f"round ({rnd.phase.value})"
                )
            if rnd.phase is not Phase.COLLECTING:
                raise RoundClosedError(
                    f"round {rnd.number} is {rnd.phase.value}: uploads are closed"
                )
            if site_id not in rnd.expected:
                raise PermissionDeniedError(
                    f"site {site_id!r} is not expected in round {rnd.number}"
                )
            progress = rnd.sites.setdefault(site_id, UploadProgress(site_id, rnd.number))
            if isinstance(item, SiteSummary):
                new = self._receive_summary(rnd, progress, item, raw)
            else:
                new = self._receive_chunk(rnd, progress, item, raw, arrived)
            if new:
                self._changed.notify_all()
            return new

    def _receive_summary(
        self, rnd: _Round, progress: UploadProgress, summary: SiteSummary, raw: bytes
    ) -> bool:
        if progress.summary == summary:
            return False
        if self._feature_dim and summary.feature_dim != self._feature_dim:
            raise DimensionMismatchError(
                f"site {summary.site_id!r} sends D={summary.feature_dim}, the federation uses "
                f"D={self._feature_dim}"
            )
        if self._fingerprint and summary.feature_fingerprint != self._fingerprint:
            raise IncompatibleSiteError(
                f"site {summary.site_id!r} extracts features with fingerprint "
                f"{summary.feature_fingerprint[:12]}..., the federation uses "
                f"{self._fingerprint[:12]}... (backbone, weights, layers, dims and image size "
                "must match)"
            )
        if summary.coreset_rows > self.config.max_rows_per_site:
            raise UploadLimitError(
                f"site {summary.site_id!r} announces {summary.coreset_rows} rows, more than "
                f"max_rows_per_site={self.config.max_rows_per_site}"
            )
        self._aggregator.receive_summary(summary)
        self._append(RecordKind.SUMMARY, raw)
        progress.summary = summary
        self._fingerprint = self._fingerprint or summary.feature_fingerprint
        self._feature_dim = self._feature_dim or summary.feature_dim
        logger.info(
            "round %d: site %s summary: %d rows of D=%d, r_i=%.4f, codec %s",
            rnd.number, summary.site_id, summary.coreset_rows, summary.feature_dim,
            summary.coverage_radius, summary.codec.value_type,
        )
        return True

    def _receive_chunk(
        self,
        rnd: _Round,
        progress: UploadProgress,
        chunk: FeatureChunk,
        raw: bytes,
        arrived: float,
    ) -> bool:
        if progress.summary is None:
            raise RoundClosedError(
                f"chunk {chunk.sequence} of site {chunk.site_id!r} arrived before the site's "
                f"summary for round {rnd.number}; send the SiteSummary first"
            )
        if chunk.sequence > progress.committed_sequence:
            raise OutOfRangeError(
                f"chunk {chunk.sequence} is beyond the committed position: chunks 0.."
                f"{progress.committed_sequence - 1} are committed; resume from chunk "
                f"{progress.committed_sequence}"
            )
        if chunk.features.decoded_size > self.config.max_chunk_bytes:
            raise PayloadTooLargeError(
                f"chunk {chunk.sequence} of site {chunk.site_id!r} declares a decoded payload "
                f"of {chunk.features.decoded_size} bytes, more than this server's "
                f"max_chunk_bytes={self.config.max_chunk_bytes} (RoundConfig.max_chunk_bytes)"
            )
        # Validates order, size, dimension and checksum, decodes and buffers the rows; an
        # identical resend returns False. Raises (changing nothing) on anything else.
        self._aggregator.receive_chunk(chunk)
        if chunk.sequence < progress.committed_sequence:
            rnd.stats.setdefault(chunk.site_id, _SiteStats()).chunks_resent += 1
            return False
        # chunk.sequence == committed: journal it (also when the aggregator already had it
        # because an earlier append failed: the aggregator then reported a resend).
        self._append(RecordKind.CHUNK, raw)
        progress.committed_sequence += 1
        progress.committed_rows += chunk.features.rows
        progress.complete = chunk.last
        if chunk.last:
            rnd.stats.setdefault(chunk.site_id, _SiteStats()).upload_complete_at = time.time()
            logger.info(
                "round %d: site %s upload complete: %d chunks, %d rows",
                rnd.number, chunk.site_id, progress.committed_sequence, progress.committed_rows,
            )
            if all(s in rnd.sites and rnd.sites[s].complete for s in rnd.expected):
                rnd.completed_at = arrived
                rnd.uploads_complete_at = time.time()
            self._maybe_close(rnd)
        return True

    def _append(self, kind: RecordKind, payload: bytes) -> None:
        try:
            self.journal.append(kind, payload)
        except OSError as error:
            logger.error("journal append failed (%s): the message is not acknowledged", error)
            raise StorageError(
                f"the server could not store the message durably: {error}"
            ) from error

    # -- round transitions ------------------------------------------------------------------

    def _open_round(self, number: int, *, journal: bool = True) -> _Round:
        previous = self._rounds.get(number - 1)
        if previous is None:
            expected = self._expected_round1
            threshold, base = 0.0, 0
        else:
            expected = tuple(sorted(previous.included or previous.complete_sites()))
            radius = float(self._versions[previous.bank_version]["server_radius"])
            threshold, base = (radius if math.isfinite(radius) else 0.0), previous.bank_version
        quorum = min(self.config.quorum or len(expected), len(expected))
        timeout = self.config.round_timeout_s
        deadline = self._clock() + timeout if timeout > 0 else None
        rnd = _Round(number, expected, quorum, deadline, threshold, base)
        rnd.opened_at = time.time()
        if journal:
            self.journal.append_json(RecordKind.ROUND_OPENED, {
                "round": number, "deadline": deadline, "expected": list(expected),
                "quorum": quorum, "novelty_threshold": threshold, "base_version": base,
            })
        self._aggregator.begin_round(number)
        self._rounds[number] = rnd
        logger.info(
            "round %d opened: expecting %d site(s) %s, quorum %d, deadline %s",
            number, len(expected), list(expected), quorum,
            "none" if deadline is None else time.strftime("%H:%M:%S", time.gmtime(deadline)),
        )
        return rnd

    def _maybe_close(self, rnd: _Round) -> None:
        """Start selection if every expected site is complete (lock held)."""
        if rnd.phase is Phase.COLLECTING and all(
            s in rnd.sites and rnd.sites[s].complete for s in rnd.expected
        ):
            self._start_selection(rnd)

    def _start_selection(self, rnd: _Round) -> None:
        rnd.phase = Phase.SELECTING
        self._changed.notify_all()
        thread = threading.Thread(
            target=self._select, args=(rnd,), name=f"fedserver-select-{rnd.number}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _deadline_loop(self) -> None:
        while True:
            with self._changed:
                if self._closing:
                    return
                rnd = self._current
                if (
                    rnd.phase is Phase.COLLECTING
                    and rnd.deadline is not None
                    and self._clock() >= rnd.deadline
                ):
                    try:
                        self._deadline_passed(rnd)
                    except OSError as error:  # the journal could not record the cut-off
                        self._fail_unjournaled(rnd, "its deadline passed", error)
                self._changed.wait(timeout=0.2)

    def _deadline_passed(self, rnd: _Round) -> None:
        complete = rnd.complete_sites()
        if complete and len(complete) >= rnd.quorum:
            missing = sorted(set(rnd.expected) - set(complete))
            logger.warning(
                "round %d: deadline passed; selecting from %d complete upload(s), cutting off %s",
                rnd.number, len(complete), missing,
            )
            self.journal.append_json(
                RecordKind.ROUND_CUTOFF, {"round": rnd.number, "included": complete}
            )
            rnd.included = tuple(complete)
            rnd.completed_at = time.perf_counter()
            rnd.uploads_complete_at = time.time()
            self._start_selection(rnd)
        else:
            rnd.message = (
                f"deadline passed with {len(complete)} complete upload(s), quorum is "
                f"{rnd.quorum}"
            )
            logger.error("round %d failed: %s", rnd.number, rnd.message)
            self.journal.append_json(
                RecordKind.ROUND_FAILED, {"round": rnd.number, "message": rnd.message}
            )
            rnd.phase = Phase.FAILED
            self._changed.notify_all()
            self._write_report(rnd)

    def _select(self, rnd: _Round) -> None:
        """Selection thread: finish the round in the aggregator, store the version, announce."""
        try:
            started = time.perf_counter()
            joined = {s for s, p in rnd.sites.items() if p.summary_committed}
            if rnd.included is not None and joined != set(rnd.included):
                # Cut-off sites' rows are in the aggregator; rebuild it without them.
                self._aggregator = self._rebuilt_aggregator()
            outcome = self._aggregator.finish_round()
            version, rows = self._store_version(rnd.number, outcome.bank, outcome.server_radius,
                                                outcome.max_site_radius)
            with self._changed:
                self.journal.append_json(
                    RecordKind.ROUND_CLOSED, {"round": rnd.number, "version": version}
                )
                rnd.bank_version, rnd.bank_rows = version, rows
                rnd.phase = Phase.READY
                rnd.ready_at = time.perf_counter()
                rnd.ready_unix = time.time()
                rnd.selection_seconds = rnd.ready_at - started
                logger.info(
                    "round %d ready: bank version %d, %d rows, selected in %.2f s, certificate "
                    "%.4f", rnd.number, version, rows, rnd.ready_at - started,
                    outcome.certificate,
                )
                if rnd.number < self.config.rounds and not self._closing:
                    self._open_round(rnd.number + 1)
                self._changed.notify_all()
                self._write_report(rnd)
        except Exception as error:  # the round fails loudly; the server keeps serving
            logger.exception("round %d: selection failed", rnd.number)
            with self._changed:
                rnd.phase = Phase.FAILED
                rnd.message = f"selection failed: {type(error).__name__}: {error}"
                rnd.selection_seconds = time.perf_counter() - started
                try:
                    self.journal.append_json(
                        RecordKind.ROUND_FAILED, {"round": rnd.number, "message": rnd.message}
                    )
                except OSError as journal_error:
                    logger.critical(
                        "round %d: cannot journal its failure (%s); a restarted server will "
                        "select it again from the journaled uploads", rnd.number, journal_error,
                    )
                self._changed.notify_all()
                self._write_report(rnd)

    def _fail_unjournaled(self, rnd: _Round, what: str, error: OSError) -> None:
        """Fail ``rnd`` in memory when the state directory cannot record ``what`` happened
        (disk full, read-only): sites are told at once instead of waiting on a round that can
        no longer move; the journal keeps every acknowledged chunk, so a restarted server (with
        space again) takes the round up from there. Called with ``self._changed`` held."""
        rnd.phase = Phase.FAILED
        rnd.message = (
            f"{what} but the server's state directory cannot record it ({error}); the server "
            "needs attention, then a restart resumes the round"
        )
        logger.critical("round %d failed: %s", rnd.number, rnd.message)
        self._changed.notify_all()
        self._write_report(rnd)

    def _store_version(
        self, round_number: int, bank: np.ndarray, server_radius: float, max_site_radius: float
    ) -> tuple[int, int]:
        """Store ``bank`` as a new version in stable order, unless it equals the latest."""
        previous = self._latest
        ordered = stable_order(None if previous is None else previous.bank, bank)
        if previous is not None and previous.bank.shape == ordered.shape:
            delta = bank_delta(previous.bank, ordered)
            if delta.removed.size == 0 and delta.added.shape[0] == 0:
                logger.info("round %d left the bank unchanged (version %d)", round_number,
                            previous.version)
                return previous.version, previous.bank.shape[0]
        version = 1 if previous is None else previous.version + 1
        # r_S must hold for the bank as the sites decode it (as core.federated.FederatedServer
        # reports it): add the codec's largest row error, measured with the chunking the
        # download uses (int8/int4 quantise per chunk), for the full bank and for the delta from
        # the previous version (its added rows travel in chunks of their own).
        codec, chunk_bytes = self.config.codec_config, self.config.max_chunk_bytes
        _, codec_error = chunked_roundtrip(ordered, config=codec, max_chunk_bytes=chunk_bytes)
        if previous is not None:
            added = bank_delta(previous.bank, ordered).added
            if added.shape[0]:
                _, delta_error = chunked_roundtrip(added, config=codec, max_chunk_bytes=chunk_bytes)
                codec_error = max(codec_error, delta_error)
        meta = {
            "round": round_number,
            "server_radius": server_radius + codec_error,
            "bank_codec_error": codec_error,
            "max_site_radius": max_site_radius,
            "codec": self.config.codec,
            "checksum": decoded_checksum(ordered, self.config.codec_config),
        }
        self.journal.save_bank(version, ordered, meta)
        self._versions[version] = {**meta, "version": version, "rows": ordered.shape[0]}
        self._latest = BankVersion(version, ordered, self._versions[version])
        return version, ordered.shape[0]

    # -- downloads and watching -------------------------------------------------------------

    def bank_download(self, site_id: str, version: int = 0, have_version: int = 0) -> BankDownload:
        """DownloadBank: the header, removed indices and chunks of a full bank or a delta."""
        with self._lock:
            if self._latest is None:
                raise BankNotReadyError(
                    f"no bank is ready yet (round {self._current.number} is "
                    f"{self._current.phase.value}); watch the round with WatchRound"
                )
            if version and version not in self._versions:
                raise NotFoundError(
                    f"bank version {version} does not exist; the latest is {self._latest.version}"
                )
            target = self._latest if version in (0, self._latest.version) else (
                self.journal.load_bank(version)
            )
            meta = self._versions[target.version]
            base: BankVersion | None = None
            # An up-to-date site (have == target) gets an empty delta, not the whole bank again.
            if have_version and have_version <= target.version and have_version in self._versions:
                base = self.journal.load_bank(have_version)
        if base is not None:
            delta = bank_delta(base.bank, target.bank)
            removed, rows = delta.removed, delta.added
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
            value_type=self.config.codec_config.value_type,
        )
        chunks = split_bank_into_chunks(
            rows,
            config=self.config.codec_config,
            round=header.round,
            server_coverage_radius=header.server_coverage_radius,
            max_site_coverage_radius=header.max_site_coverage_radius,
            max_chunk_bytes=self.config.max_chunk_bytes,
        )
        logger.info(
            "site %s downloads bank version %d (%s): %d rows in the stream, %d removed",
            site_id, header.version,
            "full" if base is None else f"delta from {base.version}",
            header.rows_in_stream, header.rows_removed,
        )
        return BankDownload(header=header, removed=removed, chunks=chunks)

    def record_download(
        self,
        site_id: str,
        header: BankHeaderView,
        *,
        bytes_sent: int,
        messages: int,
        seconds: float,
        complete: bool,
    ) -> None:
        """The servicer's account of one DownloadBank stream (serialized bytes it sent): added
        to the report of the round whose bank it was, which is rewritten."""
        with self._lock:
            rnd = self._rounds.get(header.round)
            if rnd is None or not rnd.reported:
                return  # a bank of a round closed before this process started
            rnd.stats.setdefault(site_id, _SiteStats()).downloads.append({
                "version": header.version,
                "base_version": header.base_version,
                "rows_in_stream": header.rows_in_stream,
                "rows_removed": header.rows_removed,
                "messages": messages,
                "bytes": bytes_sent,
                "seconds": seconds,
                "complete": complete,
                "at": time.time(),
            })
            if rnd.phase in (Phase.READY, Phase.FAILED):
                self._write_report(rnd)

    def round_report(self, round_number: int) -> dict[str, Any]:
        """What the round's report holds (fedserver.report), as a JSON-ready dict."""
        with self._lock:
            rnd = self._round(round_number)
            meta = self._versions.get(rnd.bank_version) if rnd.bank_version else None
            sites = []
            for site_id in sorted(set(rnd.expected) | set(rnd.stats) | set(rnd.sites)):
                stats = rnd.stats.get(site_id, _SiteStats())
                progress = rnd.sites.get(site_id)
                summary = progress.summary if progress is not None else None
                sites.append({
                    "site_id": site_id,
                    "expected": site_id in rnd.expected,
                    "rows": progress.committed_rows if progress else 0,
                    "rows_announced": summary.coreset_rows if summary else None,
                    "coverage_radius": summary.coverage_radius if summary else None,
                    "chunks_committed": progress.committed_sequence if progress else 0,
                    "upload_complete": bool(progress and progress.complete),
                    "chunks_resent": stats.chunks_resent,
                    "messages_up": stats.messages_up,
                    "bytes_up": stats.bytes_up,
                    "bytes_down": sum(d["bytes"] for d in stats.downloads),
                    "downloads": list(stats.downloads),
                    "joined_at": stats.joined_at,
                    "upload_complete_at": stats.upload_complete_at,
                    "rejected_count": stats.rejected_count,
                    "rejected": list(stats.rejected),
                })
            included = list(rnd.included) if rnd.included is not None else None
            counted = [s for s in sites if included is None or s["site_id"] in included]
            radii = {s["site_id"]: s["coverage_radius"] for s in counted
                     if s["coverage_radius"] is not None}
            report: dict[str, Any] = {
                "round": rnd.number,
                "state": rnd.phase.value,
                "message": rnd.message,
                "expected_sites": list(rnd.expected),
                "quorum": rnd.quorum,
                "included_sites": included,
                "cut_off_sites": sorted(set(rnd.expected) - set(included)) if included else [],
                "opened_at": rnd.opened_at,
                "uploads_complete_at": rnd.uploads_complete_at,
                "ready_at": rnd.ready_unix,
                "restarted": rnd.restarted,
                "selection": {
                    "seconds": rnd.selection_seconds,
                    "device": self.device,
                    "strategy": self.config.strategy,
                    "server_selection": self.config.server_selection,
                } if rnd.selection_seconds is not None else None,
                "bank": {
                    "version": rnd.bank_version,
                    "rows": rnd.bank_rows,
                    "codec": self.config.codec,
                } if meta is not None else None,
                "certificate": {
                    "server_radius": float(meta["server_radius"]),
                    "codec_error": float(meta.get("bank_codec_error", 0.0)),
                    "max_site_radius": float(meta["max_site_radius"]),
                    "certificate": float(meta["server_radius"]) + float(meta["max_site_radius"]),
                    "site_radii": radii,
                } if meta is not None else None,
                "sites": sites,
                "totals": {
                    key: sum(s[key] for s in sites)
                    for key in ("rows", "chunks_committed", "chunks_resent", "messages_up",
                                "bytes_up", "bytes_down", "rejected_count")
                } | {"downloads": sum(len(s["downloads"]) for s in sites)},
                "written_at": time.time(),
            }
            return report

    def _write_report(self, rnd: _Round) -> None:
        """Write (or rewrite) the round's report; a failure to write is logged as an error and
        does not fail the round (the bank and the journal are what the federation needs)."""
        if not rnd.reported:
            return
        try:
            json_path, _ = write_round_report(self.journal.state_dir,
                                              self.round_report(rnd.number))
        except OSError as error:
            logger.error("round %d: cannot write its report: %s", rnd.number, error)
            return
        logger.info("round %d report: %s (and .html)", rnd.number, json_path)

    def watch(
        self, round_number: int, min_interval_s: float, is_active: Callable[[], bool]
    ) -> Iterator[RoundSnapshot]:
        """Yield the round's snapshot now and on every change, until READY/FAILED or shutdown.

        Changes of rows only are sent at most every ``min_interval_s``; ``is_active`` (the rpc
        is still wanted) is checked at least once a second.
        """
        with self._lock:
            number = self._round(round_number).number
        last: RoundSnapshot | None = None
        last_sent = 0.0
        while is_active():
            with self._changed:
                current = self._rounds[number].snapshot()
                if current == last and not self._closing:
                    self._changed.wait(timeout=1.0)
                    continue
            if self._closing and current == last:
                return
            rows_only = last is not None and current.phase == last.phase and (
                current.sites_joined == last.sites_joined
                and current.sites_complete == last.sites_complete
            )
            wait = last_sent + min_interval_s - time.monotonic()
            if rows_only and wait > 0:
                time.sleep(min(wait, 1.0))
                continue
            yield current
            last, last_sent = current, time.monotonic()
            if current.phase in (Phase.READY, Phase.FAILED) or self._closing:
                return

    def wait_for(self, round_number: int, phases: set[Phase], timeout: float) -> RoundSnapshot:
        """Block until the round reaches one of ``phases`` (tests, benchmarks); TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                snapshot = self._round(round_number).snapshot()
                if snapshot.phase in phases:
                    return snapshot
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"round {round_number} is still {snapshot.phase.value}")
                self._changed.wait(timeout=min(left, 0.5))

    def _round(self, number: int) -> _Round:
        if number == 0:
            return self._current
        found = self._rounds.get(number)
        if found is None:
            raise NotFoundError(
                f"round {number} does not exist (rounds so far: 1..{max(self._rounds)})"
            )
        return found

    # -- replay -----------------------------------------------------------------------------

    def _selection_settings(self) -> dict[str, Any]:
        """Settings a replay depends on: changing them would make a different bank."""
        return {
            "global_bank_size": self.config.global_bank_size,
            "strategy": self.config.strategy,
            "server_selection": self.config.server_selection,
            "seed": self.config.seed,
            "buffer_rows": self.config.buffer_rows,
            "codec": self.config.codec,
        }

    def _check_state_settings(self) -> None:
        """Refuse a state directory made with other selection settings (a replay would not
        reproduce its banks); record them in a new one."""
        path = self.journal.state_dir / "settings.json"
        settings = self._selection_settings()
        if path.exists():
            stored = json.loads(path.read_text(encoding="utf-8"))
            changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
            if changed:
                details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise StateMismatchError(
                    f"state directory {self.journal.state_dir} was created with other selection "
                    f"settings ({details}); use those settings or a new state directory"
                )
        else:
            write_private(path, json.dumps(settings, sort_keys=True))

    def _new_aggregator(self) -> GlobalBankAggregator:
        return GlobalBankAggregator(
            self.config.global_bank_size,
            strategy=self.config.strategy,
            seed=self.config.seed,
            buffer_rows=self.config.buffer_rows,
            device=self.device,
            server_selection=self.config.server_selection,
        )

    def _cutoffs(self) -> dict[int, set[str]]:
        cutoffs = {}
        for record in self.journal.records():
            if record.kind is RecordKind.ROUND_CUTOFF:
                value = record.json()
                cutoffs[int(value["round"])] = set(value["included"])
        return cutoffs

    @staticmethod
    def _item(record: Record) -> SiteSummary | FeatureChunk:
        return upload_request_from_proto(pb.UploadFeaturesRequest.FromString(record.payload))

    def _rebuilt_aggregator(self) -> GlobalBankAggregator:
        """A fresh aggregator fed the journal again, without cut-off sites' messages."""
        cutoffs = self._cutoffs()
        aggregator = self._new_aggregator()
        for record in self.journal.records():
            if record.kind is RecordKind.ROUND_OPENED:
                aggregator.begin_round(int(record.json()["round"]))
            elif record.kind in (RecordKind.SUMMARY, RecordKind.CHUNK):
                item = self._item(record)
                if item.round in cutoffs and item.site_id not in cutoffs[item.round]:
                    continue
                if isinstance(item, SiteSummary):
                    aggregator.receive_summary(item)
                else:
                    aggregator.receive_chunk(item)
            elif record.kind is RecordKind.ROUND_CLOSED:
                aggregator.finish_round()
        logger.info("rebuilt the aggregator without cut-off sites: %s", cutoffs)
        return aggregator

    def _replay(self) -> None:
        """Rebuild rounds, progress, aggregator and versions from the journal (at start)."""
        cutoffs = self._cutoffs()
        count = 0
        for record in self.journal.records():
            count += 1
            if record.kind is RecordKind.ROUND_OPENED:
                value = record.json()
                number = int(value["round"])
                self._aggregator.begin_round(number)
                self._rounds[number] = _Round(
                    number,
                    tuple(value["expected"]),
                    int(value["quorum"]),
                    value["deadline"],
                    float(value["novelty_threshold"]),
                    int(value["base_version"]),
                    restarted=True,
                )
            elif record.kind in (RecordKind.SUMMARY, RecordKind.CHUNK):
                self._replay_upload(record, cutoffs)
            elif record.kind is RecordKind.ROUND_CUTOFF:
                value = record.json()
                self._rounds[int(value["round"])].included = tuple(value["included"])
            elif record.kind is RecordKind.ROUND_CLOSED:
                value = record.json()
                self._replay_closed(int(value["round"]), int(value["version"]))
            elif record.kind is RecordKind.ROUND_FAILED:
                value = record.json()
                rnd = self._rounds[int(value["round"])]
                rnd.phase, rnd.message = Phase.FAILED, str(value["message"])
                rnd.reported = False
        if count:
            current = self._current
            logger.info(
                "replayed %d journal record(s): round %d is %s with %d row(s) committed",
                count, current.number, current.phase.value, current.snapshot().rows_received,
            )
            if current.phase is Phase.READY and current.number < self.config.rounds:
                self._open_round(current.number + 1)

    def _replay_upload(self, record: Record, cutoffs: dict[int, set[str]]) -> None:
        item = self._item(record)
        rnd = self._rounds[item.round]
        progress = rnd.sites.setdefault(item.site_id, UploadProgress(item.site_id, rnd.number))
        stats = rnd.stats.setdefault(item.site_id, _SiteStats())
        stats.messages_up += 1  # what the journal holds: accepted messages only
        stats.bytes_up += len(record.payload)
        fed = item.round not in cutoffs or item.site_id in cutoffs[item.round]
        if isinstance(item, SiteSummary):
            if fed:
                self._aggregator.receive_summary(item)
            progress.summary = item
            self._fingerprint = self._fingerprint or item.feature_fingerprint
            self._feature_dim = self._feature_dim or item.feature_dim
        else:
            if fed:
                self._aggregator.receive_chunk(item)
            progress.committed_sequence += 1
            progress.committed_rows += item.features.rows
            progress.complete = item.last

    def _replay_closed(self, number: int, version: int) -> None:
        rnd = self._rounds[number]
        outcome = self._aggregator.finish_round()
        stored = self.journal.load_bank(version)
        ordered = stable_order(stored.bank, outcome.bank)
        if not np.array_equal(ordered, stored.bank):
            raise JournalCorruptError(
                f"replaying round {number} does not reproduce bank version {version}: the "
                "journal and the stored bank disagree"
            )
        self._versions[version] = stored.meta
        if self._latest is None or version > self._latest.version:
            self._latest = stored
        rnd.phase, rnd.bank_version, rnd.bank_rows = Phase.READY, version, stored.bank.shape[0]
        rnd.reported = False  # closed before this process started: its report exists
        logger.info("replayed round %d: bank version %d verified", number, version)
