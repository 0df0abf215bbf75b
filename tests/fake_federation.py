"""A scripted FederationService for testing the client side (fedclient.session) over real sockets.

Not a server implementation: it holds one site-agnostic round, reassembles uploads with core's
ChunkAssembler, serves banks given by the test, and injects faults the real server cannot be
made to produce on demand (a stream broken after n chunks, a status code on the next call). It
records every chunk sequence that arrived so tests can count resends.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np

from core.bankdelta import bank_checksum
from core.codec import CODEC_PRESETS, DEFAULT_CODEC, ChecksumMismatchError
from core.messages import FeatureChunk, SiteSummary
from core.serde import (
    ChunkAssembler,
    ChunkError,
    bank_chunk_to_proto,
    codec_config_to_proto,
    split_bank_into_chunks,
    upload_request_from_proto,
)
from fedpatchcore.v1 import federation_pb2 as fpb
from fedpatchcore.v1 import federation_pb2_grpc as fgrpc


@dataclass
class _Upload:
    summary: SiteSummary | None = None
    assembler: ChunkAssembler = field(default_factory=lambda: ChunkAssembler(max_rows=10**6))
    arrivals: list[int] = field(default_factory=list)


class FakeFederation(fgrpc.FederationServiceServicer):
    """tokens: token -> site id. banks: version -> [K, D] bank (the newest is served as ready)."""

    def __init__(self, tokens: dict[str, str], *, max_chunk_bytes: int = 4096) -> None:
        self.tokens = tokens
        self.max_chunk_bytes = max_chunk_bytes
        self.uploads: dict[str, _Upload] = {}
        self.banks: dict[int, np.ndarray] = {}
        self.fingerprint = ""
        self.break_after: int | None = None  # abort the next upload stream after n new chunks
        self.fail_next: list[grpc.StatusCode] = []  # codes for the next calls, in order
        self.state = fpb.ROUND_STATE_READY
        self.lock = threading.Lock()

    # -- helpers -----------------------------------------------------------------------------

    def _site(self, context: grpc.ServicerContext, named: str) -> str:
        metadata = dict(context.invocation_metadata())
        token = metadata.get("authorization", "").removeprefix("Bearer ")
        site = self.tokens.get(token)
        if site is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
        if named and named != site:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"token is for {site}, not {named}")
        with self.lock:
            if self.fail_next:
                context.abort(self.fail_next.pop(0), "injected failure")
        return site  # type: ignore[return-value]

    def _status(self, site: str) -> fpb.UploadStatus:
        upload = self.uploads.setdefault(site, _Upload())
        return fpb.UploadStatus(
            site_id=site, round=1, summary_committed=upload.summary is not None,
            committed_sequence=upload.assembler.next_sequence,
            committed_rows=upload.assembler.rows_received, complete=upload.assembler.complete,
        )

    def _round_status(self) -> fpb.RoundStatus:
        version = max(self.banks, default=0)
        return fpb.RoundStatus(
            round=1, state=self.state, bank_version=version,
            bank_rows=self.banks[version].shape[0] if version else 0,
            message="injected" if self.state == fpb.ROUND_STATE_FAILED else "",
        )

    # -- rpcs --------------------------------------------------------------------------------

    def JoinRound(self, request, context):  # noqa: N802 (generated name)
        site = self._site(context, request.site_id)
        if self.fingerprint and request.feature_fingerprint not in ("", self.fingerprint):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "feature fingerprint differs from the federation's")
        config = fpb.RoundConfig(
            round=1, feature_fingerprint=self.fingerprint,
            codec=codec_config_to_proto(DEFAULT_CODEC), max_chunk_bytes=self.max_chunk_bytes,
            global_bank_size=16, max_rows_per_site=10**6,
        )
        return fpb.JoinRoundResponse(config=config, upload=self._status(site),
                                     status=self._round_status())

    def QueryUploadStatus(self, request, context):  # noqa: N802
        site = self._site(context, request.site_id)
        return fpb.QueryUploadStatusResponse(upload=self._status(site))

    def UploadFeatures(self, request_iterator, context):  # noqa: N802
        site = self._site(context, "")
        upload = self.uploads.setdefault(site, _Upload())
        new = 0
        for message in request_iterator:
            item = upload_request_from_proto(message)
            if isinstance(item, SiteSummary):
                if item.site_id != site:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, "summary of another site")
                upload.summary = item
                continue
            assert isinstance(item, FeatureChunk)
            upload.arrivals.append(item.sequence)
            if item.sequence > upload.assembler.next_sequence:
                context.abort(grpc.StatusCode.OUT_OF_RANGE, "beyond the committed position")
            try:
                if upload.assembler.add(item):
                    new += 1
            except ChecksumMismatchError as error:
                context.abort(grpc.StatusCode.DATA_LOSS, str(error))
            except ChunkError as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            if self.break_after is not None and new >= self.break_after:
                self.break_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected connection loss")
        return fpb.UploadFeaturesResponse(upload=self._status(site), chunks_accepted=new)

    def DownloadBank(self, request, context):  # noqa: N802
        self._site(context, request.site_id)
        if not self.banks:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no bank ready")
        version = request.version or max(self.banks)
        bank = self.banks[version]
        base = self.banks.get(request.have_version) if request.have_version < version else None
        if base is not None:
            # Test banks are built as base minus some rows plus new rows appended.
            kept = [i for i, row in enumerate(base) if any(np.array_equal(row, r) for r in bank)]
            removed = sorted(set(range(base.shape[0])) - set(kept))
            added = bank[len(kept):]
        else:
            removed, added = [], bank
        yield fpb.DownloadBankResponse(header=fpb.BankHeader(
            version=version, round=version, base_version=request.have_version if base is not None
            else 0, total_rows=bank.shape[0], feature_dim=bank.shape[1],
            rows_in_stream=added.shape[0], rows_removed=len(removed),
            bank_checksum=bank_checksum(bank), server_coverage_radius=0.5,
            max_site_coverage_radius=0.25, value_type=1,
        ))
        if removed:
            yield fpb.DownloadBankResponse(removed=fpb.RemovedRows(indices=removed))
        for chunk in split_bank_into_chunks(
            added, config=CODEC_PRESETS["lossless"], round=version,
            server_coverage_radius=0.5, max_site_coverage_radius=0.25,
            max_chunk_bytes=self.max_chunk_bytes,
        ):
            yield fpb.DownloadBankResponse(chunk=bank_chunk_to_proto(chunk))

    def WatchRound(self, request, context):  # noqa: N802
        self._site(context, request.site_id)
        yield fpb.RoundStatus(round=1, state=fpb.ROUND_STATE_COLLECTING)
        yield self._round_status()


def start(servicer: FakeFederation) -> tuple[grpc.Server, int]:
    """Serve ``servicer`` on 127.0.0.1:0; returns (server, bound port). Stop it in teardown."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    fgrpc.add_FederationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port

