"""Reliability campaign, part 1: faults (issue 9).

Fast (every run): a connection cut mid-chunk by a proxy, a byte flipped in a chunk in flight, the
state directory's disk full and then read-only (a small tmpfs mounted here), and a site that
joins and never uploads (the round closes at its deadline with quorum, or fails clearly).
Full campaign (``pytest -m reliability``): the server process SIGKILLed during bank selection
and during a bank download, then restarted on the same state directory and port.

Figures (bytes re-sent by a resumed upload, faults survived) are printed with ``-s``.
"""

from __future__ import annotations

import functools
import logging
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedserver_testing import (
    ServerProcess,
    TestClient,
    make_config,
    reference_bank,
    site_rows,
    upload_messages,
)
from reliability_testing import FaultProxy

from core.bankdelta import bank_checksum
from core.messages import FeatureChunk
from core.serde import upload_request_to_proto
from fedclient.session import (
    ConnectionConfig,
    RetryPolicy,
    RoundClosedError,
    RoundFailedError,
    ServerUnavailableError,
    SiteSession,
)
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.auth import new_token, write_tokens_file
from fedserver.cli import main as fedserver_main
from fedserver.daemon import create_server
from fedserver.federation import Phase
from fedserver.journal import Journal, RecordKind

pytestmark = pytest.mark.reliability  # the campaign; full=True: only with -m reliability

CHUNK_BYTES = 1 << 14  # 128 rows of D=32 fp32 per chunk


def _session(port: int, site: str, token: str, attempts: int = 4) -> SiteSession:
    return SiteSession(
        ConnectionConfig(f"127.0.0.1:{port}", token=token, call_timeout_s=30), site,
        retry=RetryPolicy(max_attempts=attempts, initial_backoff_s=0.05, max_backoff_s=0.2),
        rng=random.Random(0),
    )


#: The bank the server must reproduce from ``data`` (site -> rows) uploaded in CHUNK_BYTES chunks.
_reference = functools.partial(reference_bank, max_chunk_bytes=CHUNK_BYTES)


class _Counting:
    """Counts what Federation.submit's futures resolved to for chunks (True: committed, False:
    identical resend)."""

    def __init__(self, server: object) -> None:
        federation = server.federation  # type: ignore[attr-defined]
        self.new = self.ignored = 0
        original = federation.submit

        def count(done: Future[bool]) -> None:
            if done.exception() is None:
                result = done.result()
                self.new, self.ignored = self.new + int(result), self.ignored + int(not result)

        def submit(*args: object) -> Future[bool]:
            future = original(*args)
            if isinstance(args[1], FeatureChunk):
                future.add_done_callback(count)
            return future

        federation.submit = submit


def _message_bytes(site: str, rows: np.ndarray) -> int:
    summary, chunks = upload_messages(site, rows, max_chunk_bytes=CHUNK_BYTES)
    return sum(upload_request_to_proto(i).ByteSize() for i in (summary, *chunks))


def test_connection_cut_mid_chunk_resumes_within_the_retry_bounds(tmp_path: Path) -> None:
    config, tokens = make_config(tmp_path, ("a", "b"), max_chunk_bytes=CHUNK_BYTES)
    server, port = create_server(config)
    server.start()
    counting = _Counting(server)
    proxy = FaultProxy(port)
    data = {"a": site_rows(1, 128 * 30), "b": site_rows(2, 128 * 30)}
    figures = []
    try:
        # Each site's link breaks once, at a fraction of its upload's bytes (plus an odd offset
        # so the cut lands inside a chunk's payload, not between messages).
        for site, cut_at in (("a", 0.35), ("b", 0.7)):
            total = _message_bytes(site, data[site])
            with _session(proxy.port, site, tokens[site]) as session:
                session.join()
                cuts = proxy.faults.cuts
                proxy.cut_after(int(total * cut_at) + 4321)
                summary, chunks = upload_messages(site, data[site], max_chunk_bytes=CHUNK_BYTES)
                result = session.upload(summary, chunks)
            assert proxy.faults.cuts == cuts + 1
            assert result.status.complete and result.attempts == 2
            resent = result.bytes_sent - total
            figures.append((site, cut_at, total, result.streams, result.extra_chunks, resent))
            # Only chunks that were in flight (handed to gRPC, not yet committed) went twice;
            # none the server had committed (it ignored none as a resend).
            assert counting.ignored == 0
            assert 0 <= resent <= result.extra_chunks * (CHUNK_BYTES + 200)
        assert counting.new == sum(
            len(upload_messages(s, data[s], max_chunk_bytes=CHUNK_BYTES)[1]) for s in data
        )
        with _session(port, "b", tokens["b"]) as session:
            session.wait_until_ready(1, timeout_s=60)
            bank = session.download_bank().bank
    finally:
        proxy.close()
        server.stop(0)
    np.testing.assert_array_equal(bank, _reference(data))
    for site, cut_at, total, streams, extra, resent in figures:
        print(f"\nsite {site}: cut at {cut_at:.0%} of {total} B: streams (start, chunks sent) "
              f"{streams}; {extra} chunk(s) / {resent} B re-sent ({resent / total:.1%})")


def test_byte_flipped_in_flight_is_data_loss_and_resent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, tokens = make_config(tmp_path, ("a", "b"), max_chunk_bytes=CHUNK_BYTES)
    server, port = create_server(config)
    server.start()
    proxy = FaultProxy(port)
    data = {"a": site_rows(3, 128 * 12), "b": site_rows(4, 200)}
    summary, chunks = upload_messages("a", data["a"], max_chunk_bytes=CHUNK_BYTES)
    target = chunks[5].features.payload
    proxy.flip_in(target[len(target) // 2 : len(target) // 2 + 24])  # inside chunk 5's frame
    try:
        with caplog.at_level(logging.WARNING, logger="fedserver.servicer"), _session(
            proxy.port, "a", tokens["a"]
        ) as session:
            result = session.upload(summary, chunks)
        assert proxy.faults.flips == 1
        assert result.status.complete and result.attempts == 2
        assert result.streams[1][0] == 5  # resumed at the damaged chunk
        refused = [r.getMessage() for r in caplog.records
                   if r.name == "fedserver.servicer" and "DATA_LOSS" in r.getMessage()]
        assert len(refused) == 1 and "xxh64 checksum mismatch" in refused[0]
        with _session(port, "b", tokens["b"]) as session:
            b_summary, b_chunks = upload_messages("b", data["b"], max_chunk_bytes=CHUNK_BYTES)
            session.upload(b_summary, b_chunks)
            session.wait_until_ready(1, timeout_s=60)
            bank = session.download_bank().bank
    finally:
        proxy.close()
        server.stop(0)
    np.testing.assert_array_equal(bank, _reference(data))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (we are root in this environment); skipped where mount is refused."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def test_disk_full_and_read_only_state_dir(
    tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, tokens = make_config(tmp_path, ("a", "b"), max_chunk_bytes=CHUNK_BYTES,
                                 state_dir=small_disk / "state")
    server, port = create_server(config)
    server.start()
    data = {"a": site_rows(5, 128 * 20), "b": site_rows(6, 300)}  # a: 320 KiB raw > the disk
    summary, chunks = upload_messages("a", data["a"], max_chunk_bytes=CHUNK_BYTES)
    try:
        with _session(port, "a", tokens["a"], attempts=3) as session, pytest.raises(
            ServerUnavailableError,
            match=r"could not store the message durably: \[Errno 28\] No space left on device",
        ) as error:
            session.upload(summary, chunks)
        assert error.value.code is grpc.StatusCode.UNAVAILABLE
        stuck = server.federation.progress("a")
        assert 0 < stuck.committed_sequence < len(chunks)
        assert TestClient(port, "b", tokens["b"]).join().config.round == 1  # still serving
        _remount(small_disk, "size=8m")  # space freed: the site's retry goes through
        with _session(port, "a", tokens["a"]) as session:
            result = session.upload(summary, chunks)
        assert result.committed_at_start == stuck.committed_sequence
        assert result.status.complete
    finally:
        server.stop(0)
    # A state directory that cannot be written (read-only file system): the server refuses to
    # start with a one-line reason, and the state is untouched for when it can.
    _remount(small_disk, "ro")
    try:
        with pytest.raises(OSError, match=r"\[Errno 30\] Read-only file system"):
            create_server(config)
        toml = tmp_path / "server.toml"
        toml.write_text(f'state_dir = "{config.state_dir}"\ntokens_file = "{config.tokens_file}"\n'
                        f'global_bank_size = 50\ncodec = "lossless"\nbind = "127.0.0.1:0"\n'
                        f"max_chunk_bytes = {CHUNK_BYTES}\n")
        assert fedserver_main(["serve", "--config", str(toml)]) == 1
        assert "fedserver: cannot start: [Errno 30] Read-only file system" in (
            capsys.readouterr().err
        )
    finally:
        _remount(small_disk, "rw")
    # Restart on the same state directory: the journal replays (no partial record was left in
    # it), a's upload is complete, b finishes, and the bank is the in-process one.
    server, port = create_server(config)
    server.start()
    try:
        assert server.federation.progress("a").complete
        b_summary, b_chunks = upload_messages("b", data["b"], max_chunk_bytes=CHUNK_BYTES)
        with _session(port, "b", tokens["b"]) as session:
            session.upload(b_summary, b_chunks)
            session.wait_until_ready(1, timeout_s=60)
            bank = session.download_bank().bank
    finally:
        server.stop(0)
    np.testing.assert_array_equal(bank, _reference(data))
    records = list(Journal(config.state_dir).records())
    chunk_records = [r for r in records if r.kind is RecordKind.CHUNK]
    assert len(chunk_records) == len(chunks) + len(b_chunks)  # each chunk journaled once


@pytest.mark.parametrize("quorum", [2, 3])
def test_a_site_that_joins_and_never_uploads(tmp_path: Path, quorum: int) -> None:
    now = [1_000_000.0]
    config, tokens = make_config(tmp_path, ("a", "b", "c"), quorum=quorum, round_timeout_s=60)
    server, port = create_server(config, clock=lambda: now[0])
    server.start()
    data = {"a": site_rows(7, 120), "b": site_rows(8, 90)}
    try:
        silent = _session(port, "c", tokens["c"])
        deadline = silent.join().config.deadline.seconds
        assert deadline == 1_000_060
        for site in data:
            with _session(port, site, tokens[site]) as session:
                summary, chunks = upload_messages(site, data[site], max_chunk_bytes=CHUNK_BYTES)
                session.upload(summary, chunks)
        time.sleep(0.5)
        assert server.federation.snapshot().phase is Phase.COLLECTING  # waits for c
        now[0] += 61  # c's deadline passes without a byte from it
        with _session(port, "a", tokens["a"]) as session:
            if quorum == 2:
                session.wait_until_ready(1, timeout_s=60)
                bank = session.download_bank().bank
                np.testing.assert_array_equal(bank, _reference(data))
            else:
                with pytest.raises(
                    RoundFailedError,
                    match=r"deadline passed with 2 complete upload\(s\), quorum is 3",
                ):
                    session.wait_until_ready(1, timeout_s=60)
        # c wakes up too late: refused with the round's state, not silently dropped.
        summary, chunks = upload_messages("c", site_rows(9, 60), max_chunk_bytes=CHUNK_BYTES)
        with pytest.raises(RoundClosedError, match=r"round 1 is (ready|failed): uploads are "
                                                   r"closed"):
            silent.upload(summary, chunks)
        silent.close()
    finally:
        server.stop(0)


# --- full campaign: the server process killed ---------------------------------------------


def _process_config(tmp_path: Path, sites: tuple[str, ...], k: int) -> tuple[Path, dict]:
    tokens = {site: new_token() for site in sites}
    write_tokens_file(tmp_path / "tokens", tokens)
    (tmp_path / "server.toml").write_text(
        f'state_dir = "{tmp_path / "state"}"\ntokens_file = "{tmp_path / "tokens"}"\n'
        f"global_bank_size = {k}\ncodec = \"lossless\"\nmax_chunk_bytes = {CHUNK_BYTES}\n"
        'device = "cpu"\n'
    )
    return tmp_path / "server.toml", tokens


@pytest.mark.timeout(900)  # process starts import torch: slow on a loaded machine
def test_server_killed_during_selection_selects_again_after_restart(tmp_path: Path) -> None:
    config, tokens = _process_config(tmp_path, ("a", "b", "c"), k=6000)
    server = ServerProcess("--config", str(config), "--bind", "127.0.0.1:0",
                           log_path=tmp_path / "server.log")
    data = {s: site_rows(10 + i, 12000, dim=128) for i, s in enumerate(("a", "b", "c"))}
    try:
        for site, rows in data.items():
            with _session(server.port, site, tokens[site]) as session:
                summary, chunks = upload_messages(site, rows, max_chunk_bytes=CHUNK_BYTES)
                session.upload(summary, chunks)
        with _session(server.port, "a", tokens["a"]) as session:
            first = next(iter(session.watch(1, timeout_s=60)))
        assert first.state == fpb.ROUND_STATE_SELECTING  # the last upload started selection
        server.kill()  # at once: selection of this size takes seconds, the kill milliseconds
        assert not any("round 1 ready" in line for line in server.drain())
        server = ServerProcess("--config", str(config), "--bind", "127.0.0.1:0",
                               log_path=tmp_path / "server2.log")
        with _session(server.port, "b", tokens["b"]) as session:
            session.wait_until_ready(1, timeout_s=120)
            bank = session.download_bank().bank
    finally:
        code = server.stop()
    assert code == 0
    np.testing.assert_array_equal(bank, _reference(data, k=6000))


@pytest.mark.timeout(900)  # process starts import torch: slow on a loaded machine
def test_server_killed_during_a_bank_download(tmp_path: Path) -> None:
    k, dim = 6000, 256  # a 6 MiB bank: more than gRPC's flow-control window and the buffers
    config, tokens = _process_config(tmp_path, ("a", "b"), k=k)
    server = ServerProcess("--config", str(config), "--bind", "127.0.0.1:0",
                           log_path=tmp_path / "server.log")
    port = server.port
    data = {s: site_rows(20 + i, k, dim=dim) for i, s in enumerate(("a", "b"))}
    proxy = FaultProxy(port)
    try:
        for site, rows in data.items():
            with _session(port, site, tokens[site]) as session:
                summary, chunks = upload_messages(site, rows, max_chunk_bytes=CHUNK_BYTES)
                session.upload(summary, chunks)
        with _session(port, "a", tokens["a"]) as session:
            session.wait_until_ready(1, timeout_s=120)
        proxy.limit_down(500_000)  # the bank takes ~12 s through the proxy
        outcome: dict[str, object] = {}
        session = SiteSession(
            ConnectionConfig(f"127.0.0.1:{proxy.port}", token=tokens["a"], call_timeout_s=60),
            "a", retry=RetryPolicy(max_attempts=8, initial_backoff_s=0.5, max_backoff_s=2),
            rng=random.Random(0),
        )
        thread = threading.Thread(target=lambda: outcome.update(result=session.download_bank()))
        thread.start()
        server.wait_for(r"site a downloads bank version 1")
        time.sleep(1.5)
        server.kill()  # mid-stream: the site holds part of the bank
        received_at_kill = proxy.faults.downstream_bytes
        bank_bytes = k * dim * 4
        assert 0 < received_at_kill < bank_bytes // 2, received_at_kill
        assert thread.is_alive()
        server = ServerProcess("--config", str(config), "--bind", f"127.0.0.1:{port}",
                               log_path=tmp_path / "server2.log")
        # The site's retry downloads again from the restarted server.
        server.wait_for(r"site a downloads bank version 1", timeout=120)
        thread.join(timeout=120)
        session.close()
        result = outcome["result"]
    finally:
        proxy.close()
        assert server.stop() == 0
    bank = result.bank  # type: ignore[attr-defined]
    reference = _reference(data, k=k)
    np.testing.assert_array_equal(bank, reference)
    assert bank_checksum(bank) == bank_checksum(reference)
    print(f"\nkilled mid-download after {received_at_kill} of ~{bank_bytes} B: "
          f"{proxy.faults.connections} connection(s) through the proxy, bank of "
          f"{bank.shape[0]} rows received whole after the restart")
