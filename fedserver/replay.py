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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from core.federated.aggregator import GlobalBankAggregator
from core.messages import FeatureChunk, SiteSummary
from core.serde import chunk_identity, upload_request_from_proto
from fedpatchcore.v1 import features_pb2 as pb
from fedserver.journal import Journal, Record, RecordKind
from fedserver.rounds import Phase, Round

if TYPE_CHECKING:
    from fedserver.federation import Federation

logger = logging.getLogger(__name__)

__all__ = ["cut_off_sites", "rebuild_aggregator", "replay_journal"]


def _item(record: Record) -> SiteSummary | FeatureChunk:
    return upload_request_from_proto(pb.UploadFeaturesRequest.FromString(record.payload))


def cut_off_sites(journal: Journal) -> dict[int, set[str]]:
    """Per round that cut sites off at its deadline: the sites it included."""
    cutoffs = {}
    for record in journal.records():
        if record.kind is RecordKind.ROUND_CUTOFF:
            value = record.json()
            cutoffs[int(value["round"])] = set(value["included"])
    return cutoffs


def _feed(aggregator: GlobalBankAggregator, item: SiteSummary | FeatureChunk) -> None:
    if isinstance(item, SiteSummary):
        aggregator.receive_summary(item)
    else:
        aggregator.receive_chunk(item)


def rebuild_aggregator(
    journal: Journal,
    new_aggregator: Callable[[], GlobalBankAggregator],
    *,
    extra_cutoffs: Mapping[int, set[str]] | None = None,
) -> GlobalBankAggregator:
    """A fresh aggregator fed the journal again, without cut-off sites' messages; the round
    being closed passes its cut-off in ``extra_cutoffs`` (its record may be the newest)."""
    cutoffs = {**cut_off_sites(journal), **(extra_cutoffs or {})}
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


def replay_journal(federation: Federation) -> None:
    """Rebuild rounds, upload positions, the aggregator and bank versions from the journal."""
    journal = federation.journal
    cutoffs = cut_off_sites(journal)
    rounds = federation._rounds
    aggregator = federation.aggregator
    pins = federation._pins
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
            rows = federation._bank.verify_replayed(number, version, outcome.bank)
            rnd.phase, rnd.bank_version, rnd.bank_rows = Phase.READY, version, rows
            rnd.allocation = [a.as_dict() for a in outcome.allocation]
            rnd.flooding = dict(outcome.flooding)
            rnd.reported = False  # closed before this process started: its report exists
            logger.info("replayed round %d: bank version %d verified", number, version)
        elif record.kind is RecordKind.ROUND_FAILED:
            value = record.json()
            rnd = rounds[int(value["round"])]
            rnd.phase, rnd.message = Phase.FAILED, str(value["message"])
            rnd.reported = False
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
