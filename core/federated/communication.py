"""Communication between sites and server, in process, with the real wire messages.

Every transfer is carried as the serialized protobuf messages the gRPC services exchange
(``fedpatchcore.v1.UploadFeaturesRequest`` up, ``fedpatchcore.v1.BankChunk`` down), built by the
same codec and chunking code, so the byte counts are exact rather than ``array.nbytes``
estimates. They count the serialized messages; on a real connection gRPC adds a 5-byte length
prefix per message and HTTP/2 a 9-byte header per DATA frame (gRPC's peers allow 4 MiB frames;
measured frames of a 1 MiB-chunk upload are 190-430 KiB), plus each call's HEADERS.
``compute_communication_cost(..., wire=True)`` adds the per-message part (:func:`wire_bytes`);
a counting proxy on the real daemon's stream measures the rest at a few hundred bytes per call
(benchmarks/wire.py, tests/test_bench_wire.py). Measured on the real daemon's TCP streams
(benchmarks/system_round.py): 1.0017x the messages up and 1.0006x down, connection set-up
included. One difference in kind: the daemon sends a site that holds an older bank only the
change (core.bankdelta), while this simulation re-broadcasts a changed bank whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch
from google.protobuf.message import DecodeError, Message

from core.codec import DEFAULT_CODEC, CodecConfig
from core.messages import FeatureChunk, InvalidMessageError, SiteSummary
from core.serde import (
    DEFAULT_MAX_CHUNK_BYTES,
    ChunkAssembler,
    IncompleteUploadError,
    bank_chunk_from_proto,
    bank_chunk_to_proto,
    split_bank_into_chunks,
    split_into_chunks,
    upload_request_from_proto,
    upload_request_to_proto,
)
from fedpatchcore.v1 import features_pb2 as pb

logger = logging.getLogger(__name__)

#: gRPC's per-message prefix: 1 byte compressed flag + 4 bytes big-endian length.
GRPC_MESSAGE_PREFIX_BYTES = 5
#: HTTP/2 frame header (RFC 9113 section 4.1): 3 length + 1 type + 1 flags + 4 stream id.
HTTP2_FRAME_HEADER_BYTES = 9
#: SETTINGS_MAX_FRAME_SIZE gRPC's C core advertises (4 MiB): a message up to that size can go
#: in one DATA frame. The sender cuts frames at its write slices too (measured: 190-430 KiB
#: frames for 1 MiB chunks), which this model does not know; each extra frame is 9 bytes.
HTTP2_MAX_FRAME_BYTES = 4 << 20

__all__ = [
    "GRPC_MESSAGE_PREFIX_BYTES",
    "HTTP2_FRAME_HEADER_BYTES",
    "HTTP2_MAX_FRAME_BYTES",
    "BankDelivery",
    "BankReceiver",
    "CommunicationProtocol",
    "parse_upload",
    "receive_bank",
    "wire_bytes",
]


def wire_bytes(message_bytes: int, *, max_frame_bytes: int = HTTP2_MAX_FRAME_BYTES) -> int:
    """Bytes one serialized gRPC message of ``message_bytes`` takes on an HTTP/2 stream.

    gRPC prefixes the message with 5 bytes (compressed flag, length) and HTTP/2 carries the
    result in DATA frames of at most ``max_frame_bytes`` payload bytes, each behind a 9-byte
    frame header. Not counted: a call's HEADERS (about 130-320 bytes: path, token, timeout),
    its end-of-stream frame, connection-level frames (SETTINGS, WINDOW_UPDATE, PING) and the
    extra DATA frames of the sender's write slices: a few hundred bytes per call, not per
    message (measured on loopback: 0.01-0.04 % of a 0.7-3.3 MB upload, tests/test_bench_wire.py).
    """
    if message_bytes < 0 or max_frame_bytes < 1:
        raise ValueError(
            f"need message_bytes >= 0 and max_frame_bytes >= 1, got {message_bytes}, "
            f"{max_frame_bytes}"
        )
    framed = GRPC_MESSAGE_PREFIX_BYTES + message_bytes
    frames = -(-framed // max_frame_bytes)
    return framed + HTTP2_FRAME_HEADER_BYTES * frames

_M = TypeVar("_M", bound=Message)


class BankReceiver(Protocol):
    """What ``broadcast_to_clients`` delivers to: anything with ``update_global_bank``."""

    def update_global_bank(self, global_features: np.ndarray) -> None: ...


@dataclass(frozen=True)
class BankDelivery:
    """A decoded global-bank stream: the bank and the radii every chunk carries."""

    bank: np.ndarray
    round: int
    server_radius: float
    max_site_radius: float


def _parse(message_type: type[_M], data: bytes, position: int) -> _M:
    """One serialized message -> the generated class; undecodable bytes raise
    InvalidMessageError (a ValueError, like every validation error of core.serde), not
    protobuf's DecodeError, so a transport maps every bad input to one status code."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise InvalidMessageError(
            f"message {position} is not a serialized {message_type.DESCRIPTOR.full_name} "
            f"({len(data)} bytes): {exc}"
        ) from exc


def parse_upload(messages: Iterable[bytes]) -> list[SiteSummary | FeatureChunk]:
    """Wire messages of an upload -> domain messages (validated; see core.serde).

    Raises InvalidMessageError for bytes that do not parse, and core.serde's typed errors for
    messages that parse but are invalid.
    """
    return [
        upload_request_from_proto(_parse(pb.UploadFeaturesRequest, m, i))
        for i, m in enumerate(messages)
    ]


def receive_bank(messages: Sequence[bytes], *, max_rows: int) -> BankDelivery:
    """Parse and decode a BankChunk stream the way a site does (order, resends, bounds).

    Raises IncompleteUploadError for an empty stream or one without its last chunk,
    InvalidMessageError for bytes that do not parse, and the ChunkAssembler's errors.
    """
    if len(messages) == 0:
        raise IncompleteUploadError("the bank stream is empty: no BankChunk message arrived")
    assembler = ChunkAssembler(max_rows=max_rows)
    chunks = [bank_chunk_from_proto(_parse(pb.BankChunk, m, i)) for i, m in enumerate(messages)]
    for chunk in chunks:
        assembler.add(chunk)
    first = chunks[0]
    return BankDelivery(
        bank=assembler.result(),
        round=first.round,
        server_radius=first.server_coverage_radius,
        max_site_radius=first.max_site_coverage_radius,
    )


class CommunicationProtocol:
    """Simulated communication between server and clients, with exact wire bytes.

    The gRPC services (fedserver / fedclient) carry these same messages.
    All methods are static; ``codec`` defaults to :data:`core.codec.DEFAULT_CODEC` (fp16 +
    byte-shuffle + zstd).
    """

    @staticmethod
    def send_to_server(
        client_id: int | str,
        data: np.ndarray,
        *,
        round_number: int = 1,
        codec: CodecConfig | None = None,
        summary: SiteSummary | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> list[bytes]:
        """Simulate client sending data to server.

        Encodes ``data`` [n, D] float32 into the site's upload stream and returns the serialized
        ``UploadFeaturesRequest`` messages in send order: ``summary`` first when given, then the
        feature chunks. The server side reads them with :func:`parse_upload`.
        """
        chunks = split_into_chunks(
            np.asarray(data, dtype=np.float32),
            config=codec or DEFAULT_CODEC,
            site_id=str(client_id),
            round=round_number,
            max_chunk_bytes=max_chunk_bytes,
        )
        items: list[SiteSummary | FeatureChunk] = [] if summary is None else [summary]
        items.extend(chunks)
        return [upload_request_to_proto(item).SerializeToString() for item in items]

    @staticmethod
    def broadcast_to_clients(
        clients: Sequence[BankReceiver],
        data: np.ndarray,
        *,
        round_number: int = 1,
        codec: CodecConfig | None = None,
        server_radius: float = 0.0,
        max_site_radius: float = 0.0,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> list[bytes]:
        """Simulate server broadcasting to all clients.

        Serializes the bank ``data`` [k, D] once as ``BankChunk`` messages; every client parses
        and decodes those bytes (so it scores with exactly what the wire delivers, lossy codec
        included) and gets ``update_global_bank``. Returns the messages of one delivery; the
        broadcast costs ``len(clients)`` times their bytes.
        """
        bank = np.asarray(data, dtype=np.float32)
        messages = [
            bank_chunk_to_proto(chunk).SerializeToString()
            for chunk in split_bank_into_chunks(
                bank,
                config=codec or DEFAULT_CODEC,
                round=round_number,
                server_coverage_radius=server_radius,
                max_site_coverage_radius=max_site_radius,
                max_chunk_bytes=max_chunk_bytes,
            )
        ]
        for client in clients:
            delivery = receive_bank(messages, max_rows=bank.shape[0])
            client.update_global_bank(delivery.bank)
        return messages

    @staticmethod
    def compute_communication_cost(
        data: np.ndarray | torch.Tensor | bytes | Iterable[bytes | np.ndarray | torch.Tensor],
        *,
        codec: CodecConfig | None = None,
        client_id: int | str = 0,
        round_number: int = 1,
        summary: SiteSummary | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        wire: bool = False,
    ) -> int:
        """Exact cost in bytes of the serialized messages that carry ``data``.

        * An array or tensor [n, D] is costed as the upload messages that would carry it under
          ``codec`` (the chunks of :meth:`send_to_server` for ``client_id``, ``round_number``
          and ``max_chunk_bytes``, which are part of each message; ``summary`` first when
          given): the same bytes the round reports count.
        * Serialized messages (bytes, bytearray, memoryview) cost their length.
        * A list (any iterable) of these costs the sum of its items: a list of coresets is the
          sum of their uploads, a list of messages the sum of their lengths.

        With ``wire=True`` each message costs what it takes on the gRPC stream instead
        (:func:`wire_bytes`: + 5-byte gRPC prefix + 9-byte HTTP/2 DATA frame headers): the
        UploadFeatures call's bytes on the TCP stream to within its HEADERS, a few hundred
        bytes (benchmarks/wire.py and tests/test_bench_wire.py measure it through a counting
        proxy: within 1 %, in practice 0.01-0.04 %).

        Raises TypeError for anything else (str, dict, numbers, None, ...): it cannot be
        measured, and guessing (e.g. ``len()``, which is a row count for a list of arrays)
        would report a wrong number.
        """
        def cost(message: int) -> int:
            return wire_bytes(message) if wire else message

        if isinstance(data, bytes | bytearray | memoryview):
            return cost(memoryview(data).nbytes)
        if isinstance(data, np.ndarray | torch.Tensor):
            matrix = (  # any float tensor (bf16 included) goes as float32 features
                data.detach().to("cpu", torch.float32).numpy()
                if isinstance(data, torch.Tensor)
                else data
            )
            messages = CommunicationProtocol.send_to_server(
                client_id, matrix, codec=codec, round_number=round_number, summary=summary,
                max_chunk_bytes=max_chunk_bytes,
            )
            return sum(cost(len(m)) for m in messages)
        if isinstance(data, str | Mapping) or not isinstance(data, Iterable):
            raise TypeError(
                "compute_communication_cost measures a feature matrix (numpy array or torch "
                "tensor [n, D]), serialized messages (bytes), or a list of these; got "
                f"{type(data).__name__}"
            )
        total = 0
        for position, item in enumerate(data):
            if not isinstance(item, bytes | bytearray | memoryview | np.ndarray | torch.Tensor):
                raise TypeError(
                    "compute_communication_cost: item "
                    f"{position} of the {type(data).__name__} is a {type(item).__name__}; "
                    "items must be feature matrices (numpy array or torch tensor [n, D]) or "
                    "serialized messages (bytes)"
                )
            total += CommunicationProtocol.compute_communication_cost(
                item, codec=codec, client_id=client_id, round_number=round_number,
                max_chunk_bytes=max_chunk_bytes, wire=wire,
            )
        return total
