"""The daemon's transport-agnostic core: rounds over ingest, selection, bank versions, reports.

``Federation`` is what the gRPC servicer delegates to (as Flower's fleet servicer delegates to
its message handler); it imports no grpc, so tests drive it without sockets. It coordinates
pieces that each live in a module of their own, and data flows one way::

    servicer --submit--> ingest (decode, verify) --> journal (group commit) --> ack
                                                 \\--> selection worker (ranks rows; selects at
                                                      close) --> bank store --> DownloadBank
    rounds <- events from ingest (site complete) and from the worker (bank ready / failed)

* **Rounds** (fedserver.rounds): a round opens (journaled, with its deadline), collects one
  upload per expected site, and closes when every expected site is complete, or at the deadline
  with at least ``quorum`` complete uploads (the others are cut off); below quorum it fails. The
  bank is selected on the worker; the round is then READY and the next one opens
  (``config.rounds``).
* **Ingest** (fedserver.ingest): a message is acknowledged once it is decoded, verified and
  durably journaled; ranking never happens in the rpc.
* **Selection** (fedserver.selection): the worker ranks rows as they become durable and selects
  at close, on the configured device.
* **Bank versions** (fedserver.bankstore): a site holding an older version downloads the change.
* **Reports** (fedserver.report): written from snapshots by a debounced writer thread.
* **Replay** (fedserver.replay): at start the journal is fed through the same aggregator in the
  order it was written, so the same state comes back; each closed round's selection is
  recomputed and checked against its stored bank version.

Locking: one state lock (``lock``, re-entrant) guards the rounds and their counters and is held
only for bookkeeping, never while decoding, ranking, selecting, writing files or waiting for the
journal (the journal's writer thread takes it in its durable-record callbacks, so waiting for the
journal under it would deadlock). Waiting for changes (WatchRound, ``wait_for``) goes through a
:class:`~fedserver.changes.ChangeFeed`: an asyncio task waits without a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from core.federated.aggregator import GlobalBankAggregator, IncompatibleSiteError
from core.messages import FeatureChunk, SiteSummary
from fedserver.bankstore import BankDownload, BankHeaderView, BankStore
from fedserver.changes import ChangeFeed
from fedserver.config import ConfigError, ServerConfig
from fedserver.errors import (
    BankNotReadyError,
    BusyError,
    DimensionMismatchError,
    FederationError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    RoundClosedError,
    StateMismatchError,
    StorageError,
    UploadLimitError,
)
from fedserver.ingest import Ingest, Pins
from fedserver.journal import Journal, RecordKind, write_private
from fedserver.membership import Withdrawal, withdraw_site
from fedserver.replay import outline_journal, rebuild_aggregator, replay_journal
from fedserver.report import ReportWriter, build_round_report
from fedserver.rounds import Phase, Round, RoundSnapshot, RoundTerms, UploadProgress
from fedserver.selection import SelectionResult, SelectionWorker

logger = logging.getLogger(__name__)

__all__ = [
    "FEDERATION_ID_FILE",
    "REMOVED_BATCH",
    "BankDownload",
    "BankHeaderView",
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
    "federation_id_of",
]

#: RemovedRows messages carry at most this many indices (8 bytes each: 512 KiB).
REMOVED_BATCH = 65536


class Federation:
    """Rounds over ingest, the selection worker and the bank store (module docstring).

    Args:
        config: the validated server configuration.
        journal: the open state directory (replayed here).
        site_ids: the sites that hold tokens; round 1 expects ``config.expected_sites`` or,
            when that is empty, all of them.
        device: where selection runs ("cpu" / "cuda"); see ServerConfig.selection_device.
        clock: unix time source (tests move deadlines with it).

    Raises ConfigError when ``max_rows_per_site`` exceeds a site's share of the selection
    buffer (the limit could never be honoured), StateMismatchError / JournalCorruptError for a
    state directory that does not fit the config.
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
        # Sites an operator revoked or withdrew (fedserver.membership) are no longer expected,
        # even where the config's expected_sites still names them.
        outline = outline_journal(journal)
        expected = tuple(s for s in (config.expected_sites or tuple(site_ids))
                         if s not in outline.departed)
        unknown = sorted(set(expected) - set(site_ids))
        if unknown:
            raise ValueError(f"expected_sites {unknown} have no token in the tokens file")
        self._expected_round1 = tuple(sorted(expected))
        self.lock = threading.RLock()
        self._feed = ChangeFeed()
        self._rounds: dict[int, Round] = {}
        # Membership (fedserver.membership; journaled as SITE_* records): sites added and not
        # yet expected in a round, sites revoked or withdrawn (never expected again unless
        # added again), withdrawn sites, and every site an operator added.
        self._joiners: set[str] = set()
        self._revoked: set[str] = set()
        self._withdrawn: set[str] = set()
        self._added: set[str] = set()
        # True while a withdrawal rewrites the journal: uploads and lifecycle changes wait.
        self._paused = False
        self._pins = Pins(config.feature_fingerprint, config.feature_dim)
        self._closing = False
        self._aggregator = self._new_aggregator()
        self._check_site_limit()
        self.federation_id = federation_id_of(journal.state_dir)
        self._bank = BankStore(journal, config.codec_config, config.codec, config.max_chunk_bytes,
                               self.federation_id)
        self._worker = SelectionWorker()
        self._ingest = Ingest(self, journal, self._pins, config.max_chunk_bytes)
        self._deadline_thread: threading.Thread | None = None
        self._check_state_settings()
        replay_journal(self, outline)
        if 1 in self._rounds:  # sites added since are not round 1's (they hold tokens now)
            self._expected_round1 = tuple(
                s for s in self._expected_round1 if s in self._rounds[1].expected
            )
        if not self._rounds:
            with self.lock:
                opened = self._open_round(1)
            opened.result()  # a state directory that cannot record it: the server cannot start
        self._reports = ReportWriter(journal.state_dir, self._report_of)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the selection worker and the deadline watcher; select at once if the replayed
        round is complete (or was cut off before a restart)."""
        self._worker.start()
        self._deadline_thread = threading.Thread(
            target=self._deadline_loop, name="fedserver-deadline", daemon=True
        )
        self._deadline_thread.start()
        with self.lock:
            current = self._current
            if current.phase is Phase.COLLECTING and (
                current.included is not None or current.all_complete()
            ):
                self._start_selection(current)

    def begin_shutdown(self) -> None:
        """End watch streams and the deadline watcher; uploads are still accepted (drain)."""
        with self.lock:
            self._closing = True
        self._feed.notify()

    def close(self) -> None:
        """Stop the threads (a queued or running selection completes), flush the reports, close
        the journal."""
        self.begin_shutdown()
        if self._deadline_thread is not None:
            self._deadline_thread.join()
        self._worker.stop()
        self._reports.stop()
        self.journal.close()

    @property
    def closing(self) -> bool:
        return self._closing

    # -- what ingest and replay use ---------------------------------------------------------

    @property
    def aggregator(self) -> GlobalBankAggregator:
        return self._aggregator

    def current_round(self) -> Round:
        return self._current

    def round_by_number(self, number: int) -> Round | None:
        return self._rounds.get(number)

    def changed(self) -> None:
        self._feed.notify()

    def site_row_limit(self, rnd: Round, site_id: str) -> tuple[int, str]:
        """(most rows ``site_id`` may announce in ``rnd``, the limit's name and value).

        The prefix merge keeps every uploaded row in a buffer of ``buffer_rows``; each expected
        site may reserve an equal share of what earlier rounds left free, so no site can lock
        the others out of a round, and ``max_rows_per_site`` lowers it further when set.
        """
        configured = self.config.max_rows_per_site
        capacity = self._aggregator.buffer_capacity
        if capacity is not None:
            sites = max(1, len(rnd.expected))
            share = max(0, capacity - self._aggregator.rows_held) // sites
            if not configured or share < configured:
                return share, (
                    f"its share of the server's selection buffer, {share} rows (buffer_rows="
                    f"{capacity}, {self._aggregator.rows_held} held from earlier rounds, "
                    f"{sites} expected site(s))"
                )
        if not configured:
            return 2**62, "no limit"
        return configured, f"max_rows_per_site={configured}"

    def rows_durable(self, rnd: Round, site_id: str, rows: np.ndarray, row_offset: int,
                     last: bool) -> None:
        """Ingest's durable-chunk event: queue the rows for ranking (lock held)."""
        self._worker.feed(self._aggregator, rnd.number, site_id, rows, row_offset, last=last)

    def site_complete(self, rnd: Round, arrived: float) -> None:
        """Ingest's event for a site's last chunk (lock held), and a site no longer expected:
        close the round if every expected upload is complete."""
        if rnd.phase is Phase.COLLECTING and rnd.expected and rnd.all_complete():
            rnd.completed_at = arrived
            rnd.uploads_complete_at = time.time()
            self._start_selection(rnd)

    # -- queries ----------------------------------------------------------------------------

    @property
    def _current(self) -> Round:
        return self._rounds[max(self._rounds)]

    def snapshot(self, round_number: int = 0) -> RoundSnapshot:
        with self.lock:
            return self._round(round_number).snapshot()

    def timings(self, round_number: int) -> tuple[float | None, float | None]:
        """(perf_counter when the round's last upload completed, when its bank was ready)."""
        with self.lock:
            rnd = self._round(round_number)
            return rnd.completed_at, rnd.ready_at

    def terms(self, round_number: int = 0, site_id: str = "") -> RoundTerms:
        with self.lock:
            rnd = self._round(round_number)
            features = self.config.feature_config()
            extractor = None
            if features is not None:
                extractor = {**features.to_dict(), "pretrained": features.pretrained}
            limit = self.site_row_limit(rnd, site_id)[0]
            return RoundTerms(
                round=rnd.number,
                feature_fingerprint=self._pins.fingerprint,
                extractor=extractor,
                codec_name=self.config.codec,
                codec=self.config.codec_config,
                max_chunk_bytes=self.config.max_chunk_bytes,
                global_bank_size=self.config.global_bank_size,
                max_rows_per_site=min(limit, 2**40),
                feature_dim=self._pins.feature_dim,
                deadline=rnd.deadline,
                expected_sites=len(rnd.expected),
                quorum=rnd.quorum,
                novelty_threshold=rnd.novelty_threshold,
                base_bank_version=rnd.base_version,
                federation_id=self.federation_id,
                full_coreset=bool(site_id) and not self._aggregator.has_radius(site_id),
            )

    def progress(self, site_id: str, round_number: int = 0) -> UploadProgress:
        """A copy of the site's committed position in the round (QueryUploadStatus)."""
        with self.lock:
            rnd = self._round(round_number)
            found = rnd.sites.get(site_id)
            if found is None:
                return UploadProgress(site_id, rnd.number)
            return dataclasses.replace(found)

    def join(
        self, site_id: str, fingerprint: str = ""
    ) -> tuple[RoundTerms, UploadProgress, RoundSnapshot]:
        """JoinRound: the round the site is to take part in (the latest one), its position."""
        with self.lock:
            rnd = self._current
            if site_id not in rnd.expected:
                if site_id in self._joiners:
                    raise RoundClosedError(
                        f"site {site_id!r} was added while round {rnd.number} is "
                        f"{rnd.phase.value}; it takes part from round {rnd.number + 1}, which "
                        "opens when the operator opens it (fedserver round open), by the "
                        "schedule (round_interval_s) or by `rounds`; run again then"
                    )
                if rnd.number > 1 and site_id in self._expected_round1:
                    raise RoundClosedError(
                        f"site {site_id!r} did not complete round 1, so it cannot take part in "
                        f"round {rnd.number}"
                    )
                raise PermissionDeniedError(
                    f"site {site_id!r} is not one of the {len(rnd.expected)} sites this "
                    "federation expects"
                )
            pinned = self._pins.fingerprint
            if fingerprint and pinned and fingerprint != pinned:
                raise IncompatibleSiteError(
                    f"site {site_id!r} extracts features with fingerprint {fingerprint[:12]}..., "
                    f"the federation uses {pinned[:12]}... (backbone, weights, "
                    "layers, dims and image size must match)"
                )
            stats = rnd.site_stats(site_id)
            if stats.joined_at is None:
                stats.joined_at = time.time()
            logger.info("round %d: site %s joined (%s)", rnd.number, site_id, rnd.phase.value)
            return (self.terms(rnd.number, site_id), self.progress(site_id, rnd.number),
                    rnd.snapshot())

    # -- uploads ----------------------------------------------------------------------------

    def submit(self, site_id: str, item: SiteSummary | FeatureChunk, raw: bytes
               ) -> Future[bool]:
        """Accept one upload message of ``site_id`` (the authenticated caller); see
        fedserver.ingest for the pipeline. Returns a future: True once durable and counted,
        False for an identical resend; it fails with StorageError if the journal could not
        store it. Raises a FederationError or core's typed ValueErrors for a rejected message
        (which changes nothing). Every message is counted in the current round's report:
        messages, bytes (``raw``: the serialized UploadFeaturesRequest) and rejections."""
        with self.lock:
            stats = self._current.site_stats(site_id)
            stats.messages_up += 1
            stats.bytes_up += len(raw)
        try:
            future = self._ingest.submit(site_id, item, raw)
        except (FederationError, ValueError) as error:
            with self.lock:
                stats.reject(error)
            raise

        def counted(done: Future[bool]) -> None:
            error = done.exception()
            if error is not None:
                with self.lock:
                    stats.reject(error)

        future.add_done_callback(counted)
        return future

    def receive(self, site_id: str, item: SiteSummary | FeatureChunk, raw: bytes) -> bool:
        """:meth:`submit` and wait: durable on return. True if new, False for a resend."""
        return self.submit(site_id, item, raw).result()

    # -- round transitions (lock held unless said otherwise) --------------------------------

    def _open_round(self, number: int) -> Future[None]:
        """Open round ``number``; returns the future of its ROUND_OPENED record (wait for it
        without the lock)."""
        previous = self._rounds.get(number - 1)
        if previous is None:
            expected = self._expected_round1
            threshold, base = 0.0, 0
        else:
            expected = self.next_expected()
            radius = self._bank.server_radius(previous.bank_version)
            threshold, base = (radius if math.isfinite(radius) else 0.0), previous.bank_version
        self._joiners -= set(expected)
        quorum = min(self.config.quorum or len(expected), len(expected))
        timeout = self.config.round_timeout_s
        deadline = self._clock() + timeout if timeout > 0 else None
        rnd = Round(number, expected, quorum, deadline, threshold, base)
        rnd.opened_at = time.time()
        opened = self.journal.submit(RecordKind.ROUND_OPENED, _json({
            "round": number, "deadline": deadline, "expected": list(expected),
            "quorum": quorum, "novelty_threshold": threshold, "base_version": base,
        }))
        self._aggregator.begin_round(number)
        self._rounds[number] = rnd
        logger.info(
            "round %d opened: expecting %d site(s) %s, quorum %d, deadline %s",
            number, len(expected), list(expected), quorum,
            "none" if deadline is None else time.strftime("%H:%M:%S", time.gmtime(deadline)),
        )
        self._feed.notify()
        return opened

    def next_expected(self) -> tuple[str, ...]:
        """The sites the next round expects (lock held): the current round's complete (or
        included) sites that were not revoked or withdrawn since, and the sites added since."""
        current = self._current
        done = set(current.included or current.complete_sites()) - self._revoked
        return tuple(sorted(done | self._joiners))

    # -- operator commands (fedserver.operator; journaled, so a restart resumes them) --------

    def open_round(self) -> RoundSnapshot:
        """Open the next round now (OpenRound). RoundClosedError unless the current round is
        ready (a failed round ends the rounds: restart the server to take it up again), or when
        no site would take part; StorageError if the journal cannot record it."""
        with self.lock:
            self._check_not_paused("open a round")
            current = self._current
            if current.phase is not Phase.READY:
                raise RoundClosedError(
                    f"round {current.number} is {current.phase.value}: the next round opens "
                    "once it is ready" + (" (it failed: restart the server to take it up "
                                          "again)" if current.phase is Phase.FAILED else "")
                )
            if not self.next_expected():
                raise RoundClosedError(
                    f"no site would take part in round {current.number + 1}: add one first"
                )
            number = current.number + 1
            opened = self._open_round(number)
        if not self._wait_journaled(opened, f"round {number} opened"):
            raise StorageError(f"round {number} opened but the journal cannot record it")
        return self.snapshot(number)

    def add_site(self, site_id: str) -> int:
        """Record that ``site_id`` joins (AddSite; its token is the operator service's
        business). Returns the round it takes part from: the next one to open."""
        with self.lock:
            self._check_not_paused("add a site")
            if site_id in self._joiners:
                return self._current.number + 1
            done = self.journal.submit(RecordKind.SITE_ADDED, _json({"site": site_id}))
            self._joiners.add(site_id)
            self._added.add(site_id)
            self._revoked.discard(site_id)
            self._withdrawn.discard(site_id)
            joins = self._current.number + 1
        try:
            done.result()
        except OSError as error:
            with self.lock:
                self._joiners.discard(site_id)
            raise StorageError(f"cannot record site {site_id!r} in the journal: {error}") from error
        logger.info("site %s added: it takes part from round %d", site_id, joins)
        return joins

    def revoke_site(self, site_id: str) -> str:
        """Stop expecting ``site_id`` (RevokeSite; its token is revoked by the caller). Its
        uploads stay. In a collecting round it is dropped unless its upload is complete; a
        partial upload refuses (withdraw the site instead, which removes it). Returns a line
        saying what changed."""
        with self.lock:
            self._check_not_paused("revoke a site")
            rnd = self._current
            progress = rnd.sites.get(site_id)
            dropped = False
            if rnd.phase is Phase.COLLECTING and site_id in rnd.expected:
                if progress is not None and progress.summary_committed and not progress.complete:
                    raise RoundClosedError(
                        f"site {site_id!r} has a partial upload in round {rnd.number}: withdraw "
                        "it (its rows are removed) or revoke it once the round is ready"
                    )
                if progress is None or not progress.complete:
                    self._drop_expected(rnd, site_id)
                    dropped = True
            done = self.journal.submit(RecordKind.SITE_REVOKED,
                                       _json({"site": site_id, "round": rnd.number}))
            self._revoked.add(site_id)
            self._joiners.discard(site_id)
        try:
            done.result()
        except OSError as error:
            raise StorageError(f"cannot record the revocation in the journal: {error}") from error
        self._after_expected_changed()
        message = (f"site {site_id!r} revoked: later rounds do not expect it; its uploads stay "
                   "in the bank (withdraw it to remove them)")
        if dropped:
            message += f"; round {rnd.number} no longer waits for it"
        logger.info(message)
        return message

    def withdraw_site(self, site_id: str) -> Withdrawal:
        """Withdraw ``site_id`` with exact removal (WithdrawSite): fedserver.membership."""
        return withdraw_site(self, site_id)

    def expected_sites(self, round_number: int = 0) -> tuple[str, ...]:
        with self.lock:
            return self._round(round_number).expected

    def preview_download(self, version: int, have_version: int) -> BankDownload:
        """The DownloadBank reply a site holding ``have_version`` would get (not counted in any
        report): the operator's figures of what a withdrawal costs each site."""
        return self._bank.download(version, have_version)

    def note_withdrawal_deltas(self, withdrawal: Withdrawal,
                               deltas: list[dict[str, Any]]) -> None:
        """Add the bytes each remaining site downloads to the withdrawal's report entry."""
        with self.lock:
            rnd = self._rounds.get(withdrawal.bank_round or withdrawal.round)
            if rnd is None:
                return
            for entry in rnd.withdrawals:
                if entry.get("site_id") == withdrawal.site_id and "deltas" not in entry:
                    entry["deltas"] = deltas
        self._reports.request(rnd.number)

    def membership(self) -> dict[str, Any]:
        """ListSites: per site known to the rounds or the operator, its state and the rounds it
        completed; the current round."""
        with self.lock:
            sites: dict[str, list[int]] = {}
            for number, rnd in sorted(self._rounds.items()):
                for site in rnd.expected:
                    sites.setdefault(site, [])
                for site, progress in rnd.sites.items():
                    if progress.complete:
                        sites.setdefault(site, []).append(number)
            for site in self._joiners | self._revoked | self._added:
                sites.setdefault(site, [])
            states = {}
            for site in sites:
                states[site] = ("withdrawn" if site in self._withdrawn else
                                "revoked" if site in self._revoked else
                                "joining" if site in self._joiners else "active")
            current = self._current
            return {"sites": {s: (states[s], sites[s]) for s in sorted(sites)},
                    "round": current.number, "phase": current.phase.value,
                    "bank_version": self._bank.latest.version if self._bank.latest else 0}

    @property
    def paused(self) -> bool:
        """True while a withdrawal rewrites the journal (ingest answers UNAVAILABLE)."""
        return self._paused

    def _check_not_paused(self, what: str) -> None:
        if self._paused:
            raise BusyError(f"cannot {what} now: a withdrawal is rewriting the journal; retry")

    def _drop_expected(self, rnd: Round, site_id: str) -> None:
        """Remove ``site_id`` from a collecting round's expected sites (lock held)."""
        rnd.expected = tuple(s for s in rnd.expected if s != site_id)
        rnd.quorum = min(rnd.quorum, len(rnd.expected))

    def _after_expected_changed(self) -> None:
        """Close the current round if dropping a site left every expected upload complete."""
        with self.lock:
            self.site_complete(self._current, time.perf_counter())
        self._feed.notify()

    def _start_selection(self, rnd: Round) -> None:
        rnd.phase = Phase.SELECTING
        self._feed.notify()
        joined = {s for s, p in rnd.sites.items() if p.summary_committed}
        rebuild = None
        if rnd.included is not None and joined != set(rnd.included):
            included = set(rnd.included)
            number = rnd.number

            def rebuild() -> GlobalBankAggregator:
                # Cut-off sites' rows are in the aggregator; rebuild it from the journal
                # without them (every included site's chunks are durable: it completed).
                self.journal.barrier()
                return rebuild_aggregator(self.journal, self._new_aggregator,
                                          extra_cutoffs={number: included})

        self._worker.close_round(rnd.number, self._aggregator, self._selected, rebuild=rebuild)

    def _selected(self, result: SelectionResult, aggregator: GlobalBankAggregator) -> None:
        """The worker's report of a round's selection (worker thread, no lock held)."""
        with self.lock:
            rnd = self._rounds[result.round]
        if result.outcome is None:
            error = result.error
            self._fail(rnd, f"selection failed: {type(error).__name__}: {error}",
                       result.tail_seconds)
            return
        outcome = result.outcome
        try:
            version, rows = self._bank.store(rnd.number, outcome.bank, outcome.server_radius,
                                             outcome.max_site_radius)
            closed_at = self._clock()
            self.journal.append_json(RecordKind.ROUND_CLOSED,
                                     {"round": rnd.number, "version": version,
                                      "closed_at": closed_at})
        except OSError as error:
            logger.exception("round %d: cannot store its bank", rnd.number)
            self._fail(rnd, f"selection failed: cannot store the bank: {error}",
                       result.tail_seconds)
            return
        with self.lock:
            self._aggregator = aggregator
            rnd.bank_version, rnd.bank_rows = version, rows
            rnd.allocation = [a.as_dict() for a in outcome.allocation]
            rnd.flooding = dict(outcome.flooding)
            rnd.ready_at = time.perf_counter()
            rnd.ready_unix = time.time()
            started = rnd.completed_at if rnd.completed_at is not None else rnd.ready_at
            rnd.selection_seconds = rnd.ready_at - started
            logger.info(
                "round %d ready: bank version %d, %d rows, selected in %.2f s (backlog %d rows "
                "at close, tail %.2f s), certificate %.4f", rnd.number, version, rows,
                rnd.selection_seconds, result.backlog_rows, result.tail_seconds,
                outcome.certificate,
            )
            report = build_round_report(dataclasses.replace(rnd, phase=Phase.READY),
                                        self._bank.meta(version), **self._report_settings())
        self._reports.write_now(report)  # the report exists before READY is announced
        opened: Future[None] | None = None
        with self.lock:
            rnd.phase = Phase.READY
            if rnd.number < self.config.rounds and not self._closing:
                opened = self._open_round(rnd.number + 1)
            elif self.config.round_interval_s > 0:
                rnd.next_open_at = closed_at + self.config.round_interval_s
        self._feed.notify()
        if opened is not None:
            self._wait_journaled(opened, f"round {rnd.number + 1} opened")

    def _fail(self, rnd: Round, message: str, seconds: float | None = None) -> None:
        """Fail ``rnd`` (no lock held): journal it, write its report, announce it."""
        with self.lock:
            rnd.message = message
            if seconds is not None:
                rnd.selection_seconds = seconds
            logger.error("round %d failed: %s", rnd.number, message)
            failed = self.journal.submit(RecordKind.ROUND_FAILED,
                                         _json({"round": rnd.number, "message": message}))
        try:
            failed.result()
        except OSError as error:
            logger.critical(
                "round %d: cannot journal its failure (%s); a restarted server will take the "
                "round up again from the journaled uploads", rnd.number, error,
            )
        with self.lock:
            report = build_round_report(dataclasses.replace(rnd, phase=Phase.FAILED), None,
                                        **self._report_settings())
        self._reports.write_now(report)
        with self.lock:
            rnd.phase = Phase.FAILED
        self._feed.notify()

    def _wait_journaled(self, future: Future[None], what: str) -> bool:
        """Wait (no lock held) for a lifecycle record; True once durable. If the state
        directory cannot take it, fail the current round loudly (sites are told at once instead
        of waiting on a round that can no longer move; a restarted server, with space again,
        takes it up) and return False."""
        try:
            future.result()
            return True
        except OSError as error:
            with self.lock:
                rnd = self._current
                if rnd.phase in (Phase.READY, Phase.FAILED):
                    return False
                rnd.phase = Phase.FAILED
                rnd.message = (
                    f"{what} but the server's state directory cannot record it ({error}); the "
                    "server needs attention, then a restart resumes the round"
                )
                logger.critical("round %d failed: %s", rnd.number, rnd.message)
            self._reports.request(rnd.number)
            self._feed.notify()
            return False

    def _deadline_loop(self) -> None:
        seen = self._feed.value
        while True:
            cutoff: Future[None] | None = None
            cut: Round = self._current
            failed: Round | None = None
            scheduled: tuple[int, Future[None]] | None = None
            with self.lock:
                if self._closing:
                    return
                rnd = self._current
                if (
                    rnd.phase is Phase.READY and not self._paused
                    and rnd.next_open_at is not None and self._clock() >= rnd.next_open_at
                ):
                    rnd.next_open_at = None
                    if self.next_expected():
                        logger.info("round %d opens by the schedule (round_interval_s = %g)",
                                    rnd.number + 1, self.config.round_interval_s)
                        scheduled = (rnd.number + 1, self._open_round(rnd.number + 1))
                    else:
                        logger.warning("round %d: no site to expect; the schedule stops",
                                       rnd.number + 1)
                elif (
                    not self._paused
                    and rnd.phase is Phase.COLLECTING
                    and rnd.deadline is not None
                    and self._clock() >= rnd.deadline
                ):
                    complete = rnd.complete_sites()
                    if complete and len(complete) >= rnd.quorum:
                        missing = sorted(set(rnd.expected) - set(complete))
                        logger.warning(
                            "round %d: deadline passed; selecting from %d complete upload(s), "
                            "cutting off %s", rnd.number, len(complete), missing,
                        )
                        cutoff = self.journal.submit(RecordKind.ROUND_CUTOFF, _json(
                            {"round": rnd.number, "included": complete}))
                        rnd.included = tuple(complete)
                        rnd.completed_at = time.perf_counter()
                        rnd.uploads_complete_at = time.time()
                        rnd.phase = Phase.SELECTING  # no upload is accepted from now on
                        cut = rnd
                    else:
                        rnd.phase = Phase.SELECTING  # no upload is accepted while it fails
                        failed = rnd
            if scheduled is not None:
                self._wait_journaled(scheduled[1], f"round {scheduled[0]} opened")
            # Select only once the cut-off is durable: a replay must see it before the round's
            # ROUND_CLOSED record.
            if cutoff is not None and self._wait_journaled(cutoff, "its deadline passed"):
                with self.lock:
                    self._start_selection(cut)
            if failed is not None:
                complete = failed.complete_sites()
                self._fail(failed, f"deadline passed with {len(complete)} complete upload(s), "
                           f"quorum is {failed.quorum}")
            seen = self._feed.wait(seen, timeout=0.2)

    # -- downloads and watching -------------------------------------------------------------

    def bank_download(self, site_id: str, version: int = 0, have_version: int = 0) -> BankDownload:
        """DownloadBank: the header, removed indices and chunks of a full bank or a delta."""
        with self.lock:
            current = self._current
            waiting_for = f"round {current.number} is {current.phase.value}"
        download = self._bank.download(version, have_version, waiting_for=waiting_for)
        header = download.header
        logger.info(
            "site %s downloads bank version %d (%s): %d rows in the stream, %d removed",
            site_id, header.version,
            "full" if not header.base_version else f"delta from {header.base_version}",
            header.rows_in_stream, header.rows_removed,
        )
        return download

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
        to the report of the round whose bank it was (aggregated per site; the report is
        rewritten by the debounced writer)."""
        with self.lock:
            rnd = self._rounds.get(header.round)
            if rnd is None or not rnd.reported:
                return  # a bank of a round closed before this process started
            stats = rnd.site_stats(site_id)
            stats.downloads += 1
            stats.downloads_complete += int(complete)
            stats.bytes_down += bytes_sent
            stats.download_seconds += seconds
            stats.last_download = {
                "version": header.version,
                "base_version": header.base_version,
                "rows_in_stream": header.rows_in_stream,
                "rows_removed": header.rows_removed,
                "messages": messages,
                "bytes": bytes_sent,
                "seconds": seconds,
                "complete": complete,
                "at": time.time(),
            }
            due = rnd.phase in (Phase.READY, Phase.FAILED)
        if due:
            self._reports.request(header.round)

    def round_report(self, round_number: int) -> dict[str, Any]:
        """What the round's report holds (fedserver.report), as a JSON-ready dict."""
        with self.lock:
            rnd = self._round(round_number)
            meta = self._bank.meta(rnd.bank_version) if rnd.bank_version else None
            return build_round_report(rnd, meta, **self._report_settings())

    def _report_of(self, round_number: int) -> dict[str, Any] | None:
        with self.lock:
            rnd = self._rounds.get(round_number)
            if rnd is None or not rnd.reported:
                return None
        return self.round_report(round_number)

    def _report_settings(self) -> dict[str, Any]:
        return {"device": self.device, "strategy": self.config.strategy,
                "server_selection": self.config.server_selection, "codec": self.config.codec,
                "global_bank_size": self.config.global_bank_size,
                "floor_fraction": self._aggregator.floor_fraction,
                "max_site_share": self.config.max_site_share}

    async def watch(
        self, round_number: int, min_interval_s: float, is_active: Callable[[], bool]
    ) -> AsyncIterator[RoundSnapshot]:
        """Yield the round's snapshot now and on every change, until READY/FAILED or shutdown.

        A coroutine: a watcher holds no thread while it waits. Changes of rows only are sent
        at most every ``min_interval_s``; ``is_active`` (the rpc is still wanted) is checked at
        least once a second.
        """
        with self.lock:
            number = self._round(round_number).number
        last: RoundSnapshot | None = None
        last_sent = 0.0
        while is_active():
            seen = self._feed.value
            with self.lock:
                current = self._rounds[number].snapshot()
                closing = self._closing
            if current == last and not closing:
                await self._feed.wait_async(seen, timeout=1.0)
                continue
            if closing and current == last:
                return
            rows_only = last is not None and current.phase == last.phase and (
                current.sites_joined == last.sites_joined
                and current.sites_complete == last.sites_complete
            )
            wait = last_sent + min_interval_s - time.monotonic()
            if rows_only and wait > 0:
                await asyncio.sleep(min(wait, 1.0))
                continue
            yield current
            last, last_sent = current, time.monotonic()
            if current.phase in (Phase.READY, Phase.FAILED) or closing:
                return

    def wait_for(self, round_number: int, phases: set[Phase], timeout: float) -> RoundSnapshot:
        """Block until the round reaches one of ``phases`` (tests, benchmarks); TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self._feed.value
            snapshot = self.snapshot(round_number)
            if snapshot.phase in phases:
                return snapshot
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"round {round_number} is still {snapshot.phase.value}")
            self._feed.wait(seen, timeout=min(left, 0.5))

    def _round(self, number: int) -> Round:
        if number == 0:
            return self._current
        found = self._rounds.get(number)
        if found is None:
            raise NotFoundError(
                f"round {number} does not exist (rounds so far: 1..{max(self._rounds)})"
            )
        return found

    # -- settings -----------------------------------------------------------------------------

    def _selection_settings(self) -> dict[str, Any]:
        """Settings a replay depends on: changing them would make a different bank."""
        return {
            "global_bank_size": self.config.global_bank_size,
            "strategy": self.config.strategy,
            "server_selection": self.config.server_selection,
            "floor_fraction": self._aggregator.floor_fraction,  # the default resolved
            "max_site_share": self.config.max_site_share,
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
            # A state directory from before the allocation settings was selected without them.
            legacy = {"floor_fraction": 0.0, "max_site_share": None}
            changed = {k: (stored.get(k, legacy.get(k)), v) for k, v in settings.items()
                       if stored.get(k, legacy.get(k)) != v}
            if changed:
                details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise StateMismatchError(
                    f"state directory {self.journal.state_dir} was created with other selection "
                    f"settings ({details}); use those settings or a new state directory"
                )
        else:
            write_private(path, json.dumps(settings, sort_keys=True))

    def _check_site_limit(self) -> None:
        """``max_rows_per_site`` above a site's share of the buffer is a contradiction."""
        configured = self.config.max_rows_per_site
        capacity = self._aggregator.buffer_capacity
        if configured and capacity is not None:
            share = capacity // max(1, len(self._expected_round1))
            if configured > share:
                raise ConfigError(
                    f"max_rows_per_site = {configured} exceeds a site's share of the selection "
                    f"buffer: buffer_rows = {capacity} over {len(self._expected_round1)} expected "
                    f"site(s) is {share} rows; lower max_rows_per_site (0 = the share) or raise "
                    "buffer_rows"
                )

    def _new_aggregator(self) -> GlobalBankAggregator:
        return GlobalBankAggregator(
            self.config.global_bank_size,
            strategy=self.config.strategy,
            seed=self.config.seed,
            buffer_rows=self.config.buffer_rows,
            device=self.device,
            server_selection=self.config.server_selection,
            floor_fraction=self.config.floor_fraction,
            max_site_share=self.config.max_site_share,
        )


#: File of the state directory that holds its federation id (one line, 32 lowercase hex).
FEDERATION_ID_FILE = "federation_id"


def federation_id_of(state_dir: Path) -> str:
    """The federation id of ``state_dir``, drawn and stored (mode 0600, fsync'ed) on first use.

    128 bits from the OS's CSPRNG, deliberately unseeded: the id must differ between state
    directories (a reset server is another federation) and must not be derivable from the
    config, so two servers with one config still differ. Sites compare it with the id they
    saved with their bank (RoundConfig/BankHeader.federation_id). A state directory created
    before ids existed gets one at its next start (its sites then download one full bank).
    """
    path = Path(state_dir) / FEDERATION_ID_FILE
    if path.exists():
        value = path.read_text(encoding="ascii").strip()
        if len(value) != 32 or any(c not in "0123456789abcdef" for c in value):
            raise StateMismatchError(
                f"{path} must hold 32 lowercase hex characters, got {value[:40]!r}: restore it "
                "or remove it (sites then download the full bank once)"
            )
        return value
    value = secrets.token_hex(16)
    write_private(path, value + "\n")
    logger.info("new federation id %s (state directory %s)", value, state_dir)
    return value


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")
