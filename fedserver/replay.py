"""Start-up: rebuild the federation's state from its journal.

The journal holds every accepted upload message as the serialized request itself, and the round
lifecycle events, in the order they became durable. Replaying feeds the same messages, in the
same order, through the same aggregator calls the live path made (``receive_summary``,
``accept_chunk`` + ``add_rows``), so the aggregator comes back in the same state; each closed
round's selection is recomputed and checked against its stored bank version
(JournalCorruptError if they differ). Rounds, upload positions and per-site counts come back
too; timings do not (the journal keeps what a replay needs, not when things happened).

Cut-off sites: a round that closed at its deadline selected without the sites it cut off
(ROUND_CUTOFF names the included ones); their messages stay in the journal but are not fed.

Membership (fedserver.membership): SITE_ADDED / SITE_REVOKED / SITE_WITHDRAWN records restore
the joiners, the revoked and withdrawn sites. A withdrawal rewrote the journal without the
site's uploads, so rounds closed before it no longer reproduce their stored versions (those
held the site's rows, and were deleted or redacted): they are adopted unverified, and the
SITE_WITHDRAWN record's reselected version is checked instead (or stored, when a crash came
between the journal's rewrite and the bank's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from core.federated.aggregator import GlobalBankAggregator
from core.messages import FeatureChunk, SiteSummary
from core.serde import chunk_identity, upload_request_from_proto
from fedpatchcore.v1 import features_pb2 as pb
from fedserver.journal import Record, RecordKind
from fedserver.rounds import Phase, Round

if TYPE_CHECKING:
    from fedserver.federation import Federation

logger = logging.getLogger(__name__)

__all__ = ["JournalOutline", "outline_journal", "rebuild_aggregator", "replay_journal"]


class RecordSource(Protocol):
    """A journal, or a view of one (fedserver.membership reads one without a site)."""

    def records(self) -> Iterator[Record]: ...


def _item(record: Record) -> SiteSummary | FeatureChunk:
    return upload_request_from_proto(pb.UploadFeaturesRequest.FromString(record.payload))


@dataclass(frozen=True)
class JournalOutline:
    """What start-up must know before it replays (one pass over the journal's records).

    cutoffs: per round that cut sites off at its deadline, the sites it included.
    departed: sites revoked or withdrawn and not added again since (not expected any more).
    last_withdrawal: 1-based position of the last SITE_WITHDRAWN record (0: none); rounds
        closed before it selected with the withdrawn site's rows.
    """

    cutoffs: dict[int, set[str]]
    departed: set[str]
    last_withdrawal: int


def outline_journal(journal: RecordSource) -> JournalOutline:
    """The :class:`JournalOutline` of ``journal``: one read of every record, which costs as
    much as the replay's own (the chunks make up the file), so start-up reads it twice, not
    once per question."""
    cutoffs: dict[int, set[str]] = {}
    departed: set[str] = set()
    last_withdrawal = 0
    for position, record in enumerate(journal.records(), 1):
        if record.kind is RecordKind.ROUND_CUTOFF:
            value = record.json()
            cutoffs[int(value["round"])] = set(value["included"])
        elif record.kind is RecordKind.SITE_ADDED:
            departed.discard(str(record.json()["site"]))
        elif record.kind in (RecordKind.SITE_REVOKED, RecordKind.SITE_WITHDRAWN):
            departed.add(str(record.json()["site"]))
            if record.kind is RecordKind.SITE_WITHDRAWN:
                last_withdrawal = position
    return JournalOutline(cutoffs, departed, last_withdrawal)


def _feed(aggregator: GlobalBankAggregator, item: SiteSummary | FeatureChunk) -> None:
    if isinstance(item, SiteSummary):
        aggregator.receive_summary(item)
    else:
        aggregator.receive_chunk(item)


def rebuild_aggregator(
    journal: RecordSource,
    new_aggregator: Callable[[], GlobalBankAggregator],
    *,
    extra_cutoffs: Mapping[int, set[str]] | None = None,
) -> GlobalBankAggregator:
    """A fresh aggregator fed the journal again, without cut-off sites' messages; the round
    being closed passes its cut-off in ``extra_cutoffs`` (its record may be the newest)."""
    cutoffs = {**outline_journal(journal).cutoffs, **(extra_cutoffs or {})}
    aggregator = new_aggregator()
    for record in journal.records():
        if record.kind is RecordKind.ROUND_OPENED:
            aggregator.begin_round(int(record.json()["round"]))
        elif record.kind in (RecordKind.SUMMARY, RecordKind.CHUNK):
            item = _item(record)
            if item.round in cutoffs and item.site_id not in cutoffs[item.round]:
                continue
            _feed(aggregator, item)
        elif record.kind is RecordKind.ROUND_CLOSED:
            aggregator.finish_round()
    logger.info("rebuilt the aggregator without cut-off sites: %s", cutoffs)
    return aggregator


def replay_journal(federation: Federation, outline: JournalOutline) -> None:
    """Rebuild rounds, upload positions, the aggregator and bank versions from the journal
    (``outline``: :func:`outline_journal` of it)."""
    journal = federation.journal
    cutoffs = outline.cutoffs
    rounds = federation._rounds
    aggregator = federation.aggregator
    pins = federation._pins
    # Rounds closed before the last withdrawal selected with the withdrawn site's rows.
    unverified_until = outline.last_withdrawal
    count = 0
    for record in journal.records():
        count += 1
        if record.kind is RecordKind.ROUND_OPENED:
            value = record.json()
            number = int(value["round"])
            aggregator.begin_round(number)
            rounds[number] = Round(
                number,
                tuple(value["expected"]),
                int(value["quorum"]),
                value["deadline"],
                float(value["novelty_threshold"]),
                int(value["base_version"]),
                restarted=True,
            )
            federation._joiners -= set(value["expected"])
        elif record.kind in (RecordKind.SUMMARY, RecordKind.CHUNK):
            item = _item(record)
            rnd = rounds[item.round]
            progress = rnd.progress_of(item.site_id)
            stats = rnd.site_stats(item.site_id)
            stats.messages_up += 1  # what the journal holds: accepted messages only
            stats.bytes_up += len(record.payload)
            if item.round not in cutoffs or item.site_id in cutoffs[item.round]:
                _feed(aggregator, item)
            if isinstance(item, SiteSummary):
                progress.summary = item
                pins.fingerprint = pins.fingerprint or item.feature_fingerprint
                pins.feature_dim = pins.feature_dim or item.feature_dim
            else:
                progress.committed_sequence += 1
                progress.accepted_sequence = progress.committed_sequence
                progress.committed_rows += item.features.rows
                progress.complete = item.last
                rnd.committed_chunks.setdefault(item.site_id, []).append(chunk_identity(item))
        elif record.kind is RecordKind.ROUND_CUTOFF:
            value = record.json()
            rounds[int(value["round"])].included = tuple(value["included"])
        elif record.kind is RecordKind.ROUND_CLOSED:
            value = record.json()
            number, version = int(value["round"]), int(value["version"])
            rnd = rounds[number]
            outcome = aggregator.finish_round()
            if count < unverified_until:
                rows = federation._bank.adopt(version)
            else:
                rows = federation._bank.verify_replayed(number, version, outcome.bank)
            rnd.phase, rnd.bank_version, rnd.bank_rows = Phase.READY, version, rows
            interval = federation.config.round_interval_s
            if interval > 0 and "closed_at" in value:
                rnd.next_open_at = float(value["closed_at"]) + interval
            rnd.allocation = [a.as_dict() for a in outcome.allocation]
            rnd.flooding = dict(outcome.flooding)
            rnd.reported = False  # closed before this process started: its report exists
            logger.info("replayed round %d: bank version %d verified", number, version)
        elif record.kind is RecordKind.ROUND_FAILED:
            value = record.json()
            rnd = rounds[int(value["round"])]
            rnd.phase, rnd.message = Phase.FAILED, str(value["message"])
            rnd.reported = False
        elif record.kind in (RecordKind.SITE_ADDED, RecordKind.SITE_REVOKED,
                             RecordKind.SITE_WITHDRAWN):
            _replay_membership(federation, record, verify=count == unverified_until)
    if count:
        current = federation.current_round()
        logger.info(
            "replayed %d journal record(s): round %d is %s with %d row(s) committed",
            count, current.number, current.phase.value, current.snapshot().rows_received,
        )
        if current.phase is Phase.READY and current.number < federation.config.rounds:
            with federation.lock:
                opened = federation._open_round(current.number + 1)
            opened.result()


def _replay_membership(federation: Federation, record: Record, *, verify: bool) -> None:
    """A SITE_* record at start (fedserver.membership, Federation.add_site / revoke_site).
    ``verify``: the journal's last withdrawal, whose bank the replayed aggregator must
    reproduce (an earlier one's bank held rows of a site withdrawn later)."""
    from fedserver.membership import apply_withdrawal

    value = record.json()
    site = str(value["site"])
    if record.kind is RecordKind.SITE_ADDED:
        federation._joiners.add(site)
        federation._added.add(site)
        federation._revoked.discard(site)
        federation._withdrawn.discard(site)
        return
    if record.kind is RecordKind.SITE_REVOKED:
        federation._revoked.add(site)
        federation._joiners.discard(site)
        current = federation.current_round()
        progress = current.sites.get(site)
        if (current.phase is Phase.COLLECTING and site in current.expected
                and (progress is None or not progress.complete)):
            federation._drop_expected(current, site)
        return
    bank = federation._bank
    bank.purge([int(v) for v in value["deleted"]],
               {int(v): list(p) for v, p in value["positions"].items()})
    after, before = int(value["version_after"]), int(value["version_before"])
    bank_round = int(value["bank_round"])
    if after != before:
        outcome = federation.aggregator.last_outcome
        assert outcome is not None
        if not verify:
            rows = bank.adopt(after)
        elif after in federation.journal.bank_versions():
            rows = bank.verify_replayed(bank_round, after, outcome.bank)
        else:  # the server stopped between the journal's rewrite and the new version
            version, rows = bank.store(bank_round, outcome.bank, outcome.server_radius,
                                       outcome.max_site_radius)
            logger.warning("stored bank version %d of %s's withdrawal at start", version, site)
        rnd = federation._rounds[bank_round]
        rnd.bank_version, rnd.bank_rows = after, rows
    apply_withdrawal(federation, site)
    federation._rounds[bank_round or int(value["round"])].withdrawals.append(
        {k: v for k, v in value.items() if k != "positions"}
    )
