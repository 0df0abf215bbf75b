"""A round's state: phase, the sites' upload positions, what its report counts.

The round state machine (fedserver.federation drives it)::

    COLLECTING --every expected site complete--> SELECTING --bank stored--> READY
        |  \\--deadline, >= quorum complete: cut the others off--/        \\--error--> FAILED
        \\--deadline below quorum (or the state directory cannot record it)--> FAILED

Only the data lives here; every field is read and written under the federation's state lock.
:class:`RoundSnapshot`, :class:`UploadProgress` copies and :class:`RoundTerms` are the values
handed out to rpc handlers (they never see a live ``Round``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from core.codec import CodecConfig
from core.messages import SiteSummary

__all__ = [
    "Phase",
    "Round",
    "RoundSnapshot",
    "RoundTerms",
    "SiteStats",
    "UploadProgress",
]

#: Rejected messages a round report keeps per site (the latest ones; all are counted).
REJECTIONS_KEPT = 5


class Phase(enum.Enum):
    """Round lifecycle (RoundState in federation.proto)."""

    COLLECTING = "collecting"
    SELECTING = "selecting"
    READY = "ready"
    FAILED = "failed"


@dataclass
class UploadProgress:
    """A site's durable position in one round (UploadStatus in federation.proto).

    ``committed_*`` count what the journal holds (fsync'ed): what the site is told and
    resumes from. ``accepted_sequence`` runs ahead of it by the chunks that passed validation
    and wait for the journal's group commit; a chunk must follow the accepted position.
    """

    site_id: str
    round: int
    summary: SiteSummary | None = None
    committed_sequence: int = 0
    committed_rows: int = 0
    complete: bool = False
    accepted_sequence: int = 0
    generation: int = 0  # bumped when a failed journal append rolls the site back

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
    """What a site needs to take part in a round (RoundConfig in federation.proto).

    max_rows_per_site: the most rows this site may announce this round (its fair share of the
    server's buffer, or the configured limit if that is lower).
    """

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
    federation_id: str = ""
    full_coreset: bool = False


@dataclass
class SiteStats:
    """What a round report says about one site (unix times from time.time(); None: unknown).

    Downloads of the round's bank are aggregated (count, bytes, seconds, the latest one), so
    a site that downloads a thousand times costs the report no more than one that downloads
    once.
    """

    joined_at: float | None = None
    upload_complete_at: float | None = None
    messages_up: int = 0
    bytes_up: int = 0
    chunks_resent: int = 0
    rejected_count: int = 0
    rejected: list[str] = field(default_factory=list)  # latest first, at most REJECTIONS_KEPT
    downloads: int = 0
    downloads_complete: int = 0
    bytes_down: int = 0
    download_seconds: float = 0.0
    last_download: dict[str, Any] | None = None

    def reject(self, error: BaseException) -> None:
        self.rejected_count += 1
        self.rejected.insert(0, f"{type(error).__name__}: {error}")
        del self.rejected[REJECTIONS_KEPT:]


@dataclass
class Round:
    """One round; mutated under the federation's lock only.

    completed_at / ready_at: perf_counter of the last complete upload (or the cut-off) and of
    the bank being stored and announced (the selection tail); ``reported`` is False for a round
    that had closed before this process started (its report was written then).
    """

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
    completed_at: float | None = None
    ready_at: float | None = None
    stats: dict[str, SiteStats] = field(default_factory=dict)
    opened_at: float | None = None
    uploads_complete_at: float | None = None
    ready_unix: float | None = None
    selection_seconds: float | None = None
    restarted: bool = False
    reported: bool = True
    # The selection's rows per site (core.federated.allocation.SiteAllocation.as_dict) and the
    # sites flagged as flooding the bank (-> rows-per-patch ratio against the others).
    allocation: list[dict[str, object]] = field(default_factory=list)
    flooding: dict[str, float] = field(default_factory=dict)
    # Per site, the identity (core.serde.chunk_identity) of each committed chunk: a resend
    # after the round closed is recognised as identical, and ignored, without the chunk.
    committed_chunks: dict[str, list[tuple[object, ...]]] = field(default_factory=dict)
    # Withdrawals that reselected this round's bank, or happened while it collected
    # (fedserver.membership): what the report says about each.
    withdrawals: list[dict[str, Any]] = field(default_factory=list)
    # When the next round opens by the schedule (round_interval_s), in the federation clock.
    next_open_at: float | None = None

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

    def all_complete(self) -> bool:
        return all(s in self.sites and self.sites[s].complete for s in self.expected)

    def site_stats(self, site_id: str) -> SiteStats:
        return self.stats.setdefault(site_id, SiteStats())

    def progress_of(self, site_id: str) -> UploadProgress:
        return self.sites.setdefault(site_id, UploadProgress(site_id, self.number))
