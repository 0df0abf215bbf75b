"""The server's transport-agnostic handler: site summaries and feature chunks in, global bank out.

Both the in-process simulation (:class:`~core.federated.server.FederatedServer`) and the gRPC
daemon feed this class decoded domain messages; neither has its own aggregation logic.

A round goes: ``begin_round(r)``; per site one :class:`~core.messages.SiteSummary`, then its
:class:`~core.messages.FeatureChunk` stream (in order; identical resends are ignored, so a retried
upload is idempotent); ``finish_round()`` selects the bank. Rows are consumed as each chunk
arrives, by the :class:`~core.coreset.IncrementalCoreset` (strategy "coreset") or a
:class:`~core.federated.reservoir.WeightedReservoir` (strategy "random"), so the server never
holds all uploads: memory is about the selector's buffer plus one chunk.

Errors are typed; a rejected message changes nothing, so nothing already accepted is lost.

Determinism: farthest-first depends on the order of its rows, and a server receives the sites'
chunks interleaved in whatever order the network delivers them. The aggregator remembers where
each chunk's rows sit in the selector's buffer and, before selecting, sorts the buffer into the
canonical order (round, site_id, row_offset), so the same uploads give the same bank whatever
the interleaving, and the gRPC daemon's bank equals the in-process one. This holds while every
row fits the selector's buffer (``buffer_rows``; no reduce): after a reduce, the reduced rows
depend on the arrival order (each reduce is still certified, the bank is just not unique), and
the aggregator logs that the order is no longer canonical. The random strategy samples by
arrival order (its keys are drawn per arriving row), so it is reproducible only for one order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from core.coreset import IncrementalCoreset
from core.federated.allocation import (
    DEFAULT_FLOOR_FRACTION,
    SiteAllocation,
    check_allocation_settings,
    flooding,
)
from core.federated.prefix import CapacityError, PrefixMergeSelector
from core.federated.reservoir import WeightedReservoir
from core.messages import FeatureChunk, SiteSummary
from core.serde import ChunkAssembler

logger = logging.getLogger(__name__)

__all__ = [
    "AggregationError",
    "CodecMismatchError",
    "GlobalBankAggregator",
    "IncompatibleSiteError",
    "RoundOutcome",
    "RoundStateError",
    "ServerSelection",
    "SiteLimitError",
    "Strategy",
    "SummaryConflictError",
    "UploadSizeMismatchError",
    "check_chunk_codec",
    "log_allocation",
    "summary_difference",
    "warn_if_bank_short",
]

Strategy = Literal["coreset", "random"]
#: How the "coreset" strategy picks the bank from the uploads: "prefix" keeps the k rows the
#: sites picked at the largest local radius (core.federated.prefix; the default: it meets the
#: realistic parity benchmark's bar everywhere); "farthest_first" runs farthest-first again
#: over the union (the old selection: coarser coverage of common patterns, see that module).
ServerSelection = Literal["prefix", "farthest_first"]
SERVER_SELECTIONS: tuple[str, ...] = ("prefix", "farthest_first")

#: Default rows the server's coreset selector buffers before its first reduce (uploads beyond
#: it are merged and reduced with a certified radius). Pages are touched only as rows arrive.
SERVER_BUFFER_ROWS = 131072


class AggregationError(ValueError):
    """A message does not fit the aggregation's state (the message says why)."""


class RoundStateError(AggregationError):
    """Wrong round, a chunk before its site's summary, finishing with uploads missing, ..."""


class IncompatibleSiteError(AggregationError):
    """A site's features cannot be merged: other extractor (fingerprint) or dimension."""


class SiteLimitError(AggregationError):
    """An upload larger than the server can hold for it: a limit of the server, not a malformed
    message (gRPC RESOURCE_EXHAUSTED). The message names the limit."""


class SummaryConflictError(AggregationError):
    """A site resent its summary of the open round with other content. A message that
    contradicts what the site already sent is malformed (INVALID_ARGUMENT), like a chunk resent
    with other content (core.serde.ChunkConflictError): resending it cannot succeed, whatever
    state the round is in."""


class CodecMismatchError(AggregationError):
    """A chunk's value type is not the one its site's SiteSummary.codec declared. The summary's
    r_i includes the declared codec's round-trip error, so rows sent with another value type
    (int4 for int8, say) could lie farther from the site's patches than r_i certifies."""


class UploadSizeMismatchError(AggregationError):
    """A site's last chunk ends its upload at another row count than its SiteSummary declared
    (``coreset_rows``): its summary (r_i, num_patches) would describe rows that never came."""


def warn_if_bank_short(requested: int, bank_rows: int, available: int) -> bool:
    """Warn when the bank came out smaller than asked for; True if it did.

    A bank cannot hold more rows than the sites uploaded, so ``global_bank_size`` above that
    silently meant a smaller bank (3,920 rows for 10,000 asked). Records should carry
    ``bank_rows``, the real size.
    """
    if bank_rows >= requested:
        return False
    logger.warning(
        "global bank has %d rows, fewer than the %d asked for: the sites uploaded only %d rows "
        "(raise the sites' upload_factor or coreset_percentage, or lower global_bank_size)",
        bank_rows, requested, available,
    )
    return True


def log_allocation(outcome: RoundOutcome) -> None:
    """Log each site's rows kept against its share, a warning per site flagged as flooding the
    bank, and one per site the cap (max_site_share) took rows from."""
    if not outcome.allocation:
        return
    logger.info("round %d: rows kept per site (kept / uploaded, proportional share, floor): %s",
                outcome.round, ", ".join(
                    f"{a.site_id} {a.kept}/{a.uploaded} ({a.proportional:.1f}, {a.floor})"
                    for a in outcome.allocation))
    bank = max(1, sum(a.kept for a in outcome.allocation))
    patches = max(1, sum(a.num_patches for a in outcome.allocation))
    for a in outcome.allocation:
        if a.site_id in outcome.flooding:
            logger.warning(
                "round %d: site %s floods the bank: it keeps %d of %d rows (%.1f %%) with %.1f "
                "%% of the patches, %.1f x the other sites' rows per patch; check its camera, "
                "data and extractor (max_site_share caps a site's rows)",
                outcome.round, a.site_id, a.kept, bank, 100 * a.kept / bank,
                100 * a.num_patches / patches, outcome.flooding[a.site_id],
            )
        if a.capped:
            logger.warning("round %d: max_site_share capped site %s at %d rows (it would have "
                           "kept %d)", outcome.round, a.site_id, a.kept, a.uncapped)


def check_chunk_codec(chunk: FeatureChunk, summary: SiteSummary) -> None:
    """Raise CodecMismatchError unless ``chunk`` has the value type of ``summary.codec``.

    Only the value type decides the decoded values (with the chunking), so only it bounds the
    error r_i must include; byte_shuffle, zstd_level and the checksum type are lossless
    transport choices that each EncodedMatrix declares for itself.
    """
    declared = summary.codec.value_type
    actual = chunk.features.value_type
    if actual != declared:
        raise CodecMismatchError(
            f"chunk {chunk.sequence} of site {chunk.site_id!r} is encoded as {actual!r}, its "
            f"SiteSummary declared {declared!r}: every chunk must use the summary's value type "
            "(the site's coverage radius includes that codec's error)"
        )


def summary_difference(first: SiteSummary, second: SiteSummary) -> str:
    """Which fields of two summaries differ, e.g. "coverage_radius 0.25 -> 0.3"."""
    changed = [
        f"{name} {getattr(first, name)!r} -> {getattr(second, name)!r}"
        for name in SiteSummary.__dataclass_fields__
        if getattr(first, name) != getattr(second, name)
    ]
    return ", ".join(changed) or "no field differs"


@dataclass(frozen=True)
class RoundOutcome:
    """The result of one round.

    Attributes:
        round: round number (from 1).
        bank: [k, D] float32 global bank.
        server_radius: r_S, a certified bound on the distance from every row any site uploaded
            in any round so far (as the server decoded it) to the bank (coreset strategy); inf
            for random sampling, which certifies nothing. It holds for ``bank`` as selected;
            under a lossy codec the sites decode another bank, for which r_S grows by the
            bank's codec error (``core.serde.chunked_roundtrip``; FederatedServer reports that).
        max_site_radius: max_i r_i over the sites merged so far.
        rows_received: rows accepted this round, per site.
        allocation: prefix selection only: per site (ids sorted) rows uploaded (all rounds) and
            kept, proportional share, floor, cap (core.federated.allocation); () otherwise.
        flooding: sites flagged as flooding the bank, with their ratio of bank rows per
            training patch against the other sites (core.federated.allocation.flooding).
    """

    round: int
    bank: np.ndarray
    server_radius: float
    max_site_radius: float
    rows_received: dict[str, int] = field(default_factory=dict)
    allocation: tuple[SiteAllocation, ...] = ()
    flooding: dict[str, float] = field(default_factory=dict)

    @property
    def certificate(self) -> float:
        """max_i r_i + r_S: every training patch of every site lies this close to the bank, so
        a site's 1-NN score of a training patch exceeds full-bank PatchCore's by at most this."""
        return self.max_site_radius + self.server_radius


@dataclass
class _SiteUpload:
    summary: SiteSummary
    assembler: ChunkAssembler


class GlobalBankAggregator:
    """Incremental global-bank selection over the sites' uploads.

    Args:
        global_bank_size: k, the size of the global bank.
        strategy: "coreset" (farthest-first over the union) or "random" (weighted sampling).
        weighted: random strategy only: a row's weight is its site's ``num_images`` divided by
            the rows the site uploads that round, so each site's expected share of the bank
            follows its data size. (The coreset strategy covers every site's patterns to the
            same radius and takes no weights; see core.federated.strategies.)
        seed: seeds projection/start points (coreset) or sampling keys (random).
        projection_dim: coreset projection dimension.
        buffer_rows: coreset selector buffer (memory bound, rows); default
            max(2k, SERVER_BUFFER_ROWS): a server holds more than a site (512 MiB of D=1024
            rows), so typical federations select from the exact union, without reduces.
        device: where the coreset selection runs: the prefix merge's buffer and search
            (None or "auto": CUDA when available), the farthest-first reduce loops ("cuda").
        server_selection: coreset strategy only: "prefix" (default) or "farthest_first"
            (see ServerSelection). "prefix" buffers every uploaded row (at most
            ``buffer_rows``; more raises AggregationError) and reports r_S exactly.
        floor_fraction: prefix selection only: each site first keeps this fraction of its
            proportional share k x n_i / N, n_i its SiteSummary.num_patches (latest round);
            None: DEFAULT_FLOOR_FRACTION (core.federated.allocation). Another selection with a
            value set is an error (they have no floor).
        max_site_share: prefix selection only: most rows one site may keep, as a fraction of
            k; None: no cap.
    """

    def __init__(
        self,
        global_bank_size: int,
        *,
        strategy: Strategy = "coreset",
        weighted: bool = True,
        seed: int = 0,
        projection_dim: int | None = 128,
        buffer_rows: int | None = None,
        device: str | None = None,
        server_selection: ServerSelection = "prefix",
        floor_fraction: float | None = None,
        max_site_share: float | None = None,
    ) -> None:
        if global_bank_size < 1:
            raise ValueError(f"global_bank_size must be >= 1, got {global_bank_size}")
        if strategy not in ("coreset", "random"):
            raise ValueError(
                f"aggregation_strategy must be 'coreset' or 'random', got {strategy!r}"
            )
        self.global_bank_size = global_bank_size
        self.strategy: Strategy = strategy
        self.weighted = weighted
        if server_selection not in SERVER_SELECTIONS:
            raise ValueError(
                f"server_selection must be one of {SERVER_SELECTIONS}, got {server_selection!r}"
            )
        self.seed = seed
        self.server_selection: ServerSelection = server_selection
        self._selector: IncrementalCoreset | None = None
        self._prefix: PrefixMergeSelector | None = None
        self._reservoir: WeightedReservoir | None = None
        capacity = (
            buffer_rows if buffer_rows is not None
            else max(2 * global_bank_size, SERVER_BUFFER_ROWS)
        )
        prefix = strategy == "coreset" and server_selection == "prefix"
        if not prefix and (floor_fraction is not None or max_site_share is not None):
            raise ValueError(
                "floor_fraction and max_site_share apply to the prefix selection only (strategy "
                f"'coreset', server_selection 'prefix'), not to {strategy!r} / "
                f"{server_selection!r}"
            )
        self.floor_fraction = (
            (DEFAULT_FLOOR_FRACTION if floor_fraction is None else floor_fraction)
            if prefix else 0.0
        )
        self.max_site_share = max_site_share
        check_allocation_settings(self.floor_fraction, max_site_share)
        if prefix:
            self._prefix = PrefixMergeSelector(
                global_bank_size, capacity=capacity, device=device,
                floor_fraction=self.floor_fraction, max_site_share=max_site_share,
            )
        elif strategy == "coreset":
            self._selector = IncrementalCoreset(
                global_bank_size,
                capacity=capacity,
                projection_dim=projection_dim,
                seed=seed,
                device=device,
            )
        else:
            self._reservoir = WeightedReservoir(global_bank_size, seed=seed)
        self.round = 0
        self._open = False
        self._fingerprint: str | None = None
        self._feature_dim: int | None = None
        self._site_radius: dict[str, float] = {}
        self._site_patches: dict[str, int] = {}  # n_i: latest summary's num_patches
        self._uploads: dict[str, _SiteUpload] = {}
        self._rows_before_round = 0  # rows accepted in earlier rounds (held by the selector)
        # Where each accepted chunk's rows sit in the selector's buffer: (canonical key, start,
        # rows); None once a reduce has mixed rows so that no canonical order exists any more.
        self._segments: list[tuple[tuple[int, str, int], int, int]] | None = []
        self.last_outcome: RoundOutcome | None = None

    @property
    def feature_dim(self) -> int | None:
        """D fixed by the first summary accepted (None before one is), durable or not."""
        return self._feature_dim

    @property
    def buffer_capacity(self) -> int | None:
        """Most rows the selection can hold over all sites and rounds (the prefix merge keeps
        every uploaded row); None when uploads beyond the buffer are reduced or sampled."""
        return self._prefix.capacity if self._prefix is not None else None

    @property
    def rows_held(self) -> int:
        """Rows accepted in earlier rounds (they stay in the prefix merge's buffer)."""
        return self._rows_before_round

    def has_radius(self, site_id: str) -> bool:
        """True once ``site_id``'s r_i is on record (a round with its first upload closed)."""
        return site_id in self._site_radius

    # -- round lifecycle -------------------------------------------------------------------

    def begin_round(self, round_number: int) -> None:
        """Open round ``round_number`` (must be the next one)."""
        if self._open:
            raise RoundStateError(f"round {self.round} is still open; finish it first")
        if round_number != self.round + 1:
            raise RoundStateError(f"expected round {self.round + 1}, got {round_number}")
        self.round = round_number
        self._open = True
        self._rows_before_round += sum(u.assembler.rows_received for u in self._uploads.values())
        self._uploads = {}
        if self._prefix is not None and self.last_outcome is not None:
            self._prefix.start_round(self.last_outcome.bank)

    def receive_summary(self, summary: SiteSummary) -> None:
        """Register a site's upload for the open round (before its chunks).

        An identical resend is ignored; a different summary for the same site and round, or a
        different feature extractor or dimension is rejected. A site unknown so far joins: its
        upload must be its full local coreset (the caller tells it so: :meth:`has_radius`),
        since its summary's r_i becomes its term of the certificate.
        """
        self._check_round(summary.round, f"summary of site {summary.site_id!r}")
        previous = self._uploads.get(summary.site_id)
        if previous is not None:
            if previous.summary != summary:
                raise SummaryConflictError(
                    f"site {summary.site_id!r} already sent a different summary for round "
                    f"{self.round}: {summary_difference(previous.summary, summary)}"
                )
            return
        if self._fingerprint is not None and summary.feature_fingerprint != self._fingerprint:
            raise IncompatibleSiteError(
                f"site {summary.site_id!r} extracts features with fingerprint "
                f"{summary.feature_fingerprint[:12]}..., the federation uses "
                f"{self._fingerprint[:12]}... (backbone, weights, layers, dims and image size "
                "must match)"
            )
        if self._feature_dim is not None and summary.feature_dim != self._feature_dim:
            raise IncompatibleSiteError(
                f"site {summary.site_id!r} sends D={summary.feature_dim}, the federation uses "
                f"D={self._feature_dim}"
            )
        if self._prefix is not None:
            pending = sum(u.summary.coreset_rows for u in self._uploads.values())
            held = self._rows_before_round
            if held + pending + summary.coreset_rows > self._prefix.capacity:
                raise SiteLimitError(
                    f"site {summary.site_id!r} announces {summary.coreset_rows} rows; with "
                    f"{held + pending} rows held or announced that exceeds the server's buffer "
                    f"of {self._prefix.capacity} rows (buffer_rows). Sites should send about "
                    "2-3 x their share of the global bank"
                )
        self._fingerprint = summary.feature_fingerprint
        self._feature_dim = summary.feature_dim
        self._uploads[summary.site_id] = _SiteUpload(
            summary,
            ChunkAssembler(
                max_rows=summary.coreset_rows, expected_cols=summary.feature_dim, retain=False
            ),
        )

    def receive_chunk(self, chunk: FeatureChunk) -> bool:
        """Consume one chunk; True if new, False for an identical resend (ignored).

        :meth:`accept_chunk` then :meth:`add_rows`. Raises what accept_chunk raises; on error
        nothing changes.
        """
        rows = self.accept_chunk(chunk)
        if rows is None:
            return False
        self.add_rows(chunk.site_id, rows, chunk.row_offset)
        return True

    def accept_chunk(self, chunk: FeatureChunk) -> np.ndarray | None:
        """Validate and decode one chunk of the open round: its decoded rows [n, D] float32 if
        new, None for an identical resend. The rows are not selected from until they are
        handed to :meth:`add_rows`.

        The two halves exist for the daemon, which acknowledges a chunk once it is decoded,
        verified and journaled and ranks its rows later in a background worker: accept_chunk
        runs in the rpc (touching only the round's upload streams), add_rows in the worker
        (touching only the selector). :meth:`rollback` undoes accepted chunks whose journal
        append failed.

        Raises RoundStateError (wrong round, no summary yet), CodecMismatchError (the chunk's
        value type is not the summary's),
        UploadSizeMismatchError (the last chunk ends the upload short of the rows the summary
        declared) or the ChunkAssembler's errors (order, conflict, too many rows, undecodable
        matrix); on error nothing changes.
        """
        self._check_round(chunk.round, f"chunk {chunk.sequence} of site {chunk.site_id!r}")
        upload = self._uploads.get(chunk.site_id)
        if upload is None:
            raise RoundStateError(
                f"chunk {chunk.sequence} of site {chunk.site_id!r} arrived before the site's "
                f"summary for round {self.round}"
            )
        check_chunk_codec(chunk, upload.summary)
        assembler = upload.assembler
        declared = upload.summary.coreset_rows
        # Checked before the assembler commits the chunk, so a refused last chunk changes
        # nothing: the rows accepted before it stay, and a corrected last chunk can follow.
        if (
            chunk.last
            and chunk.sequence == assembler.next_sequence
            and not assembler.complete
            and assembler.rows_received + chunk.features.rows != declared
        ):
            raise UploadSizeMismatchError(
                f"site {chunk.site_id!r} declared {declared} rows in its summary for round "
                f"{self.round}, but its last chunk ({chunk.sequence}) ends the upload at "
                f"{assembler.rows_received + chunk.features.rows} rows"
            )
        rows = assembler.accept(chunk)
        if rows is None:
            return None
        if chunk.last:
            logger.info(
                "round %d: site %s upload complete (%d rows)",
                self.round, chunk.site_id, upload.assembler.rows_received,
            )
        return rows

    def pending_summary(self, site_id: str) -> SiteSummary | None:
        """The summary ``site_id`` registered for the open round, or None."""
        upload = self._uploads.get(site_id)
        return None if upload is None else upload.summary

    def forget_summary(self, site_id: str) -> None:
        """Drop ``site_id``'s upload of the open round (summary and accepted chunks), as if it
        had never sent them (its rows must not have reached :meth:`add_rows`)."""
        self._uploads.pop(site_id, None)

    def rollback(self, site_id: str, sequence: int) -> None:
        """Forget ``site_id``'s accepted chunks from ``sequence`` on (their rows must not have
        reached :meth:`add_rows`): the site's upload resumes from ``sequence``."""
        upload = self._uploads.get(site_id)
        if upload is not None:
            upload.assembler.truncate(sequence)

    def site_finished(self, site_id: str) -> None:
        """``site_id``'s upload of this round is complete and all its rows were added: let the
        selector do now what it would otherwise leave for :meth:`finish_round` (the prefix
        merge ranks the site's last partial block), so less is left after the last chunk.
        Optional; the bank is the same either way."""
        if self._prefix is not None:
            self._prefix.finish_site(site_id)

    def add_rows(self, site_id: str, rows: np.ndarray, row_offset: int) -> None:
        """Hand accepted rows [n, D] (from :meth:`accept_chunk`, in each site's order) to the
        selector; ``row_offset`` is their place in the site's upload of this round."""
        if not rows.shape[0]:
            return
        if self._prefix is not None:
            try:
                self._prefix.add(site_id, rows)
            except CapacityError as exc:  # announced sizes were checked: should not happen
                raise AggregationError(str(exc)) from exc
        elif self._selector is not None:
            self._add_to_selector(rows, (self.round, site_id, row_offset))
        else:
            assert self._reservoir is not None
            summary = self._uploads[site_id].summary
            weight = summary.num_images / summary.coreset_rows if self.weighted else 1.0
            self._reservoir.add(rows, weight)

    def next_sequence(self, site_id: str) -> int:
        """Where a site's interrupted upload resumes (0 when nothing was accepted)."""
        upload = self._uploads.get(site_id)
        return 0 if upload is None else upload.assembler.next_sequence

    def finish_round(self, expected_sites: int | None = None) -> RoundOutcome:
        """Close the round and select the global bank.

        Every site that sent a summary must have completed its upload; with
        ``expected_sites``, that many sites must have taken part.
        """
        if not self._open:
            raise RoundStateError("no round is open")
        incomplete = [s for s, u in self._uploads.items() if not u.assembler.complete]
        if incomplete:
            raise RoundStateError(
                f"round {self.round}: upload(s) of {sorted(incomplete)} are incomplete"
            )
        if expected_sites is not None and len(self._uploads) != expected_sites:
            raise RoundStateError(
                f"round {self.round}: {len(self._uploads)} site(s) uploaded, expected "
                f"{expected_sites}"
            )
        if self.round == 1 and not self._uploads:
            raise RoundStateError("round 1 ended without any site upload")
        for site_id, upload in self._uploads.items():
            # A site's first upload (round 1, or the round it joined in) is its full local
            # coreset: its r_i enters the certificate. A later round's summary covers the
            # site's new images too (core.federated.newdata): its r_i can only grow the site's
            # term of the certificate, never shrink it.
            radius = upload.summary.coverage_radius
            self._site_radius[site_id] = max(radius, self._site_radius.get(site_id, radius))
        allocation: tuple[SiteAllocation, ...] = ()
        if self._prefix is not None:
            # n_i is a site's patch count, the same patches every round: the latest summary's,
            # not a sum over rounds (a later round re-describes the site, it adds no patches).
            patches = {**self._site_patches,
                       **{s: u.summary.num_patches for s, u in self._uploads.items()}}
            chosen = self._prefix.select(num_patches=patches)
            self._site_patches = patches
            allocation = chosen.allocation
            bank, server_radius = chosen.features, chosen.radius_bound
            available = chosen.num_seen
        elif self._selector is not None:
            self._canonical_order()
            selection = self._selector.select()
            bank, server_radius = selection.features, selection.radius_bound
            available = selection.num_seen
        else:
            assert self._reservoir is not None
            bank, server_radius = self._reservoir.sample(), math.inf
            available = self._reservoir.num_seen
        warn_if_bank_short(self.global_bank_size, bank.shape[0], available)
        outcome = RoundOutcome(
            round=self.round,
            bank=bank,
            server_radius=server_radius,
            max_site_radius=max(self._site_radius.values()),
            rows_received={s: u.assembler.rows_received for s, u in self._uploads.items()},
            allocation=allocation,
            flooding={a.site_id: ratio for a, ratio in flooding(allocation)},
        )
        self._open = False
        self.last_outcome = outcome
        logger.info(
            "round %d: bank %d rows, r_S <= %.4f, max r_i = %.4f, certificate %.4f",
            self.round, bank.shape[0], outcome.server_radius, outcome.max_site_radius,
            outcome.certificate,
        )
        log_allocation(outcome)
        return outcome

    def _add_to_selector(self, rows: np.ndarray, key: tuple[int, str, int]) -> None:
        """Buffer ``rows`` [n, D] and remember where they went, under ``key``."""
        assert self._selector is not None
        start, reduces = self._selector.num_buffered, self._selector.num_reduces
        self._selector.add(rows)
        if self._segments is None:
            return
        if self._selector.num_reduces != reduces:
            logger.warning(
                "round %d: the uploads exceed the selector buffer (%d rows); rows were reduced "
                "in arrival order, so the bank now depends on how uploads interleave",
                self.round, self._selector.capacity,
            )
            self._segments = None
            return
        self._segments.append((key, start, rows.shape[0]))

    def _canonical_order(self) -> None:
        """Sort the selector's buffer by (round, site_id, row_offset) (see the module doc)."""
        if not self._segments:
            return
        ordered = sorted(self._segments)
        if ordered == self._segments:
            return
        assert self._selector is not None
        permutation = np.concatenate(
            [np.arange(start, start + rows) for _, start, rows in ordered]
        )
        self._selector.reorder(permutation)
        position, segments = 0, []
        for key, _, rows in ordered:
            segments.append((key, position, rows))
            position += rows
        self._segments = segments

    def _check_round(self, round_number: int, what: str) -> None:
        if not self._open:
            raise RoundStateError(f"{what} arrived while no round is open")
        if round_number != self.round:
            raise RoundStateError(f"{what} is for round {round_number}, round {self.round} is open")
