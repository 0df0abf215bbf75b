"""Tools of the reliability campaign (tests/test_reliability_*.py): a faulty TCP proxy, a
fedserver process, generated certificates, and the server's peak memory.

The proxy sits between a client and the server on loopback and injects network faults the
operating system would otherwise never produce on 127.0.0.1: a connection cut after a given
number of upstream bytes (mid-message), one byte flipped in flight (found by a marker taken from
a chunk's payload, so the flip lands inside that chunk's zstd frame), and a bandwidth limit on
the downstream direction (so a download is still running when the server is killed).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class _Faults:
    cut_after: int | None = None  # upstream bytes after which the first connection is cut
    flip_marker: bytes | None = None  # flip one byte inside the first occurrence of this
    down_rate: float | None = None  # downstream bytes per second, None: unlimited
    cuts: int = 0
    flips: int = 0
    upstream_bytes: int = 0
    downstream_bytes: int = 0
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultProxy:
    """A TCP proxy 127.0.0.1:port -> 127.0.0.1:target_port that injects one fault at a time.

    ``cut_after(n)``: the connection carrying upstream byte n is reset (RST) at that byte,
    once; later connections pass through. ``flip_in(marker)``: the byte in the middle of the
    first upstream occurrence of ``marker`` is inverted, once (the proxy holds back
    len(marker) - 1 bytes so a marker split across reads is still found). ``limit_down(rate)``:
    server -> client bytes are paced to ``rate`` bytes per second.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.faults = _Faults()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def cut_after(self, upstream_bytes: int) -> None:
        with self.faults.lock:
            self.faults.cut_after = self.faults.upstream_bytes + upstream_bytes

    def flip_in(self, marker: bytes) -> None:
        with self.faults.lock:
            self.faults.flip_marker = marker

    def limit_down(self, bytes_per_s: float | None) -> None:
        self.faults.down_rate = bytes_per_s

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in list(self._sockets):
            _close(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                # Small kernel buffers on both legs: what the proxy has not forwarded stays
                # with the sender (a download is then really in progress when the server dies).
                server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
                server.settimeout(5)
                server.connect(("127.0.0.1", self.target_port))
                server.settimeout(None)
            except OSError:
                _close(client, reset=True)
                continue
            self.faults.connections += 1
            self._sockets += [client, server]
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, source: socket.socket, sink: socket.socket) -> None:
        pending = b""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    if pending:
                        sink.sendall(self._count(pending)[0])
                    sink.shutdown(socket.SHUT_WR)
                    return
                pending = self._flip(pending + data)
                keep = self._hold_back()
                out, pending = (pending[:-keep], pending[-keep:]) if keep else (pending, b"")
                out, cut = self._count(out)
                if out:
                    sink.sendall(out)
                if cut:
                    _close(source, reset=True)
                    _close(sink, reset=True)
                    return
        except OSError:
            _close(source, reset=True)
            _close(sink, reset=True)

    def _hold_back(self) -> int:
        marker = self.faults.flip_marker
        return len(marker) - 1 if marker is not None and self.faults.flips == 0 else 0

    def _flip(self, data: bytes) -> bytes:
        """Invert the middle byte of the first occurrence of the armed marker, once."""
        faults = self.faults
        with faults.lock:
            marker = faults.flip_marker
            if marker is None or faults.flips:
                return data
            at = data.find(marker)
            if at < 0:
                return data
            middle = at + len(marker) // 2
            faults.flips += 1
            return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]

    def _count(self, data: bytes) -> tuple[bytes, bool]:
        """Count forwarded upstream bytes; (bytes to forward, cut the connection after them)."""
        faults = self.faults
        with faults.lock:
            start = faults.upstream_bytes
            faults.upstream_bytes += len(data)
            if faults.cut_after is not None and faults.upstream_bytes >= faults.cut_after:
                keep = faults.cut_after - start
                faults.cut_after = None
                faults.cuts += 1
                faults.upstream_bytes = start + keep
                return data[:keep], True
        return data, False

    def _down(self, source: socket.socket, sink: socket.socket) -> None:
        started, sent = time.monotonic(), 0
        try:
            while True:
                data = source.recv(16384)
                if not data:  # the server went away: so does the client's connection
                    _close(source, reset=True)
                    _close(sink, reset=True)
                    return
                self.faults.downstream_bytes += len(data)
                rate = self.faults.down_rate
                if rate:
                    sent += len(data)
                    wait = started + sent / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                sink.sendall(data)
        except OSError:
            _close(source, reset=True)
            _close(sink, reset=True)


def _close(sock: socket.socket, *, reset: bool = False) -> None:
    try:
        if reset:  # SO_LINGER 0: close sends RST, as a dropped network path or a killed peer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path, clients: Sequence[str]) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost, and one client certificate per name
    (CN = the name, SAN = DNS:name), all generated here with the openssl CLI (2-day validity)."""
    directory.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=reliability-ca", cwd=directory)
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"),
                      *((c, f"DNS:{c}") for c in clients)):
        (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                f"{name}.ext", cwd=directory)
    return directory


def peak_rss_bytes(pid: int | None = None) -> int:
    """VmHWM (peak resident set) of a process, bytes (Linux /proc)."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, "no VmHWM in /proc/PID/status"
    return int(match.group(1)) * 1024


def current_rss_bytes(pid: int | None = None) -> int:
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, "no VmRSS in /proc/PID/status"
    return int(match.group(1)) * 1024
