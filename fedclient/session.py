"""One site's conversation with a fedserver: join, resumable upload, (delta) bank download, watch.

Data flows site -> session -> wire and wire -> session -> scoring; everything about features,
codecs and chunking is core's (``core.serde``, ``core.codec``): this module only moves messages.

Retries live here and nowhere else. Every retry is bounded (:class:`RetryPolicy`: attempts,
exponential backoff, jitter from an injectable seeded ``random.Random``), and an upload learns
where to resume from the server (``QueryUploadStatus.committed_sequence``, as Google's
ByteStream ``QueryWriteStatus``), never from what it believes it sent: after a broken stream the
site sends exactly the chunks the server has not durably committed. gRPC's own transparent
retries are switched off on the channel (``grpc.enable_retries = 0``) so that they cannot resend
a non-idempotent call behind the session's back.

Errors reach the caller as :class:`SessionError` subclasses whose message is one line a user can
act on (the CLI prints it without a traceback).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import numpy as np
from numpy.typing import NDArray

from core.bankdelta import DeltaError, apply_delta, bank_checksum
from core.codec import CodecConfig
from core.features import FeatureConfig
from core.messages import FeatureChunk, SiteSummary
from core.preprocess import ImageTransform
from core.serde import (
    ChunkAssembler,
    bank_chunk_from_proto,
    codec_config_from_proto,
    upload_request_to_proto,
)
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedpatchcore.v1 import federation_pb2_grpc as fgrpc

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AuthenticationError",
    "BankDownload",
    "ConnectionConfig",
    "FingerprintMismatchError",
    "PermissionDeniedError",
    "RejectedError",
    "RetryPolicy",
    "RoundClosedError",
    "RoundConfig",
    "RoundFailedError",
    "ServerUnavailableError",
    "SessionError",
    "SiteSession",
    "StaleBankError",
    "TLSConfig",
    "UploadResult",
]

# Chunks are at most 3 MiB of payload plus framing (core/serde.py); 16 MiB leaves room for a
# server that raises its chunk size while still bounding what a broken peer can make us buffer.
DEFAULT_MAX_MESSAGE_BYTES: Final[int] = 16 << 20

# Codes after which the same request may succeed: the connection broke (UNAVAILABLE), the call ran
# out of time (DEADLINE_EXCEEDED), the server asked us to retry (ABORTED), or a chunk was damaged
# in transit (DATA_LOSS: resend it). OUT_OF_RANGE means our idea of the committed position is
# stale: ask the server again. Everything else is a decision the server made about this request.
_RETRYABLE: Final[frozenset[grpc.StatusCode]] = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


#: Trailing metadata with which fedserver refuses an rpc over its concurrency budget (the
#: caller holds too many rpcs at once): RESOURCE_EXHAUSTED, but worth retrying after a pause,
#: unlike a limit on what the site sends (too many rows), which is final.
_CONCURRENCY_REFUSAL: Final[tuple[str, str]] = ("fedpatchcore-retry", "concurrency")


def _retryable(error: grpc.RpcError) -> bool:
    """Whether the same request may succeed later (see _RETRYABLE and _CONCURRENCY_REFUSAL)."""
    code = error.code() if hasattr(error, "code") else None
    if code in _RETRYABLE:
        return True
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    if any((k, v) == _CONCURRENCY_REFUSAL for k, v in (trailing or ())):
        return True
    details = (error.details() if hasattr(error, "details") else "") or ""
    return details.startswith("Concurrent RPC limit exceeded")  # grpc's own server-wide limit


# --- errors ------------------------------------------------------------------------------------


class SessionError(RuntimeError):
    """A call to the server failed for good; ``str(error)`` is one line for the user.

    code: the gRPC status code behind it (None when the failure happened on this side).
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ServerUnavailableError(SessionError):
    """The server could not be reached (or kept dropping the connection) within the retries."""


class AuthenticationError(SessionError):
    """The server refused the bearer token (UNAUTHENTICATED)."""


class PermissionDeniedError(SessionError):
    """The token is valid but not for the site the request names (PERMISSION_DENIED)."""


class RoundClosedError(SessionError):
    """No round is open for this site, or the call does not fit the round's state."""


class FingerprintMismatchError(SessionError):
    """This site's feature extraction differs from the federation's: its features cannot merge."""


class RoundFailedError(SessionError):
    """The round ended without a bank (deadline passed below quorum, or selection failed)."""


class RejectedError(SessionError):
    """The server rejected a request's content (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...)."""


class StaleBankError(RejectedError):
    """The bank this site holds is not the server's bank of that version: a delta against it
    gives the wrong rows or fails the checksum (it comes from an earlier federation or from a
    server whose state was reset). :meth:`SiteSession.download_bank` then fetches the full bank.

    bytes_received: what the refused delta download moved (counted with the full one).
    """

    def __init__(self, message: str, bytes_received: int = 0) -> None:
        super().__init__(message)
        self.bytes_received = bytes_received


#: How gRPC reports a failed TLS handshake in an UNAVAILABLE's details (the part a user can act
#: on: "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ...: WRONG_VERSION_NUMBER").
_TLS_FAILURE: Final[re.Pattern[str]] = re.compile(
    r"(?i)(tls handshake failed|ssl handshake|handshake failed|certificate verify failed)"
    r"[^;]*?(?=: OK$|$)"
)


def _error_from_rpc(error: grpc.RpcError, what: str, address: str) -> SessionError:
    """Map a final RpcError to the SessionError a user can act on."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    details = " ".join(details.split())  # one line
    if code == grpc.StatusCode.UNAVAILABLE and _TLS_FAILURE.search(details):
        return ServerUnavailableError(
            f"TLS handshake with the server at {address} failed ({what}): the server may not "
            "use TLS (then leave out --tls-ca/--tls-cert/--tls-key), or its certificate is not "
            "signed by --tls-ca or names another host (--tls-server-name); gRPC said: "
            f"{_TLS_FAILURE.search(details).group(0)}",  # type: ignore[union-attr]
            code,
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServerUnavailableError(
            f"cannot reach the server at {address} ({what}): {details}", code
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(f"the server refused the token ({what}): {details}", code)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(f"permission denied ({what}): {details}", code)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if "fingerprint" in details.lower():
            return FingerprintMismatchError(
                f"feature extractor mismatch ({what}): {details}", code
            )
        return RoundClosedError(f"the round does not accept this ({what}): {details}", code)
    name = code.name if code is not None else "UNKNOWN"
    return RejectedError(f"the server rejected {what} ({name}): {details}", code)


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings of the channel.

    ca_file: PEM of the CA that signed the server's certificate (None: the system roots).
    cert_file / key_file: this site's certificate and key, both or neither (mTLS).
    server_name: overrides the name checked against the server certificate (e.g. "localhost"
        when connecting to 127.0.0.1 with a certificate issued for localhost).
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS client certificate and key go together: give both or neither")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS {name.replace('_', ' ')} not found: {path}")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); ValueError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"token file not found: {path}")
    token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise ValueError(f"token file {path} must hold one token without spaces or control chars")
    return token


@dataclass(frozen=True)
class ConnectionConfig:
    """Where and how to reach the server.

    address: "host:port".
    token: the site's bearer token (sent as ``authorization: Bearer <token>``); None sends none.
    tls: TLS settings; None means plaintext (loopback and tests only: the token travels in
        the clear).
    max_message_bytes: max send and receive message size set on the channel, bytes.
    call_timeout_s: deadline of each unary call, seconds; an upload stream attempt gets this
        plus the time its bytes take at ``min_upload_bytes_per_s``, so that a large coreset on
        a slow link or a busy server is not cut off by a fixed deadline.
    min_upload_bytes_per_s: the slowest upload rate, bytes/s, a stream is given time for
        (default 128 KiB/s, about 1 Mbit/s); a stream slower than this is abandoned and
        resumed from the server's committed position.
    """

    address: str
    token: str | None = None
    tls: TLSConfig | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    call_timeout_s: float = 60.0
    min_upload_bytes_per_s: float = 128 * 1024

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"server address must be HOST:PORT, got {self.address!r}")
        if self.max_message_bytes < 4 << 20:
            raise ValueError(
                f"max_message_bytes must be >= 4 MiB (chunks reach 3 MiB), got "
                f"{self.max_message_bytes}"
            )
        if self.call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be > 0, got {self.call_timeout_s}")
        if self.min_upload_bytes_per_s <= 0:
            raise ValueError(
                f"min_upload_bytes_per_s must be > 0, got {self.min_upload_bytes_per_s}"
            )

    def upload_timeout_s(self, stream_bytes: int) -> float:
        """Deadline of one upload stream that carries ``stream_bytes`` bytes, seconds."""
        return self.call_timeout_s + stream_bytes / self.min_upload_bytes_per_s

    def open_channel(self) -> grpc.Channel:
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # The session is the one place that retries (bounded, resuming from the server's
            # committed position); gRPC's transparent retries would be a second, invisible one.
            ("grpc.enable_retries", 0),
            # A server that restarts is back in seconds: gRPC's own reconnect backoff (up to
            # 120 s by default) would keep the channel failing fast long after it is, so the
            # session's bounded retries would spend themselves on a channel that never tries.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # Subchannels of this session's own: a broken connection of one session (one site
            # of many in a test or benchmark process) does not put another's into backoff.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self.tls is None:
            return grpc.insecure_channel(self.address, options=options)
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return grpc.secure_channel(self.address, self.tls.credentials(), options=options)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    max_attempts: tries per operation, the first included (>= 1).
    initial_backoff_s / max_backoff_s / multiplier: the n-th retry waits
        min(max_backoff_s, initial_backoff_s * multiplier**(n-1)) seconds ...
    jitter: ... scaled by a uniform factor in [1 - jitter, 1] (spreads sites that lost the
        server together, so they do not reconnect in lock-step).
    reconnect_s: a watch of the round (a site waiting for the bank) is bounded by time, not
        attempts: it keeps reconnecting while the server is away (restarting, draining) for
        up to this many seconds after the last message it received.
    """

    max_attempts: int = 6
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    multiplier: float = 2.0
    jitter: float = 0.5
    reconnect_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"need 0 <= initial_backoff_s <= max_backoff_s, got {self.initial_backoff_s}, "
                f"{self.max_backoff_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.reconnect_s < 0:
            raise ValueError(f"reconnect_s must be >= 0, got {self.reconnect_s}")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * (1.0 - self.jitter * rng.random())


@dataclass(frozen=True)
class RoundConfig:
    """The rules of the round a site joined (domain view of fedpatchcore.v1.RoundConfig).

    feature_fingerprint / extractor: empty / None when the server pins no extractor.
    deadline_unix_s: None when the round has no deadline.
    federation_id: the server's federation (its state directory); "" from a server without one.
    """

    round: int
    feature_fingerprint: str
    extractor: fpb.FeatureExtractor | None
    codec: CodecConfig
    max_chunk_bytes: int
    global_bank_size: int
    max_rows_per_site: int
    feature_dim: int
    deadline_unix_s: float | None
    expected_sites: int
    quorum: int
    novelty_threshold: float
    base_bank_version: int
    federation_id: str = ""
    #: the server holds no r_i of this site (round 1, or a site that joins late): upload the
    #: full local coreset, as in round 1
    full_coreset: bool = False

    @classmethod
    def from_proto(cls, message: fpb.RoundConfig) -> RoundConfig:
        return cls(
            round=message.round,
            feature_fingerprint=message.feature_fingerprint,
            extractor=message.extractor if message.HasField("extractor") else None,
            codec=codec_config_from_proto(message.codec),
            max_chunk_bytes=message.max_chunk_bytes,
            global_bank_size=message.global_bank_size,
            max_rows_per_site=message.max_rows_per_site,
            feature_dim=message.feature_dim,
            deadline_unix_s=(
                message.deadline.seconds + message.deadline.nanos / 1e9
                if message.HasField("deadline")
                else None
            ),
            expected_sites=message.expected_sites,
            quorum=message.quorum,
            novelty_threshold=message.novelty_threshold,
            base_bank_version=message.base_bank_version,
            federation_id=message.federation_id,
            full_coreset=message.full_coreset,
        )

    def feature_config(self, *, weights: str | None = None) -> FeatureConfig | None:
        """The FeatureConfig the server pins (None when it pins none).

        The weights themselves never travel: a pretrained extractor loads timm's weights, or
        ``weights`` (a local file) on an air-gapped site; the fingerprint then checks they match.
        """
        e = self.extractor
        if e is None:
            return None
        resize = tuple(e.resize)
        return FeatureConfig(
            backbone=e.backbone,
            layers=tuple(e.layers),
            pretrained=e.pretrained,
            weights=weights,
            pretrain_embed_dim=e.pretrain_embed_dim,
            target_embed_dim=e.target_embed_dim,
            patch_size=e.patch_size,
            transform=ImageTransform(
                resize=resize[0] if len(resize) == 1 else resize,  # type: ignore[arg-type]
                crop=e.crop or None,
            ),
            init_seed=e.init_seed,
        )


@dataclass(frozen=True)
class UploadResult:
    """What one site's upload of one round took.

    chunks_total: chunks of the whole upload. committed_at_start: chunks the server already
    held when this session began uploading (a restarted site resumes after them).
    chunks_sent: chunk messages this session put on the wire, resends included.
    bytes_sent: serialized UploadFeaturesRequest bytes this session sent (summary included).
    attempts: upload streams opened. seconds: wall time of the upload.
    streams: per stream opened, (the committed position it started from, chunks it sent).
    A broken stream may have sent more than the server committed: gRPC takes messages ahead of
    the server's reading, up to its flow-control window, and a break discards them; the next
    stream starts from what the server committed, so only those in flight are sent twice.
    """

    round: int
    chunks_total: int
    committed_at_start: int
    chunks_sent: int
    bytes_sent: int
    attempts: int
    seconds: float
    status: fpb.UploadStatus
    streams: tuple[tuple[int, int], ...] = ()

    @property
    def extra_chunks(self) -> int:
        """Chunks sent beyond those the server had not committed when this session started
        (0 without a break; else the chunks in flight when a stream broke)."""
        return self.chunks_sent - (self.chunks_total - self.committed_at_start)


@dataclass(frozen=True)
class BankDownload:
    """A decoded global bank and how it arrived.

    bank: [K, D] float32, in the server's bank order. delta: True when only the change since
    ``base_version`` travelled. bytes_received: serialized DownloadBankResponse bytes.
    federation_id: the federation the bank belongs to (BankHeader.federation_id).
    """

    bank: NDArray[np.float32]
    version: int
    round: int
    base_version: int
    delta: bool
    rows_in_stream: int
    rows_removed: int
    server_radius: float
    max_site_radius: float
    bytes_received: int
    seconds: float
    federation_id: str = ""
    #: Why the bank the site held was discarded (StaleBankError's message), or None.
    replaced_stale: str | None = None


# --- the session -------------------------------------------------------------------------------


class SiteSession:
    """One site's conversation with the server over one channel.

    Args:
        connection: address, token, TLS, limits.
        site_id: this site's id (the token's site).
        retry: bounds of every retry loop.
        rng: jitter source; seed it (or inject one) for reproducible waits.
        sleep: how to wait between retries (tests inject a fake clock).
        max_upload_bytes_per_s: throttle of the upload stream (None: as fast as the link);
            for sites on a shared link.

    Use as a context manager (closes the channel). Not thread-safe.
    """

    def __init__(
        self,
        connection: ConnectionConfig,
        site_id: str,
        *,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_upload_bytes_per_s: float | None = None,
    ) -> None:
        if not site_id:
            raise ValueError("site_id must be non-empty")
        if max_upload_bytes_per_s is not None and max_upload_bytes_per_s <= 0:
            raise ValueError(
                f"max_upload_bytes_per_s must be > 0 or None, got {max_upload_bytes_per_s}"
            )
        self.connection = connection
        self.site_id = site_id
        self.retry = retry if retry is not None else RetryPolicy()
        self._rng = rng if rng is not None else random.Random(0)
        self._sleep = sleep
        self._rate = max_upload_bytes_per_s
        self._channel = connection.open_channel()
        self._stub = fgrpc.FederationServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {connection.token}"),) if connection.token else ()
        )

    def __enter__(self) -> SiteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # -- unary calls -------------------------------------------------------------------------

    def _call(self, what: str, function: Callable[[], object]) -> object:
        """Run a unary call with bounded retries on retryable codes."""
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                return function()
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                if not _retryable(error) or attempt == self.retry.max_attempts:
                    raise _error_from_rpc(error, what, self.connection.address) from None
                delay = self.retry.backoff(attempt, self._rng)
                logger.warning(
                    "%s: %s (%s); retry %d/%d in %.2f s", what, code.name,
                    error.details(), attempt, self.retry.max_attempts - 1, delay,  # type: ignore[attr-defined]
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def join(self, feature_fingerprint: str = "") -> fpb.JoinRoundResponse:
        """JoinRound: the open round's config, this site's upload position and round status.

        ``feature_fingerprint`` (SHA-256 hex of the site's extractor, or "") lets the server
        refuse an incompatible site before it uploads (FingerprintMismatchError).
        """
        request = fpb.JoinRoundRequest(
            site_id=self.site_id, feature_fingerprint=feature_fingerprint
        )
        response = self._call(
            "join",
            lambda: self._stub.JoinRound(
                request, metadata=self._metadata, timeout=self.connection.call_timeout_s
            ),
        )
        assert isinstance(response, fpb.JoinRoundResponse)
        config = response.config
        if (
            feature_fingerprint
            and config.feature_fingerprint
            and config.feature_fingerprint != feature_fingerprint
        ):
            raise FingerprintMismatchError(
                f"feature extractor mismatch: this site's fingerprint {feature_fingerprint[:12]}"
                f"... differs from the federation's {config.feature_fingerprint[:12]}..."
            )
        logger.info(
            "site %s joined round %d (committed %d chunk(s), complete=%s)", self.site_id,
            config.round, response.upload.committed_sequence, response.upload.complete,
        )
        return response

    def upload_status(self, round_number: int = 0) -> fpb.UploadStatus:
        """QueryUploadStatus: how far the server has durably committed this site's upload."""
        request = fpb.QueryUploadStatusRequest(site_id=self.site_id, round=round_number)
        response = self._call(
            "upload status",
            lambda: self._stub.QueryUploadStatus(
                request, metadata=self._metadata, timeout=self.connection.call_timeout_s
            ),
        )
        assert isinstance(response, fpb.QueryUploadStatusResponse)
        return response.upload

    # -- upload ------------------------------------------------------------------------------

    def upload(
        self, summary: SiteSummary, chunks: Sequence[FeatureChunk]
    ) -> UploadResult:
        """Upload ``summary`` and ``chunks`` (sequence order 0..n-1, the last with last=True).

        Starts where the server's committed position says, and after any broken stream asks
        the server again (QueryUploadStatus) and resumes there: at most ``retry.max_attempts``
        streams. Chunks below the committed position are never resent.
        """
        if not chunks or not chunks[-1].last:
            raise ValueError("chunks must be a complete upload ending with last = True")
        round_number = summary.round
        requests = [upload_request_to_proto(c) for c in chunks]
        summary_request = upload_request_to_proto(summary)
        start = time.perf_counter()
        status = self.upload_status(round_number)
        committed_at_start = int(status.committed_sequence)
        sent = 0
        sent_bytes = 0
        attempts = 0
        streams: list[tuple[int, int]] = []
        while not status.complete:
            position = int(status.committed_sequence)
            if position > len(requests):
                raise RejectedError(
                    f"the server committed {position} chunks of round {round_number}, this "
                    f"upload has only {len(requests)}: the site's data changed since it "
                    "started uploading"
                )
            if attempts == self.retry.max_attempts:
                raise ServerUnavailableError(
                    f"upload of round {round_number} still incomplete after {attempts} "
                    f"stream(s) (committed {position}/{len(requests)} chunks)"
                )
            attempts += 1
            counter = _SendCounter()
            summary_message = None if status.summary_committed else summary_request
            stream_bytes = sum(r.ByteSize() for r in requests[position:]) + (
                summary_message.ByteSize() if summary_message is not None else 0
            )
            stream = self._requests(summary_message, requests[position:], counter)
            logger.info(
                "site %s: upload round %d from chunk %d of %d (attempt %d)", self.site_id,
                round_number, position, len(requests), attempts,
            )
            try:
                response = self._stub.UploadFeatures(
                    stream, metadata=self._metadata,
                    timeout=self.connection.upload_timeout_s(stream_bytes),
                )
                status = response.upload
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                if not _retryable(error) or attempts == self.retry.max_attempts:
                    raise _error_from_rpc(
                        error, f"upload of round {round_number}", self.connection.address
                    ) from None
                delay = self.retry.backoff(attempts, self._rng)
                logger.warning(
                    "site %s: upload stream broke after %d chunk(s) (%s: %s); asking the "
                    "server where to resume in %.2f s", self.site_id, counter.chunks,
                    code.name, error.details(), delay,  # type: ignore[attr-defined]
                )
                self._sleep(delay)
                status = self.upload_status(round_number)
            finally:
                sent += counter.chunks
                sent_bytes += counter.bytes
                streams.append((position, counter.chunks))
        result = UploadResult(
            round=round_number,
            chunks_total=len(requests),
            committed_at_start=committed_at_start,
            chunks_sent=sent,
            bytes_sent=sent_bytes,
            attempts=attempts,
            seconds=time.perf_counter() - start,
            status=status,
            streams=tuple(streams),
        )
        logger.info(
            "site %s: round %d upload complete: %d chunk(s) sent of %d (server held %d at "
            "start), %d B, %d stream(s)", self.site_id, round_number, sent, len(requests),
            committed_at_start, sent_bytes, attempts,
        )
        return result

    def _requests(
        self,
        summary: pb.UploadFeaturesRequest | None,
        chunks: Iterable[pb.UploadFeaturesRequest],
        counter: _SendCounter,
    ) -> Iterator[pb.UploadFeaturesRequest]:
        """The messages of one upload stream, counted (and throttled) as gRPC pulls them."""
        started = time.monotonic()
        items = ([summary] if summary is not None else []) + list(chunks)
        for request in items:
            size = request.ByteSize()
            if self._rate is not None:
                # Wait until the bytes sent so far fit the rate (a token bucket without burst).
                due = started + (counter.bytes + size) / self._rate
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            counter.bytes += size
            if request.HasField("chunk"):
                counter.chunks += 1
            yield request

    # -- download ----------------------------------------------------------------------------

    def download_bank(
        self,
        *,
        version: int = 0,
        have: tuple[int, NDArray[np.float32]] | None = None,
        max_rows: int = 10_000_000,
    ) -> BankDownload:
        """DownloadBank: the global bank ``version`` (0: newest), as a delta when ``have``
        (version, bank) is an older version the server still holds.

        Decoding, order and resend checks are core.serde's ChunkAssembler; the result is checked
        against the header's checksum when the codec makes one (element-wise value types).
        """
        if have is not None:
            try:
                return self._download_bank(version, have, max_rows)
            except StaleBankError as error:
                # One line that says why, then the whole bank: a stale copy must not stop a site.
                logger.warning(
                    "site %s: the bank it holds (version %d, %d rows) is not the server's: %s; "
                    "it comes from an earlier federation or a reset server, so it is discarded "
                    "and the full bank downloaded", self.site_id, have[0], have[1].shape[0],
                    error,
                )
                result = self._download_bank(version, None, max_rows)
                return dataclasses.replace(
                    result, replaced_stale=str(error),
                    bytes_received=result.bytes_received + error.bytes_received,
                )
        return self._download_bank(version, None, max_rows)

    def _download_bank(
        self, version: int, have: tuple[int, NDArray[np.float32]] | None, max_rows: int
    ) -> BankDownload:
        have_version = have[0] if have is not None else 0
        request = fpb.DownloadBankRequest(
            site_id=self.site_id, version=version, have_version=have_version
        )
        what = "bank download"
        for attempt in range(1, self.retry.max_attempts + 1):
            start = time.perf_counter()
            try:
                responses = self._stub.DownloadBank(
                    request, metadata=self._metadata, timeout=self.connection.call_timeout_s
                )
                return self._read_bank(responses, have, max_rows, start)
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                if not _retryable(error) or attempt == self.retry.max_attempts:
                    raise _error_from_rpc(error, what, self.connection.address) from None
                delay = self.retry.backoff(attempt, self._rng)
                logger.warning("%s: %s; retry in %.2f s", what, code.name, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _read_bank(
        self,
        responses: Iterable[fpb.DownloadBankResponse],
        have: tuple[int, NDArray[np.float32]] | None,
        max_rows: int,
        start: float,
    ) -> BankDownload:
        received = 0
        header: fpb.BankHeader | None = None
        removed: list[int] = []
        assembler: ChunkAssembler | None = None
        for response in responses:
            received += response.ByteSize()
            body = response.WhichOneof("body")
            if body == "header":
                if header is not None:
                    raise RejectedError("bank stream carries two headers")
                header = response.header
                if header.total_rows > max_rows:
                    raise RejectedError(
                        f"the bank has {header.total_rows} rows, more than this site's "
                        f"limit of {max_rows}"
                    )
                assembler = ChunkAssembler(
                    max_rows=int(header.rows_in_stream), expected_cols=int(header.feature_dim)
                )
            elif header is None or assembler is None:
                raise RejectedError(f"bank stream starts with {body!r} instead of a header")
            elif body == "removed":
                removed.extend(response.removed.indices)
            elif body == "chunk":
                assembler.add(bank_chunk_from_proto(response.chunk))
            else:
                raise RejectedError("bank stream message has no body")
        if header is None or assembler is None:
            raise RejectedError("bank stream ended before its header")
        added = assembler.result()  # raises IncompleteUploadError without the last chunk
        delta = header.base_version != 0
        if delta:
            if have is None or have[0] != header.base_version:
                raise RejectedError(
                    f"the server sent a delta against version {header.base_version}, this "
                    f"site holds {have[0] if have else 'none'}"
                )
            if len(removed) != header.rows_removed:
                raise RejectedError(
                    f"bank delta announced {header.rows_removed} removed rows, carried "
                    f"{len(removed)}"
                )
            try:
                bank = apply_delta(have[1], np.asarray(removed, dtype=np.int64), added)
            except (DeltaError, ValueError) as error:
                raise StaleBankError(
                    f"the delta from version {have[0]} does not fit it ({error})", received
                ) from None
        else:
            bank = added
        # After a delta, a wrong row count or checksum means the copy it was applied to is not
        # the server's version of it (StaleBankError: the caller downloads the whole bank);
        # after a full download it means the stream itself is wrong.
        problem = None
        if bank.shape[0] != header.total_rows:
            problem = (f"bank version {header.version} has {bank.shape[0]} rows, the header says "
                       f"{header.total_rows}")
        elif header.bank_checksum and bank_checksum(bank) != header.bank_checksum:
            problem = (f"bank version {header.version} fails its checksum"
                       + (" after applying the delta" if delta else ""))
        if problem is not None:
            raise StaleBankError(problem, received) if delta else RejectedError(problem)
        result = BankDownload(
            bank=bank,
            version=int(header.version),
            round=int(header.round),
            base_version=int(header.base_version),
            delta=delta,
            rows_in_stream=int(header.rows_in_stream),
            rows_removed=int(header.rows_removed),
            server_radius=header.server_coverage_radius,
            max_site_radius=header.max_site_coverage_radius,
            bytes_received=received,
            seconds=time.perf_counter() - start,
            federation_id=header.federation_id,
        )
        logger.info(
            "site %s: bank v%d (%s, %d rows, %d in stream, %d removed), %d B", self.site_id,
            result.version, f"delta from v{result.base_version}" if delta else "full",
            bank.shape[0], result.rows_in_stream, result.rows_removed, received,
        )
        return result

    # -- watch -------------------------------------------------------------------------------

    def watch(
        self, round_number: int = 0, *, min_interval_ms: int = 0, timeout_s: float | None = None
    ) -> Iterator[fpb.RoundStatus]:
        """WatchRound: yield the round's status now and on every change until it ends.

        A broken stream, or one the server ends before the round does (it is draining for a
        restart), is reopened with backoff while the server is away, for up to
        ``retry.reconnect_s`` after the last message (then ServerUnavailableError), so a site
        waiting for the bank rides out a server restart; a server never reached at all gets
        ``retry.max_attempts`` tries, like any call. ``timeout_s`` bounds the whole watch.
        """
        request = fpb.WatchRoundRequest(
            site_id=self.site_id, round=round_number, min_interval_ms=min_interval_ms
        )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failures = 0
        last_message: float | None = None  # None until the server answered once
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                for status in self._stub.WatchRound(
                    request, metadata=self._metadata, timeout=remaining
                ):
                    failures, last_message = 0, time.monotonic()
                    yield status
                    if status.state in (fpb.ROUND_STATE_READY, fpb.ROUND_STATE_FAILED):
                        return
                reason = "the server ended the watch before the round did (draining)"
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                if not _retryable(error):
                    raise _error_from_rpc(
                        error, f"watching round {round_number or 'open'}",
                        self.connection.address,
                    ) from None
                reason = f"{code.name}: {error.details()}"  # type: ignore[attr-defined]
                final = error
            else:
                final = None
            failures += 1
            now = time.monotonic()
            # Never reached: bounded by attempts like any call. Reached before: the server is
            # restarting or draining, so keep at it for reconnect_s.
            gone = (failures >= self.retry.max_attempts if last_message is None
                    else now - last_message >= self.retry.reconnect_s)
            if gone or (deadline is not None and now >= deadline):
                if final is not None:
                    raise _error_from_rpc(
                        final, f"watching round {round_number or 'open'}",
                        self.connection.address,
                    ) from None
                raise ServerUnavailableError(
                    f"the server at {self.connection.address} ended the watch of round "
                    f"{round_number or 'open'} before the bank was ready, and did not come "
                    f"back within {self.retry.reconnect_s:.0f} s"
                )
            delay = self.retry.backoff(min(failures, self.retry.max_attempts), self._rng)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - now))
            logger.warning("watch of round %s: %s; reconnecting in %.2f s",
                           round_number or "open", reason, delay)
            self._sleep(delay)

    def wait_until_ready(
        self,
        round_number: int,
        *,
        timeout_s: float | None = None,
        on_status: Callable[[fpb.RoundStatus], None] | None = None,
    ) -> fpb.RoundStatus:
        """Watch ``round_number`` until its bank is READY; RoundFailedError if it FAILED."""
        last: fpb.RoundStatus | None = None
        for status in self.watch(round_number, timeout_s=timeout_s):
            last = status
            if on_status is not None:
                on_status(status)
        if last is None or last.state not in (fpb.ROUND_STATE_READY, fpb.ROUND_STATE_FAILED):
            raise ServerUnavailableError(
                f"the server ended the watch of round {round_number} before the bank was ready"
            )
        if last.state == fpb.ROUND_STATE_FAILED:
            raise RoundFailedError(f"round {round_number} failed on the server: {last.message}")
        return last


@dataclass
class _SendCounter:
    """Chunks and bytes one upload stream handed to gRPC."""

    chunks: int = 0
    bytes: int = 0

