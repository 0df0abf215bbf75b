"""FederationService handlers: proto <-> domain (core.serde), errors -> status codes.

Handlers only. Every decision lives in :class:`fedserver.federation.Federation` (rounds,
durability, versions) and in core (validation, decoding, aggregation); a handler authorises the
caller's site, converts the request, calls the federation, converts the answer. Domain errors
become status codes here and only here (``STATUS_BY_ERROR``), each with the error's message.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Final

import grpc
from google.protobuf import timestamp_pb2

from core.codec import (
    VALUE_TYPE_WIRE_CODES,
    ChecksumMismatchError,
    PayloadTooLargeError,
)
from core.federated.aggregator import IncompatibleSiteError, RoundStateError
from core.messages import FeatureChunk
from core.serde import (
    UploadTooLargeError,
    bank_chunk_to_proto,
    codec_config_to_proto,
    upload_request_from_proto,
)
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedpatchcore.v1 import federation_pb2_grpc as fgrpc
from fedserver.auth import AuthError, TokenStore
from fedserver.federation import (
    REMOVED_BATCH,
    BankNotReadyError,
    DimensionMismatchError,
    Federation,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    Phase,
    RoundClosedError,
    RoundSnapshot,
    RoundTerms,
    StorageError,
    UploadLimitError,
    UploadProgress,
)

logger = logging.getLogger(__name__)

__all__ = ["STATUS_BY_ERROR", "FederationServicer", "status_for"]

#: Domain error -> status code, first match wins (subclasses before their bases). Every core
#: validation error is a ValueError subclass that names the offending field: INVALID_ARGUMENT.
STATUS_BY_ERROR: Final[tuple[tuple[type[BaseException], grpc.StatusCode], ...]] = (
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (ChecksumMismatchError, grpc.StatusCode.DATA_LOSS),
    (PayloadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (DimensionMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (IncompatibleSiteError, grpc.StatusCode.FAILED_PRECONDITION),
    (RoundStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (RoundClosedError, grpc.StatusCode.FAILED_PRECONDITION),
    (BankNotReadyError, grpc.StatusCode.FAILED_PRECONDITION),
    (StorageError, grpc.StatusCode.UNAVAILABLE),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)

_PHASES: Final[dict[Phase, int]] = {
    Phase.COLLECTING: fpb.ROUND_STATE_COLLECTING,
    Phase.SELECTING: fpb.ROUND_STATE_SELECTING,
    Phase.READY: fpb.ROUND_STATE_READY,
    Phase.FAILED: fpb.ROUND_STATE_FAILED,
}
_DEFAULT_WATCH_INTERVAL_MS: Final[int] = 500


def status_for(error: BaseException) -> grpc.StatusCode | None:
    """The status code of a domain error, or None for an unexpected exception (a bug)."""
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return None


@contextlib.contextmanager
def _statuses(context: grpc.ServicerContext, method: str, site: str | None) -> Iterator[None]:
    """Turn domain errors raised inside the block into an aborted rpc with their message."""
    try:
        yield
    except grpc.RpcError:
        # The client cancelled or its connection broke while we read its stream: nothing to
        # answer; what was committed stays committed (the client resumes from it).
        logger.info("%s from site %s: the client went away", method, site)
        raise
    except Exception as error:
        code = status_for(error)
        if code is None:
            logger.exception("%s from site %s failed unexpectedly", method, site)
            raise
        logger.warning("%s from site %s: %s: %s", method, site, code.name, error)
        context.abort(code, str(error))


class FederationServicer(fgrpc.FederationServiceServicer):
    """The gRPC face of a :class:`Federation`; ``tokens`` identify the calling site."""

    def __init__(self, federation: Federation, tokens: TokenStore) -> None:
        self._federation = federation
        self._tokens = tokens

    def _site(self, context: grpc.ServicerContext, claimed: str) -> str:
        """The caller's site (from its token); PermissionDeniedError if it claims another."""
        site = self._tokens.site_of(context.invocation_metadata())
        if claimed and claimed != site:
            raise PermissionDeniedError(f"site {site!r} cannot act as site {claimed!r}")
        if not claimed:
            raise ValueError("site_id is required")
        return site

    def JoinRound(  # noqa: N802 - generated interface
        self, request: fpb.JoinRoundRequest, context: grpc.ServicerContext
    ) -> fpb.JoinRoundResponse:
        with _statuses(context, "JoinRound", request.site_id):
            site = self._site(context, request.site_id)
            fingerprint = request.feature_fingerprint
            if fingerprint and (
                len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint)
            ):
                raise ValueError(
                    f"feature_fingerprint must be 64 lowercase hex characters, got {fingerprint!r}"
                )
            terms, progress, snapshot = self._federation.join(site, fingerprint)
            return fpb.JoinRoundResponse(
                config=terms_to_proto(terms),
                upload=progress_to_proto(progress),
                status=snapshot_to_proto(snapshot),
            )

    def UploadFeatures(  # noqa: N802
        self, request_iterator: Iterable[pb.UploadFeaturesRequest], context: grpc.ServicerContext
    ) -> fpb.UploadFeaturesResponse:
        accepted = ignored = 0
        round_number = 0
        with _statuses(context, "UploadFeatures", None):
            site = self._tokens.site_of(context.invocation_metadata())
        with _statuses(context, "UploadFeatures", site):
            for request in request_iterator:
                item = upload_request_from_proto(request)
                new = self._federation.receive(site, item, request.SerializeToString())
                round_number = item.round
                if isinstance(item, FeatureChunk):
                    accepted, ignored = accepted + int(new), ignored + int(not new)
            progress = self._federation.progress(site, round_number)
            logger.info(
                "round %d: site %s stream ended: %d chunk(s) committed, %d resent (ignored), "
                "position %d", progress.round, site, accepted, ignored,
                progress.committed_sequence,
            )
            return fpb.UploadFeaturesResponse(
                upload=progress_to_proto(progress),
                chunks_accepted=accepted,
                chunks_ignored=ignored,
            )

    def QueryUploadStatus(  # noqa: N802
        self, request: fpb.QueryUploadStatusRequest, context: grpc.ServicerContext
    ) -> fpb.QueryUploadStatusResponse:
        with _statuses(context, "QueryUploadStatus", request.site_id):
            site = self._site(context, request.site_id)
            progress = self._federation.progress(site, request.round)
            return fpb.QueryUploadStatusResponse(upload=progress_to_proto(progress))

    def DownloadBank(  # noqa: N802
        self, request: fpb.DownloadBankRequest, context: grpc.ServicerContext
    ) -> Iterator[fpb.DownloadBankResponse]:
        with _statuses(context, "DownloadBank", request.site_id):
            site = self._site(context, request.site_id)
            download = self._federation.bank_download(
                site, request.version, request.have_version
            )
            header = download.header
            yield fpb.DownloadBankResponse(header=fpb.BankHeader(
                version=header.version,
                round=header.round,
                base_version=header.base_version,
                total_rows=header.total_rows,
                feature_dim=header.feature_dim,
                rows_in_stream=header.rows_in_stream,
                rows_removed=header.rows_removed,
                bank_checksum=header.bank_checksum,
                server_coverage_radius=header.server_coverage_radius,
                max_site_coverage_radius=header.max_site_coverage_radius,
                value_type=VALUE_TYPE_WIRE_CODES[header.value_type],  # type: ignore[arg-type]
            ))
            for lo in range(0, download.removed.size, REMOVED_BATCH):
                batch = download.removed[lo : lo + REMOVED_BATCH]
                yield fpb.DownloadBankResponse(removed=fpb.RemovedRows(indices=batch.tolist()))
            for chunk in download.chunks:
                if not context.is_active():
                    logger.info("site %s cancelled its bank download", site)
                    return
                yield fpb.DownloadBankResponse(chunk=bank_chunk_to_proto(chunk))

    def WatchRound(  # noqa: N802
        self, request: fpb.WatchRoundRequest, context: grpc.ServicerContext
    ) -> Iterator[fpb.RoundStatus]:
        with _statuses(context, "WatchRound", request.site_id):
            self._site(context, request.site_id)
            interval = (request.min_interval_ms or _DEFAULT_WATCH_INTERVAL_MS) / 1000.0
            for snapshot in self._federation.watch(request.round, interval, context.is_active):
                yield snapshot_to_proto(snapshot)


# -- domain -> proto ----------------------------------------------------------------------------


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def progress_to_proto(progress: UploadProgress) -> fpb.UploadStatus:
    return fpb.UploadStatus(
        site_id=progress.site_id,
        round=progress.round,
        summary_committed=progress.summary_committed,
        committed_sequence=progress.committed_sequence,
        committed_rows=progress.committed_rows,
        complete=progress.complete,
    )


def snapshot_to_proto(snapshot: RoundSnapshot) -> fpb.RoundStatus:
    return fpb.RoundStatus(
        round=snapshot.round,
        state=_PHASES[snapshot.phase],  # type: ignore[arg-type]
        sites_expected=snapshot.sites_expected,
        quorum=snapshot.quorum,
        sites_joined=snapshot.sites_joined,
        sites_complete=snapshot.sites_complete,
        rows_received=snapshot.rows_received,
        deadline=_timestamp(snapshot.deadline),
        bank_version=snapshot.bank_version,
        bank_rows=snapshot.bank_rows,
        message=snapshot.message,
    )


def terms_to_proto(terms: RoundTerms) -> fpb.RoundConfig:
    extractor = None
    if terms.extractor is not None:
        data = terms.extractor
        resize = data["resize"]
        extractor = fpb.FeatureExtractor(
            backbone=data["backbone"],
            layers=list(data["layers"]),
            pretrained=bool(data["pretrained"]),
            pretrain_embed_dim=int(data["pretrain_embed_dim"]),
            target_embed_dim=int(data["target_embed_dim"]),
            patch_size=int(data["patch_size"]),
            resize=[resize] if isinstance(resize, int) else list(resize),
            crop=0 if data["crop"] is None else int(data["crop"]),
            init_seed=int(data["init_seed"]),
        )
    return fpb.RoundConfig(
        round=terms.round,
        feature_fingerprint=terms.feature_fingerprint,
        extractor=extractor,
        codec=codec_config_to_proto(terms.codec),
        max_chunk_bytes=terms.max_chunk_bytes,
        global_bank_size=terms.global_bank_size,
        max_rows_per_site=terms.max_rows_per_site,
        feature_dim=terms.feature_dim,
        deadline=_timestamp(terms.deadline),
        expected_sites=terms.expected_sites,
        quorum=terms.quorum,
        novelty_threshold=terms.novelty_threshold,
        base_bank_version=terms.base_bank_version,
    )
