"""A minimal test client of FederationService on the generated stub, and data helpers.

Not the product client (fedclient is): just enough to drive the daemon in tests and
benchmarks: join, upload (optionally from a sequence position), query, download (full or delta),
watch.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from core.bankdelta import apply_delta
from core.codec import CODEC_PRESETS, CodecConfig, decode_matrix
from core.federated.aggregator import GlobalBankAggregator
from core.messages import FeatureChunk, SiteSummary
from core.serde import (
    ChunkAssembler,
    bank_chunk_from_proto,
    split_into_chunks,
    upload_request_to_proto,
)
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedpatchcore.v1 import federation_pb2_grpc as fgrpc
from fedserver.auth import new_token, write_tokens_file
from fedserver.config import ServerConfig
from fedserver.federation import Federation, Phase, RoundSnapshot
from fedserver.journal import Journal

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = "ab" * 32
MESSAGE_LIMIT = 8 << 20


def make_config(tmp_path: Path, sites: Sequence[str], **overrides: object) -> tuple[
    ServerConfig, dict[str, str]
]:
    """A ServerConfig on 127.0.0.1:0 with fresh tokens for ``sites``; returns the tokens too."""
    tokens = {site: new_token() for site in sites}
    tmp_path.mkdir(parents=True, exist_ok=True)
    tokens_file = tmp_path / "tokens"
    write_tokens_file(tokens_file, tokens)
    values: dict[str, object] = {
        "state_dir": tmp_path / "state",
        "tokens_file": tokens_file,
        "bind": "127.0.0.1:0",
        "global_bank_size": 50,
        "device": "cpu",
        "codec": "lossless",
        "fsync": True,
    }
    values.update(overrides)
    return ServerConfig(**values), tokens  # type: ignore[arg-type]


def site_rows(seed: int, rows: int, dim: int = 32) -> np.ndarray:
    """Seeded [rows, dim] float32 features, offset per seed so sites differ."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, dim)) + seed % 5).astype(np.float32)


def upload_messages(
    site: str,
    rows: np.ndarray,
    *,
    round_number: int = 1,
    codec: CodecConfig = CODEC_PRESETS["lossless"],
    max_chunk_bytes: int = 1 << 14,
    fingerprint: str = FINGERPRINT,
) -> tuple[SiteSummary, list[FeatureChunk]]:
    summary = SiteSummary(
        site_id=site, round=round_number, num_images=4, num_patches=max(rows.shape[0], 1) * 2,
        coreset_rows=rows.shape[0], coverage_radius=0.25, feature_dim=rows.shape[1],
        backbone="resnet18", layers=("layer2", "layer3"), codec=codec,
        feature_fingerprint=fingerprint,
    )
    chunks = list(split_into_chunks(
        rows, config=codec, site_id=site, round=round_number, max_chunk_bytes=max_chunk_bytes
    ))
    return summary, chunks


def aggregate(
    uploads: Mapping[str, tuple[SiteSummary, Sequence[FeatureChunk]]],
    k: int = 50,
    *,
    device: str = "cpu",
) -> np.ndarray:
    """The bank a GlobalBankAggregator (seed 0) selects from these uploads, fed in process site
    by site in sorted order: what a server given the same uploads must reproduce."""
    aggregator = GlobalBankAggregator(k, seed=0, device=device)
    aggregator.begin_round(1)
    for site in sorted(uploads):
        summary, chunks = uploads[site]
        aggregator.receive_summary(summary)
        for chunk in chunks:
            aggregator.receive_chunk(chunk)
    return aggregator.finish_round().bank


def reference_bank(
    data: Mapping[str, np.ndarray],
    k: int = 50,
    *,
    max_chunk_bytes: int = 1 << 14,
    device: str = "cpu",
) -> np.ndarray:
    """:func:`aggregate` of each site's rows ``data[site]`` as :func:`upload_messages` sends
    them (lossless, chunks of ``max_chunk_bytes``)."""
    uploads = {s: upload_messages(s, rows, max_chunk_bytes=max_chunk_bytes)
               for s, rows in data.items()}
    return aggregate(uploads, k, device=device)


def round_failed_below_quorum(tmp_path: Path) -> tuple[ServerConfig, Federation, RoundSnapshot]:
    """A federation of sites a and b (quorum 2, deadline 5 s on a fake clock) in which only a
    uploads before the deadline passes. Returns the config, the still-open federation and
    round 1's snapshot once it is READY or FAILED (it should be FAILED)."""
    now = [0.0]
    config, _ = make_config(tmp_path, ["a", "b"], round_timeout_s=5.0)
    federation = Federation(config, Journal(config.state_dir), ("a", "b"), clock=lambda: now[0])
    federation.start()
    summary, chunks = upload_messages("a", site_rows(0, 60))
    for item in (summary, *chunks):
        federation.receive("a", item, upload_request_to_proto(item).SerializeToString())
    now[0] = 10.0
    return config, federation, federation.wait_for(1, {Phase.READY, Phase.FAILED}, timeout=30)


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", MESSAGE_LIMIT),
            ("grpc.max_send_message_length", MESSAGE_LIMIT),
        ],
    )


@dataclass
class Downloaded:
    version: int
    bank: np.ndarray
    header: fpb.BankHeader


class TestClient:
    """One site's calls, with its token in the metadata."""

    __test__ = False  # not a pytest class

    def __init__(self, port: int, site: str, token: str) -> None:
        self.site = site
        self.channel = channel(port)
        self.stub = fgrpc.FederationServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def close(self) -> None:
        self.channel.close()

    def join(self, fingerprint: str = "") -> fpb.JoinRoundResponse:
        return self.stub.JoinRound(
            fpb.JoinRoundRequest(site_id=self.site, feature_fingerprint=fingerprint),
            metadata=self.metadata, timeout=30,
        )

    def upload(
        self, items: Sequence[SiteSummary | FeatureChunk], timeout: float = 60
    ) -> fpb.UploadFeaturesResponse:
        requests: Iterator[pb.UploadFeaturesRequest] = (
            upload_request_to_proto(item) for item in items
        )
        return self.stub.UploadFeatures(requests, metadata=self.metadata, timeout=timeout)

    def status(self, round_number: int = 0) -> fpb.UploadStatus:
        return self.stub.QueryUploadStatus(
            fpb.QueryUploadStatusRequest(site_id=self.site, round=round_number),
            metadata=self.metadata, timeout=30,
        ).upload

    def watch_until_done(self, round_number: int = 0, timeout: float = 120) -> list[
        fpb.RoundStatus
    ]:
        return list(self.stub.WatchRound(
            fpb.WatchRoundRequest(site_id=self.site, round=round_number, min_interval_ms=50),
            metadata=self.metadata, timeout=timeout,
        ))

    def download(self, have: Downloaded | None = None, version: int = 0) -> Downloaded:
        """Download the bank (a delta against ``have``), rebuild it, check the checksum."""
        responses = list(self.stub.DownloadBank(
            fpb.DownloadBankRequest(
                site_id=self.site, version=version,
                have_version=0 if have is None else have.version,
            ),
            metadata=self.metadata, timeout=60,
        ))
        assert responses[0].WhichOneof("body") == "header"
        header = responses[0].header
        removed = [i for r in responses if r.WhichOneof("body") == "removed"
                   for i in r.removed.indices]
        assembler = ChunkAssembler(max_rows=header.rows_in_stream, expected_cols=None)
        for response in responses:
            if response.WhichOneof("body") == "chunk":
                assembler.add(bank_chunk_from_proto(response.chunk))
        rows = assembler.result()
        if header.base_version:
            assert have is not None and header.base_version == have.version
            bank = apply_delta(have.bank, np.array(removed, dtype=np.int64), rows)
        else:
            bank = rows
        assert bank.shape == (header.total_rows, header.feature_dim)
        return Downloaded(header.version, bank, header)


def decoded(chunks: Sequence[FeatureChunk]) -> np.ndarray:
    return np.concatenate(
        [decode_matrix(c.features, max_decoded_bytes=1 << 24) for c in chunks], axis=0
    )


class ServerProcess:
    """``python -m fedserver serve ARGS`` as a child process, its stderr log collected (the
    port is read from it; also appended to ``log_path`` when given)."""

    def __init__(self, *args: str, log_path: Path | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), str(ROOT / "protos"), env.get("PYTHONPATH", "")]
        )
        env["OMP_NUM_THREADS"] = "1"
        self.log_path = log_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedserver", "serve", *args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.wait_for(r"listening on port (\d+)").group(1))

    def _read(self) -> None:
        assert self.process.stderr is not None
        with contextlib.ExitStack() as stack:
            log = (stack.enter_context(open(self.log_path, "a", encoding="utf-8"))
                   if self.log_path is not None else None)
            for line in self.process.stderr:
                if log is not None:
                    log.write(line)
                    log.flush()
                self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no server log line matching {pattern!r} in {timeout} s; log: {self.log[-20:]}"
                ) from None
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def drain(self) -> list[str]:
        """Every log line so far (after the process ended: all of them)."""
        time.sleep(0.2)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return self.log

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` (if still running), wait for the exit code, collect the last lines."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        code = self.process.wait(timeout=60)
        self.drain()
        return code
