"""FederationService handlers: proto <-> domain (core.serde), errors -> status codes.

Handlers only. Every decision lives in :class:`fedserver.federation.Federation` (rounds,
durability, versions) and in core (validation, decoding, aggregation); a handler authorises the
caller's site, converts the request, calls the federation, converts the answer. Domain errors
become status codes here and only here (``STATUS_BY_ERROR``), each with the error's message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, Final, TypeVar

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf import message_factory, timestamp_pb2

from core.codec import (
    VALUE_TYPE_WIRE_CODES,
    ChecksumMismatchError,
    PayloadTooLargeError,
)
from core.federated.aggregator import IncompatibleSiteError, RoundStateError, SiteLimitError
from core.messages import FeatureChunk, SiteSummary
from core.serde import (
    UploadTooLargeError,
    bank_chunk_to_proto,
    codec_config_to_proto,
    upload_request_from_proto,
)
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.auth import AuthError, TokenStore
from fedserver.errors import AlreadyExistsError, BusyError
from fedserver.federation import (
    REMOVED_BATCH,
    BankDownload,
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

__all__ = [
    "STATUS_BY_ERROR",
    "AttachedServicer",
    "FederationServicer",
    "MalformedRequest",
    "ServerStartingError",
    "add_to_server",
    "certificate_names",
    "check_parsed",
    "status_for",
]


class ServerStartingError(Exception):
    """A call arrived before the server finished replaying its state directory."""


#: Domain error -> status code, first match wins (subclasses before their bases). Every core
#: validation error is a ValueError subclass that names the offending field: INVALID_ARGUMENT.
STATUS_BY_ERROR: Final[tuple[tuple[type[BaseException], grpc.StatusCode], ...]] = (
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (ChecksumMismatchError, grpc.StatusCode.DATA_LOSS),
    (PayloadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SiteLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (DimensionMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (IncompatibleSiteError, grpc.StatusCode.FAILED_PRECONDITION),
    (RoundStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (RoundClosedError, grpc.StatusCode.FAILED_PRECONDITION),
    (BankNotReadyError, grpc.StatusCode.FAILED_PRECONDITION),
    (StorageError, grpc.StatusCode.UNAVAILABLE),
    (BusyError, grpc.StatusCode.UNAVAILABLE),
    (ServerStartingError, grpc.StatusCode.UNAVAILABLE),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)

_PHASES: Final[dict[Phase, int]] = {
    Phase.COLLECTING: fpb.ROUND_STATE_COLLECTING,
    Phase.SELECTING: fpb.ROUND_STATE_SELECTING,
    Phase.READY: fpb.ROUND_STATE_READY,
    Phase.FAILED: fpb.ROUND_STATE_FAILED,
}
_DEFAULT_WATCH_INTERVAL_MS: Final[int] = 500
#: Longest QueryUploadStatus waits for the caller's running upload streams to finish
#: committing what had arrived (FederationServicer._wait_for_streams), seconds.
DRAIN_WAIT_S: Final[float] = 5.0
#: A running upload stream whose position has not moved for this long has nothing in flight.
STREAM_IDLE_S: Final[float] = 0.3
#: Chunks one upload stream may have decoded and queued for the journal before the handler
#: waits for the oldest to become durable (bounds a stream's memory: 16 x <= 3 MiB decoded).
MAX_CHUNKS_IN_FLIGHT: Final[int] = 16

T = TypeVar("T")


def status_for(error: BaseException) -> grpc.StatusCode | None:
    """The status code of a domain error, or None for an unexpected exception (a bug)."""
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return None


@contextlib.asynccontextmanager
async def _statuses(
    context: grpc.aio.ServicerContext, method: str, site: str | None
) -> AsyncIterator[None]:
    """Turn domain errors raised inside the block into an aborted rpc with their message."""
    try:
        yield
    except (grpc.RpcError, asyncio.CancelledError):
        # The client cancelled or its connection broke while we read its stream (or an abort
        # is already on its way): nothing to answer; what was committed stays committed.
        raise
    except Exception as error:
        code = status_for(error)
        if code is None:
            logger.exception("%s from site %s failed unexpectedly", method, site)
            raise
        logger.warning("%s from site %s: %s: %s", method, site, code.name, error)
        await context.abort(code, str(error))


@dataclasses.dataclass(frozen=True)
class MalformedRequest:
    """What the server's deserializer hands a handler for bytes that are not a valid message.

    gRPC answers a deserializer exception with INTERNAL ("Exception deserializing request!"),
    which says neither that the client is at fault nor what was wrong; so the deserializers
    registered by :func:`add_to_server` return this instead, and the handler refuses it with
    INVALID_ARGUMENT and the parser's reason (``check_parsed``).
    """

    message_type: str
    size: int
    reason: str


def check_parsed(request: object) -> None:
    """Raise ValueError (INVALID_ARGUMENT) if ``request`` is a :class:`MalformedRequest`."""
    if isinstance(request, MalformedRequest):
        raise ValueError(
            f"malformed {request.message_type} message ({request.size} bytes): {request.reason}"
        )


def _tolerant(message_class: Any) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except protobuf_message.DecodeError as error:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, len(data), str(error))

    return parse


#: (client streaming, server streaming) -> grpc's handler constructor for that kind of rpc.
_HANDLER_KINDS: Final[dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: FederationServicer, server: grpc.Server) -> None:
    """Register ``servicer`` like the generated ``add_FederationServiceServicer_to_server``, but
    with deserializers that turn undecodable bytes into :class:`MalformedRequest`.

    The handler table is derived from the service's descriptor (method names, message types,
    streaming kinds), so it cannot drift from federation.proto.
    """
    service = fpb.DESCRIPTOR.services_by_name["FederationService"]
    handlers = {}
    for method in service.methods:
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(
                method.output_type
            ).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


#: auth_context keys of the verified client certificate's names (gRPC's ssl transport).
_CERT_NAME_KEYS: Final[tuple[str, ...]] = ("x509_common_name", "x509_subject_alternative_name")


def certificate_names(context: grpc.ServicerContext) -> set[str]:
    """The CN and SAN entries of the peer's verified client certificate (empty without one)."""
    auth = context.auth_context() or {}
    return {
        value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        for key in _CERT_NAME_KEYS
        for value in auth.get(key, ())
    }


class AttachedServicer:
    """What every servicer of the daemon shares: the :class:`Federation` it serves once the
    state directory is replayed (until then every call fails with UNAVAILABLE, which clients
    retry), and the bounded executor its blocking calls run on."""

    _attached: Federation | None
    _executor: Executor

    def attach(self, federation: Federation) -> None:
        """Serve ``federation`` from now on (its journal has been replayed)."""
        self._attached = federation

    @property
    def _federation(self) -> Federation:
        if self._attached is None:
            raise ServerStartingError(
                "the server is starting (replaying its state directory); retry shortly"
            )
        return self._attached

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` on the CPU executor, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)


class FederationServicer(AttachedServicer):
    """The gRPC face of a :class:`Federation`, as asyncio handlers; ``tokens`` identify the
    calling site.

    Handlers wait without holding a thread (a site watching its round for minutes is a parked
    coroutine); CPU work (decoding and verifying a chunk, encoding a bank chunk, loading a bank
    version) runs on ``executor``, a bounded thread pool (``max_workers``).

    ``federation`` may be None while the daemon replays its state directory (the port is
    already bound so that health can say NOT_SERVING): every call then fails with UNAVAILABLE,
    which clients retry, until :meth:`attach`. ``on_chunk(site, outcome)`` is told of each
    chunk: "accepted", "resent" or the status code name it was refused with (metrics).

    bind_certificates: with mTLS (the daemon sets it when ``client_ca`` is configured), a
        token is accepted only over a connection whose client certificate names the token's
        site in its CN or a SAN entry, so a stolen token is useless without that site's key and
        one site's certificate cannot carry another site's token (PERMISSION_DENIED).
    """

    def __init__(
        self,
        federation: Federation | None,
        tokens: TokenStore,
        *,
        executor: Executor,
        on_chunk: Callable[[str, str], None] | None = None,
        bind_certificates: bool = False,
    ) -> None:
        self._attached = federation
        self._tokens = tokens
        self._executor = executor
        self._on_chunk = on_chunk
        self._bind_certificates = bind_certificates
        self._uploads_open: dict[str, int] = {}

    async def _wait_for_streams(self, site: str, round_number: int) -> None:
        """Let the site's running upload streams finish committing what has arrived before
        answering where its upload stands.

        When a connection breaks, the client learns it at once, but the server may still be
        committing the chunks that had reached it before the break (decoded and queued for the
        journal's group commit), and gRPC may still hand the handler messages that had arrived.
        A client that asked at once would be told a position those messages are about to move,
        and resend chunks the server then commits anyway from the old stream. So the answer
        waits until the site has no upload stream running and nothing queued for the journal,
        or its position has not moved for STREAM_IDLE_S (a live but idle stream: nothing is in
        flight), at most DRAIN_WAIT_S (a live stream that keeps committing: another client of
        the site, e.g. ``fedclient status`` while uploading).
        """
        deadline = time.monotonic() + DRAIN_WAIT_S
        last, moved = None, time.monotonic()
        while True:
            now = time.monotonic()
            try:
                progress = self._federation.progress(site, round_number)
            except Exception:  # the status call itself reports a bad round
                return
            # Chunks accepted but not yet durable are on their way into the journal (a stream
            # that just broke may have left some): their commit is moments away.
            if not self._uploads_open.get(site) and (
                progress.accepted_sequence <= progress.committed_sequence
            ):
                return
            position = progress.committed_sequence
            if position != last:
                last, moved = position, now
            if now - moved >= STREAM_IDLE_S or now >= deadline:
                if now >= deadline:
                    logger.info("site %s: an upload stream is still committing after "
                                "%.1f s; answering its position as it is", site, DRAIN_WAIT_S)
                return
            await asyncio.sleep(0.02)

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        """The authenticated site: its token's, bound to its client certificate under mTLS."""
        site = self._tokens.site_of(context.invocation_metadata())
        if self._bind_certificates:
            names = certificate_names(context)
            if site not in names:
                raise PermissionDeniedError(
                    f"the client certificate (names {sorted(names)}) does not belong to site "
                    f"{site!r}, the site of the bearer token: its CN or a SAN must be the site id"
                )
        return site

    def _site(self, context: grpc.aio.ServicerContext, claimed: str) -> str:
        """The caller's site (from its token); PermissionDeniedError if it claims another."""
        site = self._caller(context)
        if claimed and claimed != site:
            raise PermissionDeniedError(f"site {site!r} cannot act as site {claimed!r}")
        if not claimed:
            raise ValueError("site_id is required")
        return site

    def _site_of(self, context: grpc.aio.ServicerContext) -> str | None:
        """The token's site for log lines, or None when there is no valid token."""
        try:
            return self._tokens.site_of(context.invocation_metadata())
        except AuthError:
            return None

    async def JoinRound(  # noqa: N802 - generated interface
        self, request: fpb.JoinRoundRequest, context: grpc.aio.ServicerContext
    ) -> fpb.JoinRoundResponse:
        async with _statuses(context, "JoinRound", self._site_of(context)):
            check_parsed(request)
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
                status=snapshot_to_proto(snapshot, self._federation.config.global_bank_size),
            )
        raise AssertionError("unreachable: _statuses aborts")  # pragma: no cover

    def _submit(
        self, site: str, request: pb.UploadFeaturesRequest | MalformedRequest
    ) -> tuple[SiteSummary | FeatureChunk, Future[bool]]:
        """Parse, convert and submit one upload message (on the executor: decoding is here)."""
        check_parsed(request)
        assert isinstance(request, pb.UploadFeaturesRequest)
        item = upload_request_from_proto(request)
        return item, self._federation.submit(site, item, request.SerializeToString())

    def _count_chunk(self, site: str, error: BaseException | None, new: bool = True) -> None:
        """Tell the metrics of one chunk: accepted, resent, or the status it was refused with."""
        if self._on_chunk is None:
            return
        if error is None:
            self._on_chunk(site, "accepted" if new else "resent")
        else:
            code = status_for(error)
            self._on_chunk(site, code.name if code is not None else "UNKNOWN")

    async def UploadFeatures(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.UploadFeaturesRequest],
        context: grpc.aio.ServicerContext,
    ) -> fpb.UploadFeaturesResponse:
        accepted = ignored = 0
        round_number = 0
        site = ""
        async with _statuses(context, "UploadFeatures", self._site_of(context)):
            site = self._caller(context)
        self._uploads_open[site] = self._uploads_open.get(site, 0) + 1
        # Chunks decoded and queued for the journal whose durability is not yet known; at
        # most MAX_CHUNKS_IN_FLIGHT per stream (memory), all awaited before the answer.
        in_flight: collections.deque[tuple[asyncio.Future[bool], bool]] = collections.deque()

        async def settle(entry: tuple[asyncio.Future[bool], bool]) -> None:
            nonlocal accepted, ignored
            future, is_chunk = entry
            try:
                new = await future
            except Exception as error:
                if is_chunk:
                    self._count_chunk(site, error)
                raise
            if is_chunk:
                accepted, ignored = accepted + int(new), ignored + int(not new)
                self._count_chunk(site, None, new)

        try:
            async with _statuses(context, "UploadFeatures", site):
                async for request in request_iterator:
                    while in_flight and (in_flight[0][0].done()
                                         or len(in_flight) >= MAX_CHUNKS_IN_FLIGHT):
                        await settle(in_flight.popleft())
                    try:
                        item, done = await self._run(self._submit, site, request)
                    except Exception as error:
                        if isinstance(request, pb.UploadFeaturesRequest) and request.HasField(
                            "chunk"
                        ):
                            self._count_chunk(site, error)
                        # An earlier chunk of this stream that failed to become durable is
                        # the cause to report (it rolled the site back, so this one is out
                        # of order): settle those first.
                        while in_flight:
                            await settle(in_flight.popleft())
                        raise
                    round_number = item.round
                    in_flight.append((asyncio.wrap_future(done), isinstance(item, FeatureChunk)))
                while in_flight:
                    await settle(in_flight.popleft())
                progress = self._federation.progress(site, round_number)
                logger.info(
                    "round %d: site %s stream ended: %d chunk(s) committed, %d resent "
                    "(ignored), position %d", progress.round, site, accepted, ignored,
                    progress.committed_sequence,
                )
                return fpb.UploadFeaturesResponse(
                    upload=progress_to_proto(progress),
                    chunks_accepted=accepted,
                    chunks_ignored=ignored,
                )
        finally:
            self._uploads_open[site] -= 1
            if not self._uploads_open[site]:
                del self._uploads_open[site]
            for future, _ in in_flight:  # the stream ended early: their outcome is logged
                future.add_done_callback(_retrieve)
        raise AssertionError("unreachable: _statuses aborts")  # pragma: no cover

    async def QueryUploadStatus(  # noqa: N802
        self, request: fpb.QueryUploadStatusRequest, context: grpc.aio.ServicerContext
    ) -> fpb.QueryUploadStatusResponse:
        async with _statuses(context, "QueryUploadStatus", self._site_of(context)):
            check_parsed(request)
            site = self._site(context, request.site_id)
            await self._wait_for_streams(site, request.round)
            progress = self._federation.progress(site, request.round)
            return fpb.QueryUploadStatusResponse(upload=progress_to_proto(progress))
        raise AssertionError("unreachable: _statuses aborts")  # pragma: no cover

    async def DownloadBank(  # noqa: N802
        self, request: fpb.DownloadBankRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fpb.DownloadBankResponse]:
        async with _statuses(context, "DownloadBank", self._site_of(context)):
            check_parsed(request)
            site = self._site(context, request.site_id)
            federation = self._federation
            download = await self._run(
                federation.bank_download, site, request.version, request.have_version
            )
            header = download.header
            started, sent, messages, complete = time.perf_counter(), 0, 0, False
            try:
                for response in _header_responses(download):
                    sent += response.ByteSize()
                    messages += 1
                    yield response
                chunks = iter(download.chunks)
                while True:
                    chunk = await self._run(next, chunks, None)
                    if chunk is None:
                        break
                    response = fpb.DownloadBankResponse(chunk=bank_chunk_to_proto(chunk))
                    sent += response.ByteSize()
                    messages += 1
                    yield response
                complete = True
            finally:  # the round report counts what was sent, finished or not
                federation.record_download(
                    site, header, bytes_sent=sent, messages=messages,
                    seconds=time.perf_counter() - started, complete=complete,
                )

    async def WatchRound(  # noqa: N802
        self, request: fpb.WatchRoundRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fpb.RoundStatus]:
        async with _statuses(context, "WatchRound", self._site_of(context)):
            check_parsed(request)
            self._site(context, request.site_id)
            interval = (request.min_interval_ms or _DEFAULT_WATCH_INTERVAL_MS) / 1000.0
            async for snapshot in self._federation.watch(
                request.round, interval, lambda: not context.done()
            ):
                yield snapshot_to_proto(snapshot, self._federation.config.global_bank_size)


def _retrieve(future: asyncio.Future[bool]) -> None:
    """Mark a future's exception as seen (a stream that aborted no longer awaits it; ingest
    has logged what went wrong)."""
    if not future.cancelled():
        future.exception()


def _header_responses(download: BankDownload) -> Iterator[fpb.DownloadBankResponse]:
    """A DownloadBank reply's first messages: the header, then the removed indices."""
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
        federation_id=header.federation_id,
    ))
    for lo in range(0, download.removed.size, REMOVED_BATCH):
        batch = download.removed[lo : lo + REMOVED_BATCH]
        yield fpb.DownloadBankResponse(removed=fpb.RemovedRows(indices=batch.tolist()))


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


def snapshot_to_proto(snapshot: RoundSnapshot, global_bank_size: int) -> fpb.RoundStatus:
    """RoundStatus of ``snapshot``; ``global_bank_size``: the k the server asks for (a READY
    round's bank_rows below it is a short bank)."""
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
        global_bank_size=global_bank_size,
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
        federation_id=terms.federation_id,
        full_coreset=terms.full_coreset,
    )
