"""The federated server of the in-process API: rounds over clients, aggregation, reports.

``train_round`` moves every byte as a wire message (:class:`CommunicationProtocol`) and feeds the
decoded messages to the same :class:`GlobalBankAggregator` the gRPC daemon uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from core.codec import DEFAULT_CODEC, CodecConfig
from core.federated.aggregator import (
    GlobalBankAggregator,
    RoundOutcome,
    ServerSelection,
    Strategy,
    warn_if_bank_short,
)
from core.federated.allocation import SiteAllocation
from core.federated.client import PatchCoreClient
from core.federated.communication import CommunicationProtocol, parse_upload
from core.federated.strategies import (
    federated_coreset_aggregation,
    federated_prefix_aggregation,
    federated_random_aggregation,
)
from core.messages import FeatureChunk, SiteSummary
from core.serde import DEFAULT_MAX_CHUNK_BYTES, chunked_roundtrip, codec_error

logger = logging.getLogger(__name__)

__all__ = ["FederatedServer", "RoundReport"]


@dataclass(frozen=True)
class RoundReport:
    """What one round cost and achieved.

    Attributes:
        round: round number (from 1).
        bytes_up: serialized upload messages, per site (summary + chunks).
        bytes_down: serialized bank messages, per site (each site receives the whole bank).
        rows_up: rows uploaded, per site.
        bank_rows: global bank size after the round.
        server_radius: r_S, certified bound on the distance from every uploaded row (as the
            server decoded it) to the bank as the sites decoded it (inf for random sampling).
        max_site_radius: max_i r_i, each for the site's coreset as the server decoded it.
        certificate: max_i r_i + r_S: holds for the decoded rows under any codec.
        realised_radius: the largest distance from any row any site ever uploaded to the bank
            the sites received (measured by the sites, after decoding).
        num_novel: round > 1: training patches farther than the threshold, per site (a site
            with added images: their patches farther than its r_i from its uploads).
        training_radius: round > 1: the largest distance from any training patch of any site to
            the bank the round started from (the sites measure it while looking for novel
            patches): the realised coverage the certificate bounds.
        bank_changed: whether the round's bank differs (as a set of rows) from the one the
            sites held; only then was it broadcast (``bytes_down`` is 0 otherwise).
        allocation: prefix selection: per site rows uploaded (all rounds) and kept, its
            proportional share, floor and cap (core.federated.allocation.SiteAllocation).
        flooding: sites flagged as flooding the bank -> their ratio of bank rows per patch
            against the other sites (core.federated.allocation.flooding).
    """

    round: int
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    rows_up: dict[str, int]
    bank_rows: int
    server_radius: float
    max_site_radius: float
    certificate: float
    realised_radius: float
    num_novel: dict[str, int] = field(default_factory=dict)
    training_radius: float | None = None
    bank_changed: bool = True
    allocation: tuple[SiteAllocation, ...] = ()
    flooding: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes_up(self) -> int:
        return sum(self.bytes_up.values())

    @property
    def total_bytes_down(self) -> int:
        return sum(self.bytes_down.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "round": self.round,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "rows_up": self.rows_up,
            "bank_rows": self.bank_rows,
            "server_radius": self.server_radius,
            "max_site_radius": self.max_site_radius,
            "certificate": self.certificate,
            "realised_radius": self.realised_radius,
            "num_novel": self.num_novel,
            "training_radius": self.training_radius,
            "bank_changed": self.bank_changed,
        }


class FederatedServer:
    """Federated learning server for PatchCore aggregation.

    Args:
        num_clients: expected number of clients (every round must hear from all of them).
        global_bank_size: target global memory bank size.
        aggregation_strategy: "coreset" (greedy k-center over the union) or "random".
        weighted: weight by client data size where a weight has a meaning: the random strategy
            draws rows in proportion to the images they stand for. The coreset strategy
            covers every site to the same radius (see core.federated.strategies).
        codec: wire codec of uploads and broadcasts (default fp16 + shuffle + zstd).
        seed: seeds the selection.
        buffer_rows: memory bound of the coreset selector (rows); see GlobalBankAggregator.
        device: "cuda" to run selection on the GPU.
        server_selection: how the coreset strategy picks the bank from the uploads ("prefix",
            the default, or "farthest_first"; see core.federated.aggregator.ServerSelection).
        floor_fraction: prefix selection: each site first keeps this fraction of its
            proportional share of the bank (None: the default, see
            core.federated.allocation); :meth:`aggregate` sizes the shares by ``client_sizes``.
        max_site_share: prefix selection: most rows one site may keep, fraction of k (None:
            no cap).

    Example::

        server = FederatedServer(num_clients=5, global_bank_size=10000)
        global_model = server.aggregate(client_coresets, client_sizes)
    """

    def __init__(
        self,
        num_clients: int = 5,
        global_bank_size: int = 10000,
        aggregation_strategy: Strategy = "coreset",
        weighted: bool = True,
        *,
        codec: CodecConfig = DEFAULT_CODEC,
        seed: int = 0,
        buffer_rows: int | None = None,
        device: str | None = None,
        server_selection: ServerSelection = "prefix",
        floor_fraction: float | None = None,
        max_site_share: float | None = None,
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.global_bank_size = global_bank_size
        self.aggregation_strategy: Strategy = aggregation_strategy
        self.weighted = weighted
        self.codec = codec
        self.seed = seed
        self.device = device
        self.server_selection: ServerSelection = server_selection
        self.aggregator = GlobalBankAggregator(
            global_bank_size,
            strategy=aggregation_strategy,
            weighted=weighted,
            seed=seed,
            buffer_rows=buffer_rows,
            device=device,
            server_selection=server_selection,
            floor_fraction=floor_fraction,
            max_site_share=max_site_share,
        )
        self._global_bank: np.ndarray | None = None
        #: The bank last broadcast (float32, as selected) and its largest row error under the
        #: codec: what a round compares its new bank with, and what r_S grows by.
        self._sent_bank: np.ndarray | None = None
        self._bank_codec_error = 0.0
        self.reports: list[RoundReport] = []

    # -- the spec's direct API -------------------------------------------------------------

    def aggregate(
        self,
        client_coresets: Sequence[np.ndarray],
        client_sizes: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Aggregate client memory banks (arrays already at the server; no rounds, no bytes).

        Args:
            client_coresets: local coresets [n_i, D] from the clients.
            client_sizes: client dataset sizes, used as weights when ``weighted``.

        Returns:
            Global memory bank features [k, D] float32.
        """
        if len(client_coresets) != self.num_clients:
            raise ValueError(
                f"expected {self.num_clients} client coresets, got {len(client_coresets)}"
            )
        if client_sizes is not None and len(client_sizes) != len(client_coresets):
            raise ValueError(
                f"{len(client_sizes)} client sizes for {len(client_coresets)} coresets"
            )
        weights = list(client_sizes) if (self.weighted and client_sizes is not None) else None
        if self.aggregation_strategy == "coreset" and self.server_selection == "prefix":
            bank = federated_prefix_aggregation(
                client_coresets, self.global_bank_size,
                list(client_sizes) if client_sizes is not None else None,
                floor_fraction=self.aggregator.floor_fraction,
            )
        elif self.aggregation_strategy == "coreset":
            bank = federated_coreset_aggregation(
                client_coresets, self.global_bank_size, weights, seed=self.seed
            )
        else:
            bank = federated_random_aggregation(
                client_coresets, self.global_bank_size, weights, seed=self.seed
            )
        warn_if_bank_short(
            self.global_bank_size, bank.shape[0], sum(len(c) for c in client_coresets)
        )
        self._global_bank = bank
        return bank

    def get_global_model(self) -> np.ndarray:
        """Return current global memory bank [k, D]."""
        if self._global_bank is None:
            raise RuntimeError("no global bank yet: call aggregate() or train_round()")
        return self._global_bank

    # -- rounds over real messages ---------------------------------------------------------

    def train_round(self, clients: Sequence[PatchCoreClient]) -> np.ndarray:
        """Execute one federated training round.

        Round 1: every client trains and uploads its local coreset. Later rounds: every client
        uploads only its patches farther from the current bank than the server's coverage
        radius (novel patches). The bank is rebuilt from the stream and broadcast only if its
        rows changed (a round that changes nothing costs no download); the round's costs and
        radii are appended to ``reports``.

        Every radius is certified for the rows as decoded under the codec: the sites report
        r_i for their decoded coresets (PatchCoreClient.decoded_coverage_radius), the server's
        selector sees decoded rows, and r_S is reported for the bank as the sites decode it
        (the selector's bound plus the bank's largest row error under the codec).

        Returns:
            Updated global memory bank [k, D] (as the clients decoded it).
        """
        if len(clients) != self.num_clients:
            raise ValueError(f"expected {self.num_clients} clients, got {len(clients)}")
        ids = [c.site_id for c in clients]
        if len(set(ids)) != len(ids):
            raise ValueError(f"client ids must be unique, got {ids}")
        round_number = self.aggregator.round + 1
        first_round = self.aggregator.last_outcome is None
        self.aggregator.begin_round(round_number)
        bytes_up: dict[str, int] = {}
        rows_up: dict[str, int] = {}
        num_novel: dict[str, int] = {}
        training_radius: float | None = None
        for client in clients:
            if first_round:
                rows = client.train()
            elif client.has_new_images:  # only the added images' uncovered patches
                added = client.new_data_upload(self.codec, max_chunk_bytes=DEFAULT_MAX_CHUNK_BYTES)
                rows, num_novel[client.site_id] = added.features, added.num_uncovered
            else:
                threshold = self.reports[-1].server_radius  # r_S of the bank the sites hold
                if not np.isfinite(threshold):  # random strategy: no radius; use the realised
                    threshold = self.reports[-1].realised_radius
                upload = client.novel_features(self.get_global_model(), threshold)
                rows, num_novel[client.site_id] = upload.features, upload.num_novel
                training_radius = max(training_radius or 0.0, upload.max_distance)
            # The in-process protocol cuts chunks at the default size (send_to_server).
            summary = client.summary(round_number, rows.shape[0], self.codec,
                                     max_chunk_bytes=DEFAULT_MAX_CHUNK_BYTES)
            messages = CommunicationProtocol.send_to_server(
                client.site_id, rows, round_number=round_number, codec=self.codec,
                summary=summary,
            )
            self._receive(parse_upload(messages))
            client.record_upload(chunked_roundtrip(rows, config=self.codec)[0])
            bytes_up[client.site_id] = CommunicationProtocol.compute_communication_cost(messages)
            rows_up[client.site_id] = rows.shape[0]
        outcome = self.aggregator.finish_round(expected_sites=self.num_clients)
        changed = self._sent_bank is None or not _same_rows(outcome.bank, self._sent_bank)
        per_site_down = 0
        if changed:
            self._bank_codec_error = codec_error(outcome.bank, config=self.codec)
            server_radius = outcome.server_radius + self._bank_codec_error
            bank_messages = CommunicationProtocol.broadcast_to_clients(
                clients,
                outcome.bank,
                round_number=round_number,
                codec=self.codec,
                server_radius=server_radius,
                max_site_radius=outcome.max_site_radius,
            )
            per_site_down = CommunicationProtocol.compute_communication_cost(bank_messages)
            self._sent_bank = outcome.bank
        else:
            # The sites keep the bank they decoded before; the same rows cover this round's
            # uploads to outcome.server_radius, and that decoded bank's error is unchanged.
            server_radius = outcome.server_radius + self._bank_codec_error
            logger.info("round %d: the bank is unchanged; not re-broadcast", round_number)
        delivered = clients[0].global_bank
        assert delivered is not None
        self._global_bank = delivered
        report = self._report(
            outcome, clients, bytes_up, rows_up, per_site_down, num_novel, training_radius,
            server_radius=server_radius, bank_changed=changed,
        )
        self.reports.append(report)
        return delivered

    def _receive(self, items: Sequence[SiteSummary | FeatureChunk]) -> None:
        for item in items:
            if isinstance(item, SiteSummary):
                self.aggregator.receive_summary(item)
            else:
                self.aggregator.receive_chunk(item)

    def _report(
        self,
        outcome: RoundOutcome,
        clients: Sequence[PatchCoreClient],
        bytes_up: dict[str, int],
        rows_up: dict[str, int],
        per_site_down: int,
        num_novel: dict[str, int],
        training_radius: float | None,
        *,
        server_radius: float,
        bank_changed: bool,
    ) -> RoundReport:
        realised = max(c.uploaded_radius(c.global_bank) for c in clients)  # type: ignore[arg-type]
        report = RoundReport(
            round=outcome.round,
            bytes_up=bytes_up,
            bytes_down={c.site_id: per_site_down for c in clients},
            rows_up=rows_up,
            bank_rows=outcome.bank.shape[0],
            server_radius=server_radius,
            max_site_radius=outcome.max_site_radius,
            certificate=outcome.max_site_radius + server_radius,
            realised_radius=realised,
            num_novel=num_novel,
            training_radius=training_radius,
            bank_changed=bank_changed,
            allocation=outcome.allocation,
            flooding=dict(outcome.flooding),
        )
        logger.info(
            "round %d: up %d B, down %d B, bank %d, realised %.4f, certificate %.4f",
            report.round, report.total_bytes_up, report.total_bytes_down, report.bank_rows,
            report.realised_radius, report.certificate,
        )
        return report


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """True if ``a`` and ``b`` ([k, D]) hold the same rows, bit for bit, in any order."""
    if a.shape != b.shape:
        return False
    if np.array_equal(a, b):
        return True
    # Rows as opaque byte strings, sorted: a reordered selection of the same rows is no change.
    row_bytes = np.dtype((np.void, a.shape[1] * a.itemsize))
    rows_a = np.sort(np.ascontiguousarray(a).view(row_bytes).ravel())
    rows_b = np.sort(np.ascontiguousarray(b, dtype=a.dtype).view(row_bytes).ravel())
    return bool(np.array_equal(rows_a, rows_b))
