"""Count every byte on a TCP stream: a loopback forwarding proxy, plus the kernel's own counters.

:class:`CountingProxy` listens on 127.0.0.1 (port 0: the kernel picks one) and forwards each
accepted connection to ``target``, one thread per direction. It counts the bytes it relays each
way (``up``: client -> server, ``down``: server -> client), all of them: HTTP/2 preface, SETTINGS,
HEADERS, DATA, WINDOW_UPDATE, PING frames and gRPC's length prefixes (and TLS records when the
stream is encrypted; the proxy relays bytes, it never parses them).

The cross-check: just before it closes a connection, the proxy reads ``TCP_INFO`` of both of its
sockets (the struct ``ss -tin`` prints: bytes_received, bytes_sent, bytes_retrans) and keeps the
kernel's numbers beside its own. :func:`tcp_info_bytes` parses that struct;
:func:`ss_counters` reads the same counters through ``ss`` (the test checks both agree on a live
socket). The proxy's counts and the kernel's must be equal byte for byte; a difference means
the proxy lost or invented bytes.

The proxy costs throughput (every byte crosses user space twice), so wall times are measured
without it (REFERENCE.md): the benchmarks run each setting once through the proxy for bytes and
once directly for time.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Final

logger = logging.getLogger(__name__)

__all__ = [
    "ConnectionCount",
    "CountingProxy",
    "KernelCount",
    "TcpCounter",
    "ss_counters",
    "tcp_info_bytes",
]

# struct tcp_info (include/uapi/linux/tcp.h): u64 tcpi_bytes_received at byte 128, u64
# tcpi_bytes_sent at 200 and tcpi_bytes_retrans at 208 (Linux >= 4.19). 232 bytes cover them.
_TCP_INFO_LEN: Final[int] = 232
_BYTES_RECEIVED_AT: Final[int] = 128
_BYTES_SENT_AT: Final[int] = 200
_BYTES_RETRANS_AT: Final[int] = 208
_BUFFER: Final[int] = 1 << 20
_SS_COUNTERS: Final[re.Pattern[str]] = re.compile(
    r"\b(bytes_sent|bytes_received|bytes_retrans|bytes_acked):(\d+)"
)


def _ss_established(socket_filter: str) -> list[tuple[str, dict[str, int]]]:
    """(peer address, byte counters) of each established socket ``ss -tin`` lists for the
    filter expression (e.g. ``sport = :50051``)."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( {socket_filter} )"],
        capture_output=True, text=True, check=True,
    ).stdout
    # Each socket is a header line (Recv-Q Send-Q Local Peer) and an indented info line.
    lines = out.splitlines()
    return [
        (header.split()[-1], {k: int(v) for k, v in _SS_COUNTERS.findall(info)})
        for header, info in zip(lines[::2], lines[1::2], strict=False)
    ]


@dataclass(frozen=True)
class KernelCount:
    """TCP_INFO byte counters of one socket: bytes the kernel received, and sent (bytes_sent
    minus retransmissions, i.e. each byte once). A received FIN counts one byte in
    tcpi_bytes_received (it takes a sequence number); :class:`CountingProxy` subtracts it."""

    received: int
    sent: int


def tcp_info_bytes(sock: socket.socket) -> KernelCount:
    """The kernel's byte counters of ``sock`` (a connected TCP socket), from TCP_INFO.

    Raises OSError when the kernel's struct is too short to hold them (Linux < 4.19).
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(info) < _TCP_INFO_LEN:
        raise OSError(
            f"TCP_INFO returned {len(info)} bytes; bytes_sent needs {_TCP_INFO_LEN} (Linux >= 4.19)"
        )
    (received,) = struct.unpack_from("<Q", info, _BYTES_RECEIVED_AT)
    sent, retrans = struct.unpack_from("<QQ", info, _BYTES_SENT_AT)
    assert _BYTES_RETRANS_AT == _BYTES_SENT_AT + 8
    return KernelCount(received=received, sent=sent - retrans)


def ss_counters(local_port: int, peer_port: int) -> KernelCount | None:
    """The same counters as ``ss -tin`` prints them for the established socket
    127.0.0.1:local_port <-> :peer_port (None when ss lists no such socket)."""
    sockets = _ss_established(f"sport = :{local_port} and dport = :{peer_port}")
    if not sockets:
        return None
    counters = sockets[0][1]
    return KernelCount(
        received=counters.get("bytes_received", 0),
        sent=counters.get("bytes_sent", 0) - counters.get("bytes_retrans", 0),
    )


@dataclass(frozen=True)
class ConnectionCount:
    """One relayed connection. up / down: bytes the proxy relayed client -> server and
    server -> client. kernel_up / kernel_down: the same directions from TCP_INFO: up = what
    the client-facing socket received = what the server-facing socket sent; down likewise."""

    up: int
    down: int
    kernel_client_side: KernelCount
    kernel_server_side: KernelCount

    @property
    def kernel_agrees(self) -> bool:
        """Both of the proxy's sockets saw exactly the bytes the proxy counted."""
        c, s = self.kernel_client_side, self.kernel_server_side
        return (c.received, s.sent, s.received, c.sent) == (self.up, self.up, self.down, self.down)


class CountingProxy:
    """A loopback TCP relay to ``target`` that counts bytes each way (see the module doc).

    Use as a context manager; :meth:`close` stops accepting and waits up to ``drain_s`` for the
    open connections to end (their peers closing them) before closing what is left.
    Thread-safe: :meth:`totals` may be read while connections are open (a live snapshot).
    """

    def __init__(self, target: tuple[str, int], *, drain_s: float = 30.0) -> None:
        self.target = target
        self.drain_s = drain_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._up = 0
        self._down = 0
        self._closed: list[ConnectionCount] = []
        self._per_connection: list[list[int]] = []  # [up, down] per accepted connection
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="proxy-accept")
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def totals(self) -> tuple[int, int]:
        """(up, down) bytes relayed so far over all connections."""
        with self._lock:
            return self._up, self._down

    def per_connection(self) -> list[tuple[int, int]]:
        """(up, down) bytes of every connection accepted so far, open or ended, in accept
        order (a live snapshot; short-lived HTTP connections are all here)."""
        with self._lock:
            return [(up, down) for up, down in self._per_connection]

    @property
    def connections(self) -> list[ConnectionCount]:
        """Counts of the connections that have ended, in the order they ended."""
        with self._lock:
            return list(self._closed)

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(self.drain_s)
        with self._lock:
            leftover = list(self._open)
        for sock in leftover:  # peers that never closed: cut them (their counts are lost)
            logger.warning("proxy: closing a connection its peers left open")
            sock.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target)
        except OSError as error:
            logger.warning("proxy: cannot reach %s:%s: %s", *self.target, error)
            client.close()
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        counts = [0, 0]
        with self._lock:
            self._open.update((client, server))
            self._per_connection.append(counts)
        eof = [False, False]
        up = threading.Thread(target=self._pump, args=(client, server, counts, eof, 0),
                              daemon=True)
        up.start()
        self._pump(server, client, counts, eof, 1)
        up.join()
        try:
            on_client, on_server = tcp_info_bytes(client), tcp_info_bytes(server)
            record = ConnectionCount(
                up=counts[0], down=counts[1],
                # minus the FIN each socket received (it counts one in bytes_received)
                kernel_client_side=KernelCount(on_client.received - eof[0], on_client.sent),
                kernel_server_side=KernelCount(on_server.received - eof[1], on_server.sent),
            )
        finally:
            with self._lock:
                self._open.difference_update((client, server))
            client.close()
            server.close()
        with self._lock:
            self._closed.append(record)
        if not record.kernel_agrees:
            logger.error("proxy counts %s disagree with the kernel's", record)

    def _pump(self, source: socket.socket, sink: socket.socket, counts: list[int],
              eof: list[bool], direction: int) -> None:
        """Relay source -> sink until EOF, then half-close sink (the peer sees EOF too)."""
        buffer = bytearray(_BUFFER)
        view = memoryview(buffer)
        try:
            while True:
                n = source.recv_into(buffer)
                if n == 0:
                    eof[direction] = True
                    break
                sink.sendall(view[:n])
                with self._lock:
                    counts[direction] += n
                    if direction == 0:
                        self._up += n
                    else:
                        self._down += n
        except OSError as error:  # a reset: count what got through, end both directions
            logger.debug("proxy: connection ended by %s", error)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class TcpCounter:
    """Samples TCP_INFO byte counters of the established connections on a server port."""

    def __init__(self, port: int, interval_s: float = 0.05) -> None:
        self.port = port
        self.interval_s = interval_s
        self.up: dict[str, int] = {}  # peer -> bytes the server received
        self.down: dict[str, int] = {}  # peer -> bytes the server sent and got acked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and take one last sample (the connections still open now); calling
        it again only samples again."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self.sample()

    def sample(self) -> None:
        """Read the counters of the port's established connections once (kept: the largest
        value seen per peer, so closed connections keep their last sample)."""
        for peer, counters in _ss_established(f"sport = :{self.port}"):
            self.up[peer] = max(self.up.get(peer, 0), counters.get("bytes_received", 0))
            self.down[peer] = max(self.down.get(peer, 0), counters.get("bytes_acked", 0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)
