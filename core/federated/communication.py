"""Communication between sites and server, in process, with the real wire messages.

Every transfer is carried as the serialized protobuf messages the gRPC services exchange
(``fedpatchcore.v1.UploadFeaturesRequest`` up, ``fedpatchcore.v1.BankChunk`` down), built by the
same codec and chunking code, so the byte counts are exact rather than ``array.nbytes``
estimates. They count the serialized messages; on a real connection gRPC adds a 5-byte length
prefix per message and HTTP/2 adds 9 bytes per data frame (at most 16 KiB each by default), about
0.06 % more by that arithmetic. Measured on the real daemon's TCP streams
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

__all__ = [
    "BankDelivery",
    "BankReceiver",
    "CommunicationProtocol",
    "parse_upload",
    "receive_bank",
]

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
    ) -> int:
        """Exact cost in bytes of the serialized messages that carry ``data``.

        * An array or tensor [n, D] is costed as the upload messages that would carry it under
          ``codec`` (the chunks of :meth:`send_to_server` for ``client_id`` and
          ``round_number``, which are part of each message; no summary): the same bytes the
          round reports count.
        * Serialized messages (bytes, bytearray, memoryview) cost their length.
        * A list (any iterable) of these costs the sum of its items: a list of coresets is the
          sum of their uploads, a list of messages the sum of their lengths.

        Raises TypeError for anything else (str, dict, numbers, None, ...): it cannot be
        measured, and guessing (e.g. ``len()``, which is a row count for a list of arrays)
        would report a wrong number.
        """
        if isinstance(data, bytes | bytearray | memoryview):
            return memoryview(data).nbytes
        if isinstance(data, np.ndarray | torch.Tensor):
            matrix = (  # any float tensor (bf16 included) goes as float32 features
                data.detach().to("cpu", torch.float32).numpy()
                if isinstance(data, torch.Tensor)
                else data
            )
            messages = CommunicationProtocol.send_to_server(
                client_id, matrix, codec=codec, round_number=round_number
            )
            return sum(len(m) for m in messages)
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
                item, codec=codec, client_id=client_id, round_number=round_number
            )
        return total
