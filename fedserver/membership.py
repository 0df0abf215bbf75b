"""Withdrawing a site with exact removal: its uploads leave the journal and the stored banks.

A memory bank, unlike averaged model weights, can be edited exactly: the bank is a selection
from the uploaded rows, and the journal holds every upload. Withdrawing site W:

1. **Pause.** Uploads and lifecycle changes wait (ingest answers UNAVAILABLE, which sites
   retry); the journal's writer drains (:meth:`Journal.barrier`). Refused while a round selects.
2. **Rebuild.** A fresh aggregator is fed the journal without W's SUMMARY/CHUNK records
   (:func:`without_site`; fedserver.replay.rebuild_aggregator), so it is the aggregator of a
   federation in which W never took part, given the same uploads of the others: its latest
   closed round's bank is the new bank, bit for bit, and its r_i record no longer holds W's.
3. **Rewrite the journal** without W's records (round records name W no more either) plus a
   SITE_WITHDRAWN record, atomically (:meth:`Journal.rewrite`: new file, fsync, rename,
   directory fsync). This is the commit point.
4. **Purge the banks.** Every stored version holding one of W's rows (found by the rows' bits,
   :func:`fedserver.bankstore.row_digest`) is deleted, except the latest, which the sites hold:
   it is rewritten without W's rows, keeping only their positions, so a site's delta from it to
   the new version still says which rows of its copy to drop (BankStore.purge). The new bank is
   stored as a new version; every remaining site gets it as a delta.
5. **Rounds.** W is revoked (never expected again unless added again); in a collecting round it
   is no longer expected and its partial upload is gone with its records; the round report of
   the bank's round records the withdrawal.

A crash after step 3 is finished at the next start: the replay applies the SITE_WITHDRAWN
record's purge again (idempotent) and stores the new version if it is missing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from core.bankdelta import stable_order
from core.codec import decode_matrix
from core.messages import FeatureChunk
from core.serde import upload_request_from_proto
from fedpatchcore.v1 import features_pb2 as pb
from fedserver.bankstore import row_digest
from fedserver.errors import NotFoundError, RoundClosedError
from fedserver.journal import Journal, Record, RecordKind
from fedserver.replay import rebuild_aggregator
from fedserver.rounds import Phase

if TYPE_CHECKING:
    from fedserver.federation import Federation

logger = logging.getLogger(__name__)

__all__ = ["Withdrawal", "withdraw_site", "without_site"]


@dataclasses.dataclass(frozen=True)
class Withdrawal:
    """What a withdrawal did (WithdrawSiteResponse; the round report's entry).

    rows_from_journal: rows W uploaded, all rounds; rows_from_bank: W's rows in the latest bank.
    version_before/after: the latest bank before and after (equal: unchanged, or no bank yet).
    deleted / redacted: stored versions deleted, and rewritten without W's rows.
    bank_round: the round whose bank was reselected (0: none had closed).
    """

    site_id: str
    round: int
    bank_round: int
    rows_from_journal: int
    rows_from_bank: int
    version_before: int
    version_after: int
    deleted: tuple[int, ...]
    redacted: tuple[int, ...]
    journal_bytes_before: int
    journal_bytes_after: int

    def record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "deleted": list(self.deleted),
                "redacted": list(self.redacted)}


def _encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True).encode("utf-8")


def without_site(records: Iterable[Record], site_id: str) -> Iterator[Record]:
    """``records`` as if ``site_id`` had never taken part: its SUMMARY/CHUNK and SITE_ADDED /
    SITE_REVOKED records dropped, its id removed from ROUND_OPENED's expected sites (quorum
    lowered to fit) and from ROUND_CUTOFF's included ones."""
    for record in records:
        kind = record.kind
        if kind in (RecordKind.SUMMARY, RecordKind.CHUNK):
            item = upload_request_from_proto(pb.UploadFeaturesRequest.FromString(record.payload))
            if item.site_id == site_id:
                continue
        elif kind in (RecordKind.SITE_ADDED, RecordKind.SITE_REVOKED):
            if record.json()["site"] == site_id:
                continue
        elif kind is RecordKind.ROUND_OPENED:
            value = record.json()
            if site_id in value["expected"]:
                value["expected"] = [s for s in value["expected"] if s != site_id]
                value["quorum"] = min(int(value["quorum"]), len(value["expected"]))
                record = Record(kind, _encode(value))
        elif kind is RecordKind.ROUND_CUTOFF:
            value = record.json()
            if site_id in value["included"]:
                value["included"] = [s for s in value["included"] if s != site_id]
                record = Record(kind, _encode(value))
        yield record


class _WithoutSite:
    """A journal seen through :func:`without_site` (what rebuild_aggregator reads)."""

    def __init__(self, journal: Journal, site_id: str) -> None:
        self._journal = journal
        self._site_id = site_id

    def records(self) -> Iterator[Record]:
        return without_site(self._journal.records(), self._site_id)


def _site_rows(journal: Journal, site_id: str) -> tuple[int, set[bytes]]:
    """(rows ``site_id`` uploaded, the digests of those rows as the server decoded them)."""
    rows, digests = 0, set()
    for record in journal.records():
        if record.kind is not RecordKind.CHUNK:
            continue
        item = upload_request_from_proto(pb.UploadFeaturesRequest.FromString(record.payload))
        if item.site_id != site_id:
            continue
        assert isinstance(item, FeatureChunk)
        decoded = decode_matrix(item.features, max_decoded_bytes=item.features.decoded_size)
        rows += decoded.shape[0]
        digests.update(row_digest(row) for row in decoded)
    return rows, digests


def withdraw_site(federation: Federation, site_id: str) -> Withdrawal:
    """Withdraw ``site_id`` (module docstring). NotFoundError for a site the federation does
    not know (or withdrew already), RoundClosedError while a round selects, BusyError while
    another withdrawal runs."""
    fed = federation
    with fed.lock:
        fed._check_not_paused("withdraw a site")
        known = (site_id in fed._joiners or site_id in fed._added or site_id in fed._revoked
                 or any(site_id in r.expected or site_id in r.sites
                        for r in fed._rounds.values()))
        if site_id in fed._withdrawn or not known:
            raise NotFoundError(
                f"site {site_id!r} is not part of this federation"
                + (" any more (withdrawn already)" if site_id in fed._withdrawn else "")
            )
        _check_not_selecting(fed)
        fed._paused = True
    try:
        fed.journal.barrier()  # every accepted message is durable; nothing new arrives
        with fed.lock:
            _check_not_selecting(fed)
        return _withdraw(fed, site_id)
    finally:
        with fed.lock:
            fed._paused = False
        fed.changed()


def _check_not_selecting(fed: Federation) -> None:
    current = fed._current
    if current.phase is Phase.SELECTING:
        raise RoundClosedError(
            f"round {current.number} is selecting its bank; withdraw site once it is ready"
        )


def _withdraw(fed: Federation, site_id: str) -> Withdrawal:
    journal = fed.journal
    started = time.perf_counter()
    bytes_before = journal.path.stat().st_size
    rows_uploaded, digests = _site_rows(journal, site_id)
    aggregator = rebuild_aggregator(_WithoutSite(journal, site_id), fed._new_aggregator)
    outcome = aggregator.last_outcome
    bank = fed._bank
    latest = bank.latest
    before = latest.version if latest is not None else 0
    found = bank.rows_of(digests)
    redacted = {before: found[before]} if before in found else {}
    deleted = sorted(v for v in found if v != before)
    changed = False
    if outcome is not None and latest is not None:
        ordered = stable_order(latest.bank, outcome.bank)
        changed = bool(redacted) or not np.array_equal(ordered, latest.bank)
    after = before + 1 if changed else before
    with fed.lock:
        current = fed._current.number
    withdrawal = Withdrawal(
        site_id=site_id, round=current, bank_round=outcome.round if outcome else 0,
        rows_from_journal=rows_uploaded, rows_from_bank=len(redacted.get(before, [])),
        version_before=before, version_after=after, deleted=tuple(deleted),
        redacted=tuple(redacted), journal_bytes_before=bytes_before, journal_bytes_after=0,
    )
    record = {**withdrawal.record(), "site": site_id,
              "positions": {str(v): p for v, p in redacted.items()}}
    bytes_after = journal.rewrite(itertools.chain(
        without_site(journal.records(), site_id),
        [Record(RecordKind.SITE_WITHDRAWN, _encode(record))],
    ))
    withdrawal = dataclasses.replace(withdrawal, journal_bytes_after=bytes_after)
    bank.purge(deleted, redacted)
    rows = 0
    if changed:
        assert outcome is not None
        version, rows = bank.store(withdrawal.bank_round, outcome.bank, outcome.server_radius,
                                   outcome.max_site_radius)
        if version != after:
            raise RuntimeError(f"withdrawal stored bank version {version}, expected {after}")
    with fed.lock:
        fed._aggregator = aggregator
        apply_withdrawal(fed, site_id)
        if changed:
            rnd = fed._rounds[withdrawal.bank_round]
            rnd.bank_version, rnd.bank_rows = after, rows
            rnd.allocation = [a.as_dict() for a in outcome.allocation]
            rnd.flooding = dict(outcome.flooding)
        entry = {**withdrawal.record(), "at": time.time(),
                 "seconds": time.perf_counter() - started}
        target = fed._rounds[withdrawal.bank_round or withdrawal.round]
        target.withdrawals.append(entry)
    logger.warning(
        "site %s withdrawn: %d uploaded row(s) removed from the journal (%d -> %d bytes), %d "
        "from bank version %d; bank version %d%s; versions deleted %s, redacted %s",
        site_id, rows_uploaded, bytes_before, bytes_after, withdrawal.rows_from_bank, before,
        after, " (reselected)" if changed else " (unchanged)", deleted, sorted(redacted),
    )
    fed._after_expected_changed()
    fed._reports.request(target.number)
    return withdrawal


def apply_withdrawal(fed: Federation, site_id: str) -> None:
    """The rounds' side of a withdrawal (lock held; live and at replay): the site is revoked,
    no round expects it from now on, and the collecting round forgets its upload."""
    fed._withdrawn.add(site_id)
    fed._revoked.add(site_id)
    fed._joiners.discard(site_id)
    fed._expected_round1 = tuple(s for s in fed._expected_round1 if s != site_id)
    current = fed._current
    if current.phase is Phase.COLLECTING:
        if site_id in current.expected:
            fed._drop_expected(current, site_id)
        current.sites.pop(site_id, None)
        current.committed_chunks.pop(site_id, None)
