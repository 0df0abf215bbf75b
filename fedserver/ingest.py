"""Upload ingest: validate and decode a message, journal it, acknowledge it once durable.

The path of one upload message (a SiteSummary or a FeatureChunk)::

    rpc handler --submit--> checks (state lock) --> decode + verify (site lock, no state lock)
        --> journal.submit (state lock: journal order = acceptance order) ... group commit ...
        --> on_durable (writer thread, state lock): committed position advances, the rows go
            to the selection worker's queue, watchers are woken

What is durable when the ack leaves: a chunk counts in the committed position that
QueryUploadStatus, the UploadFeatures response and the round's progress report only from its
``on_durable`` callback, which the journal runs after the fsync that covered the chunk's record
(fedserver.journal). So every position a site is ever told is on disk.

Pipelining: :meth:`Ingest.submit` returns a future as soon as the chunk is decoded and queued
for the journal, so a stream's next chunk is decoded while the journal writes the last one; the
rpc answers only after every future resolved. A chunk must follow the site's *accepted*
position (committed + queued). If a journal batch fails, the site's records queued behind it
fail too, unwritten (the journal's stream rule), and the site is rolled back to its committed
position (the aggregator forgets the rows, which the worker never saw) and starts a new stream
generation, so the client resumes from there.

Ranking never happens here: rows reach the aggregator's selector only in the selection worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.codec import PayloadTooLargeError
from core.federated.aggregator import (
    GlobalBankAggregator,
    IncompatibleSiteError,
    SummaryConflictError,
    summary_difference,
)
from core.messages import FeatureChunk, SiteSummary
from core.serde import chunk_identity
from fedserver.errors import (
    BusyError,
    DimensionMismatchError,
    OutOfRangeError,
    PermissionDeniedError,
    RoundClosedError,
    StorageError,
    UploadLimitError,
)
from fedserver.journal import Journal, RecordKind
from fedserver.rounds import Phase, Round, UploadProgress

logger = logging.getLogger(__name__)

__all__ = ["Ingest", "IngestHost", "Pins"]


@dataclass
class Pins:
    """What the first accepted site fixes for the federation (unless the config pinned it)."""

    fingerprint: str
    feature_dim: int


class IngestHost(Protocol):
    """What ingest needs of the federation (fedserver.federation.Federation implements it)."""

    lock: threading.RLock

    def current_round(self) -> Round: ...

    def round_by_number(self, number: int) -> Round | None: ...

    @property
    def aggregator(self) -> GlobalBankAggregator: ...

    def site_row_limit(self, rnd: Round, site_id: str) -> tuple[int, str]: ...

    def rows_durable(self, rnd: Round, site_id: str, rows: np.ndarray, row_offset: int,
                     last: bool) -> None: ...

    def site_complete(self, rnd: Round, arrived: float) -> None: ...

    def changed(self) -> None: ...

    @property
    def paused(self) -> bool: ...


def _uncancellable() -> Future[bool]:
    """A future an rpc's cancellation cannot cancel: a client that goes away does not take
    back a message the journal is already writing (asyncio.wrap_future cancels the future
    it wraps when the awaiting task is cancelled; a running future refuses that)."""
    future: Future[bool] = Future()
    future.set_running_or_notify_cancel()
    return future


def _done(value: bool) -> Future[bool]:
    future = _uncancellable()
    future.set_result(value)
    return future


class Ingest:
    """Accepts upload messages for the federation's current round (module docstring).

    Args:
        host: the federation (state lock, rounds, aggregator, what happens to durable rows).
        journal: where accepted messages are made durable.
        pins: the federation's fingerprint and dimension (set by the first summary).
        max_chunk_bytes: the largest decoded chunk payload this server accepts.
    """

    def __init__(self, host: IngestHost, journal: Journal, pins: Pins, max_chunk_bytes: int
                 ) -> None:
        self._host = host
        self._journal = journal
        self._pins = pins
        self._max_chunk_bytes = max_chunk_bytes
        self._site_locks: dict[str, threading.Lock] = {}
        self._site_locks_guard = threading.Lock()

    def _site_lock(self, site_id: str) -> threading.Lock:
        with self._site_locks_guard:
            return self._site_locks.setdefault(site_id, threading.Lock())

    def submit(self, site_id: str, item: SiteSummary | FeatureChunk, raw: bytes
               ) -> Future[bool]:
        """Validate, decode and queue one message of ``site_id`` (the authenticated caller).

        Returns a future: True once the message is durable and counted, False at once for an
        identical resend of something already accepted; it fails with StorageError if the
        journal could not store it. Raises (before anything is queued) a FederationError or
        the aggregator's / assembler's typed ValueErrors; a rejected message changes nothing.
        ``raw`` is the serialized UploadFeaturesRequest (journaled as is).
        """
        if item.site_id != site_id:
            raise PermissionDeniedError(f"site {site_id!r} cannot upload as site {item.site_id!r}")
        with self._site_lock(site_id):  # one message of a site at a time, across its streams
            if isinstance(item, SiteSummary):
                return self._submit_summary(site_id, item, raw)
            return self._submit_chunk(site_id, item, raw)

    # -- summaries ------------------------------------------------------------------------

    def _submit_summary(self, site_id: str, summary: SiteSummary, raw: bytes) -> Future[bool]:
        host = self._host
        with host.lock:
            _check_not_paused(host, site_id)
            rnd = self._open_round_of(site_id, summary.round, summary_resend=summary)
            if rnd is None:
                return _done(False)
            progress = rnd.progress_of(site_id)
            held = host.aggregator.pending_summary(site_id)
            if held == summary:  # an identical resend (durable, or queued for the journal)
                return _done(False)
            if held is not None:
                # INVALID_ARGUMENT, as a chunk resent with other content: the message
                # contradicts what the site sent, whatever state the round is in.
                raise SummaryConflictError(
                    f"site {site_id!r} already sent a different summary for round {rnd.number}: "
                    f"{summary_difference(held, summary)}"
                )
            self._check_summary(rnd, summary)
            host.aggregator.receive_summary(summary)

            def durable() -> None:
                with host.lock:
                    progress.summary = summary
                    self._pins.fingerprint = self._pins.fingerprint or summary.feature_fingerprint
                    self._pins.feature_dim = self._pins.feature_dim or summary.feature_dim
                    logger.info(
                        "round %d: site %s summary: %d rows of D=%d, r_i=%.4f, codec %s",
                        rnd.number, site_id, summary.coreset_rows, summary.feature_dim,
                        summary.coverage_radius, summary.codec.value_type,
                    )
                host.changed()

            return self._journaled(RecordKind.SUMMARY, raw, durable, rnd, progress)

    def _check_summary(self, rnd: Round, summary: SiteSummary) -> None:
        pins = self._pins
        # D is fixed by the first summary accepted, before it is durable: a summary of another
        # D that arrives meanwhile is the same malformed message (INVALID_ARGUMENT), not a
        # state conflict that the aggregator would report (FAILED_PRECONDITION).
        feature_dim = pins.feature_dim or self._host.aggregator.feature_dim
        if feature_dim and summary.feature_dim != feature_dim:
            raise DimensionMismatchError(
                f"site {summary.site_id!r} sends D={summary.feature_dim}, the federation uses "
                f"D={feature_dim}"
            )
        if pins.fingerprint and summary.feature_fingerprint != pins.fingerprint:
            raise IncompatibleSiteError(
                f"site {summary.site_id!r} extracts features with fingerprint "
                f"{summary.feature_fingerprint[:12]}..., the federation uses "
                f"{pins.fingerprint[:12]}... (backbone, weights, layers, dims and image size "
                "must match)"
            )
        limit, why = self._host.site_row_limit(rnd, summary.site_id)
        if summary.coreset_rows > limit:
            raise UploadLimitError(
                f"site {summary.site_id!r} announces {summary.coreset_rows} rows, more than "
                f"{why}; send at most RoundConfig.max_rows_per_site ({limit}) rows"
            )

    # -- chunks ---------------------------------------------------------------------------

    def _submit_chunk(self, site_id: str, chunk: FeatureChunk, raw: bytes) -> Future[bool]:
        arrived = time.perf_counter()
        host = self._host
        with host.lock:
            _check_not_paused(host, site_id)
            rnd = self._open_round_of(site_id, chunk.round, chunk_resend=chunk)
            if rnd is None:
                return _done(False)
            progress = rnd.progress_of(site_id)
            if progress.summary is None and not host.aggregator.pending_summary(site_id):
                raise RoundClosedError(
                    f"chunk {chunk.sequence} of site {site_id!r} arrived before the site's "
                    f"summary for round {rnd.number}; send the SiteSummary first"
                )
            if chunk.sequence > progress.accepted_sequence:
                # The accepted position: the rpc answers only after every accepted chunk is
                # durable (or reports the failure that rolled it back instead).
                raise OutOfRangeError(
                    f"chunk {chunk.sequence} is beyond the committed position: chunks 0.."
                    f"{progress.accepted_sequence - 1} are committed; resume from chunk "
                    f"{progress.accepted_sequence}"
                )
            if chunk.features.decoded_size > self._max_chunk_bytes:
                raise PayloadTooLargeError(
                    f"chunk {chunk.sequence} of site {site_id!r} declares a decoded payload "
                    f"of {chunk.features.decoded_size} bytes, more than this server's "
                    f"max_chunk_bytes={self._max_chunk_bytes} (RoundConfig.max_chunk_bytes)"
                )
            aggregator = host.aggregator
        # Decode and verify outside the state lock (other sites go on); this site's lock keeps
        # its assembler to one thread. Raises, changing nothing, on a bad chunk.
        rows = aggregator.accept_chunk(chunk)
        if rows is None:  # an identical resend of an accepted chunk
            with host.lock:
                rnd.site_stats(site_id).chunks_resent += 1
            return _done(False)
        with host.lock:
            if host.paused or host.aggregator is not aggregator:
                aggregator.rollback(site_id, chunk.sequence)
                raise BusyError(
                    f"chunk {chunk.sequence} of site {site_id!r} arrived while a withdrawal "
                    "rewrote the journal; it was not accepted: resend it"
                )
            if host.current_round() is not rnd or rnd.phase is not Phase.COLLECTING:
                aggregator.rollback(site_id, chunk.sequence)
                raise RoundClosedError(
                    f"round {rnd.number} closed while chunk {chunk.sequence} of site "
                    f"{site_id!r} was being decoded; it was not accepted"
                )
            progress.accepted_sequence = chunk.sequence + 1
            identity = chunk_identity(chunk)

            def durable() -> None:
                with host.lock:
                    progress.committed_sequence += 1
                    progress.committed_rows += rows.shape[0]
                    progress.complete = chunk.last
                    rnd.committed_chunks.setdefault(site_id, []).append(identity)
                    host.rows_durable(rnd, site_id, rows, chunk.row_offset, chunk.last)
                    if chunk.last:
                        rnd.site_stats(site_id).upload_complete_at = time.time()
                        logger.info(
                            "round %d: site %s upload complete: %d chunks, %d rows",
                            rnd.number, site_id, progress.committed_sequence,
                            progress.committed_rows,
                        )
                        host.site_complete(rnd, arrived)
                host.changed()

            return self._journaled(RecordKind.CHUNK, raw, durable, rnd, progress)

    # -- shared ---------------------------------------------------------------------------

    def _open_round_of(
        self,
        site_id: str,
        round_number: int,
        *,
        summary_resend: SiteSummary | None = None,
        chunk_resend: FeatureChunk | None = None,
    ) -> Round | None:
        """The current round if it accepts uploads from ``site_id`` (lock held); None when the
        message is an identical resend of something a closed round committed (ignored, as a
        ByteStream-style retry must be idempotent); raises otherwise."""
        rnd = self._host.current_round()
        if round_number != rnd.number or rnd.phase is not Phase.COLLECTING:
            closed = self._host.round_by_number(round_number)
            if closed is not None and self._committed_resend(
                closed, site_id, summary_resend, chunk_resend
            ):
                logger.info("round %d: site %s resent a committed message after the round "
                            "closed; ignored", round_number, site_id)
                return None
            if round_number != rnd.number:
                raise RoundClosedError(
                    f"message for round {round_number}, but round {rnd.number} is the current "
                    f"round ({rnd.phase.value})"
                )
            raise RoundClosedError(f"round {rnd.number} is {rnd.phase.value}: uploads are closed")
        if site_id not in rnd.expected:
            raise PermissionDeniedError(f"site {site_id!r} is not expected in round {rnd.number}")
        return rnd

    @staticmethod
    def _committed_resend(rnd: Round, site_id: str, summary: SiteSummary | None,
                          chunk: FeatureChunk | None) -> bool:
        progress = rnd.sites.get(site_id)
        if progress is None:
            return False
        if summary is not None:
            return progress.summary == summary
        assert chunk is not None
        committed = rnd.committed_chunks.get(site_id, [])
        return chunk.sequence < len(committed) and (
            committed[chunk.sequence] == chunk_identity(chunk)
        )

    def _journaled(
        self,
        kind: RecordKind,
        raw: bytes,
        durable: Callable[[], None],
        rnd: Round,
        progress: UploadProgress,
    ) -> Future[bool]:
        """Queue ``raw`` in the journal (state lock held, so journal order = acceptance order);
        a failed append rolls the site back to its committed position."""
        result = _uncancellable()
        host = self._host
        site_id = progress.site_id

        def finished(journaled: Future[None]) -> None:
            error = journaled.exception()
            if error is None:
                result.set_result(True)
                return
            with host.lock:
                self._roll_back(rnd, progress)
            host.changed()
            logger.error("journal append failed (%s): site %s's message is not acknowledged; "
                         "it resumes from chunk %d", error, site_id, progress.committed_sequence)
            result.set_exception(StorageError(
                f"the server could not store the message durably: {error}"
            ))

        try:
            journaled = self._journal.submit(kind, raw, durable, stream=(rnd.number, site_id),
                                             generation=progress.generation)
        except OSError as error:
            self._roll_back(rnd, progress)
            raise StorageError(f"the server could not store the message durably: {error}"
                               ) from error
        journaled.add_done_callback(finished)
        return result

    def _roll_back(self, rnd: Round, progress: UploadProgress) -> None:
        """Forget what ``progress``'s site had accepted beyond its durable position (lock held)."""
        aggregator = self._host.aggregator
        if progress.summary is None:
            aggregator.forget_summary(progress.site_id)
        else:
            aggregator.rollback(progress.site_id, progress.committed_sequence)
        if progress.accepted_sequence != progress.committed_sequence or progress.summary is None:
            # Records of the old generation still queued will fail unwritten (the journal's
            # rule); what the site sends from its committed position on is a new generation.
            progress.generation += 1
        progress.accepted_sequence = progress.committed_sequence


def _check_not_paused(host: IngestHost, site_id: str) -> None:
    """BusyError (UNAVAILABLE: fedclient retries) while a withdrawal rewrites the journal."""
    if host.paused:
        raise BusyError(
            f"the server is removing a withdrawn site's data; site {site_id!r} retries shortly"
        )
