"""fedserver at federation scale: what waiting costs, who can lock whom out, what an ack means.

Each test here failed on the thread-per-stream server this replaced: a flood of token-exempt
streams or 48 waiting sites exhausted its 32 workers; one site's summary could reserve the whole
buffer; a SIGTERM ended every site's wait for the bank; two servers shared a state directory; and
every durability test passed with ``os.fsync`` replaced by a no-op.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedserver_testing import (
    FINGERPRINT,
    ROOT,
    ServerProcess,
    TestClient,
    aggregate,
    channel,
    make_config,
    site_rows,
    upload_messages,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from core.codec import ChecksumMismatchError
from core.serde import upload_request_to_proto
from fedclient.session import ConnectionConfig, RetryPolicy, SiteSession
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.auth import new_token, write_tokens_file
from fedserver.config import ConfigError
from fedserver.daemon import create_server
from fedserver.federation import Federation, Phase
from fedserver.journal import MAGIC, Journal, RecordKind, StateDirLock, StateDirLockedError

CHUNK_BYTES = 32 * 4 * 25  # 25 rows of D=32 per chunk


def _session(port: int, site: str, token: str, **retry: float) -> SiteSession:
    return SiteSession(
        ConnectionConfig(f"127.0.0.1:{port}", token=token, call_timeout_s=60), site,
        retry=RetryPolicy(**{"max_attempts": 6, "initial_backoff_s": 0.1,
                             "max_backoff_s": 0.5, **retry}),
        rng=random.Random(0),
    )


def _site_round(port: int, site: str, token: str, rows: np.ndarray,
                results: dict[str, object]) -> None:
    """One site's whole round through the product client; its bank (or error) in results."""
    try:
        with _session(port, site, token) as session:
            session.join(FINGERPRINT)
            summary, chunks = upload_messages(site, rows, max_chunk_bytes=CHUNK_BYTES)
            session.upload(summary, chunks)
            session.wait_until_ready(1, timeout_s=120)
            results[site] = session.download_bank().bank
    except Exception as error:  # reported by the test, with the site
        results[site] = error


def _run_sites(port: int, tokens: dict[str, str], data: dict[str, np.ndarray]
               ) -> dict[str, object]:
    results: dict[str, object] = {}
    threads = [threading.Thread(target=_site_round, args=(port, s, tokens[s], rows, results))
               for s, rows in data.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a site is stuck"
    return results


def _reference(data: dict[str, np.ndarray], k: int) -> np.ndarray:
    uploads = {s: upload_messages(s, rows, max_chunk_bytes=CHUNK_BYTES) for s, rows in data.items()}
    return aggregate(uploads, k)


def test_a_flood_of_token_exempt_streams_locks_no_site_out(tmp_path: Path) -> None:
    """64 health Watch and reflection streams from a client without a token, held open while 4
    sites complete a round: the sites finish, health Check keeps answering SERVING, and the
    flood beyond the exempt budget is refused (RESOURCE_EXHAUSTED), not queued."""
    sites = ["a", "b", "c", "d"]
    config, tokens = make_config(tmp_path, sites)
    server, port = create_server(config)
    server.start()
    flood = channel(port)
    release = threading.Event()

    def blocked_requests():  # a reflection stream that sends nothing until released
        release.wait(60)
        yield from ()

    calls = []
    try:
        health = health_pb2_grpc.HealthStub(flood)
        reflection = reflection_pb2_grpc.ServerReflectionStub(flood)
        for i in range(64):
            if i % 2:
                calls.append(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60))
            else:
                calls.append(reflection.ServerReflectionInfo(blocked_requests(), timeout=60))
        time.sleep(1.0)  # every stream has reached the server
        data = {s: site_rows(i, 100) for i, s in enumerate(sites)}
        results = _run_sites(port, tokens, data)
        check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        refused = [c for c in calls if c.done() and c.code() is grpc.StatusCode.RESOURCE_EXHAUSTED]
        open_streams = [c for c in calls if not c.done()]
    finally:
        release.set()
        for call in calls:
            call.cancel()
        flood.close()
        server.stop(0)
    reference = _reference(data, 50)
    for site in sites:
        assert isinstance(results[site], np.ndarray), results[site]
        np.testing.assert_array_equal(results[site], reference)
    # One peer address: max_exempt_streams_per_peer (8) stay open, the other 56 are refused.
    assert len(open_streams) == config.max_exempt_streams_per_peer
    assert len(refused) == 64 - config.max_exempt_streams_per_peer
    assert "concurrency limit" in (refused[0].details() or "")


def test_48_sites_through_the_product_client_against_a_default_server(tmp_path: Path) -> None:
    """48 sites join, upload, wait for the bank and download it at once, each over its own
    channel with fedclient's SiteSession, against a server with default limits; the bank
    equals the in-process aggregator's for the same uploads."""
    sites = [f"s{i:02d}" for i in range(48)]
    config, tokens = make_config(tmp_path, sites, global_bank_size=200, fsync=True)
    server, port = create_server(config)
    server.start()
    data = {s: site_rows(i, 30) for i, s in enumerate(sites)}
    try:
        results = _run_sites(port, tokens, data)
        report = server.federation.round_report(1)
    finally:
        server.stop(0)
    errors = {s: r for s, r in results.items() if not isinstance(r, np.ndarray)}
    assert not errors, errors
    reference = _reference(data, 200)
    for site in sites:
        np.testing.assert_array_equal(results[site], reference)
    assert report["totals"]["downloads"] == 48


def test_a_site_announcing_more_than_its_share_is_refused_while_the_others_finish(
    tmp_path: Path,
) -> None:
    """buffer_rows = 1,000 over 4 sites: each may reserve 250 rows. A site announcing 400 gets
    RESOURCE_EXHAUSTED naming its share; the others complete; it then sends within its share
    and the round closes. A configured limit above the share is refused at start."""
    sites = ["a", "b", "c", "greedy"]
    config, tokens = make_config(tmp_path / "limits", sites, buffer_rows=1000)
    other = Journal(tmp_path / "other")
    with pytest.raises(ConfigError, match="exceeds a site's share"):
        Federation(dataclasses.replace(config, max_rows_per_site=400), other, sites)
    other.close()
    server, port = create_server(config)
    server.start()
    clients = {s: TestClient(port, s, tokens[s]) for s in sites}
    try:
        assert clients["a"].join().config.max_rows_per_site == 250
        greedy_summary, _ = upload_messages("greedy", site_rows(9, 400),
                                            max_chunk_bytes=CHUNK_BYTES)
        with pytest.raises(grpc.RpcError) as refused:
            clients["greedy"].upload([greedy_summary])
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "its share of the server's selection buffer, 250 rows" in refused.value.details()
        for i, site in enumerate(sites[:3]):
            summary, chunks = upload_messages(site, site_rows(i, 250), max_chunk_bytes=CHUNK_BYTES)
            assert clients[site].upload([summary, *chunks]).upload.complete
        summary, chunks = upload_messages("greedy", site_rows(9, 250), max_chunk_bytes=CHUNK_BYTES)
        assert clients["greedy"].upload([summary, *chunks]).upload.complete
        assert server.federation.wait_for(1, {Phase.READY}, timeout=60).bank_rows == 50
    finally:
        for client in clients.values():
            client.close()
        server.stop(0)


def _process_config(tmp_path: Path, sites: tuple[str, ...]) -> tuple[Path, dict[str, str]]:
    tokens = {s: new_token() for s in sites}
    write_tokens_file(tmp_path / "tokens", tokens)
    path = tmp_path / "server.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\ntokens_file = "{tmp_path / "tokens"}"\n'
        f'global_bank_size = 50\ncodec = "lossless"\nmax_chunk_bytes = {CHUNK_BYTES}\n'
        'device = "cpu"\n'
    )
    return path, tokens


@pytest.mark.timeout(600)  # two server processes start (each imports torch)
def test_a_site_waiting_for_the_bank_survives_a_server_restart(tmp_path: Path) -> None:
    """Site a uploads and waits; the server is stopped with SIGTERM and started again on the
    same port; then b uploads. a's wait reconnects, re-watches and ends with the bank."""
    config, tokens = _process_config(tmp_path, ("a", "b"))
    server = ServerProcess("--config", str(config), "--bind", "127.0.0.1:0",
                           log_path=tmp_path / "server.log")
    port = server.port
    data = {"a": site_rows(0, 100), "b": site_rows(1, 100)}
    outcome: dict[str, object] = {}

    def site_a() -> None:
        try:
            with _session(port, "a", tokens["a"], max_backoff_s=1.0) as session:
                summary, chunks = upload_messages("a", data["a"], max_chunk_bytes=CHUNK_BYTES)
                session.upload(summary, chunks)
                outcome["watching"] = True
                session.wait_until_ready(1, timeout_s=300)
                outcome["bank"] = session.download_bank().bank
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=site_a)
    try:
        thread.start()
        server.wait_for(r"site a upload complete")
        time.sleep(1.0)  # a is watching round 1 now
        assert server.stop() == 0  # SIGTERM: drains, ends the watch
        assert thread.is_alive() and "error" not in outcome, outcome
        server = ServerProcess("--config", str(config), "--bind", f"127.0.0.1:{port}",
                               log_path=tmp_path / "server2.log")
        with _session(port, "b", tokens["b"]) as session:
            summary, chunks = upload_messages("b", data["b"], max_chunk_bytes=CHUNK_BYTES)
            session.upload(summary, chunks)
        thread.join(timeout=240)
    finally:
        code = server.stop()
    assert code == 0
    assert "error" not in outcome, outcome
    np.testing.assert_array_equal(outcome["bank"], _reference(data, 50))


@pytest.mark.timeout(300)
def test_a_second_server_on_a_held_state_directory_exits_with_one_line(tmp_path: Path) -> None:
    config, _ = _process_config(tmp_path, ("a",))
    first = ServerProcess("--config", str(config), "--bind", "127.0.0.1:0",
                          log_path=tmp_path / "server.log")
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "protos")])}
        second = subprocess.run(
            [sys.executable, "-m", "fedserver", "serve", "--config", str(config), "--bind",
             "127.0.0.1:0", "--log-level", "ERROR"],
            capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
        )
    finally:
        assert first.stop() == 0
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"in use by another fedserver (pid {first.process.pid})" in lines[0]
    # Released when the first server stopped; taken again, it names this process.
    with StateDirLock(tmp_path / "state"), pytest.raises(StateDirLockedError,
                                                         match=f"pid {os.getpid()}"):
        StateDirLock(tmp_path / "state")


def _events_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """Record every os.fsync (with what it synced: the journal, or a directory) in order."""
    events: list[tuple[str, object]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", "journal" if target.endswith("journal.log")
                       else ("dir" if os.path.isdir(target) else target)))

    monkeypatch.setattr(os, "fsync", fsync)
    return events


def test_a_chunk_is_acknowledged_only_after_the_fsync_that_covers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of events around each ack: the record is written, the journal is fsync'ed,
    then the committed position moves and the submit future resolves. The directory holding
    the new journal was fsync'ed before the first ack. A no-op fsync fails this test."""
    events = _events_spy(monkeypatch)
    config, _ = make_config(tmp_path, ["a", "b"])
    journal = Journal(config.state_dir)
    real_write = journal._write_all
    monkeypatch.setattr(journal, "_write_all",
                        lambda data: (events.append(("write", len(data))), real_write(data)))
    federation = Federation(config, journal, ("a", "b"))
    summary, chunks = upload_messages("a", site_rows(0, 100), max_chunk_bytes=CHUNK_BYTES)
    futures: list[Future[bool]] = []
    for item in (summary, *chunks):
        future = federation.submit("a", item, upload_request_to_proto(item).SerializeToString())
        future.add_done_callback(lambda f: events.append(
            ("ack", federation.progress("a").committed_sequence)))
        futures.append(future)
    assert all(f.result(timeout=30) for f in futures)
    federation.close()
    acks = [i for i, (kind, _) in enumerate(events) if kind == "ack"]
    assert len(acks) == len(futures)
    assert ("fsync", "dir") in events[: acks[0]]  # the journal's directory entry is durable
    for index in acks:
        before = events[:index]
        last_write = max(i for i, (kind, _) in enumerate(before) if kind == "write")
        assert ("fsync", "journal") in before[last_write:], events[: index + 1]
    assert [events[i][1] for i in acks] == [0, *range(1, len(chunks) + 1)]


def test_one_fsync_covers_several_sites_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: while the journal syncs, other sites' chunks queue up and the next sync
    covers them all, so a slow disk costs one fsync per batch, not per chunk."""
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.02)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    sites = ["a", "b", "c", "d"]
    config, _ = make_config(tmp_path, sites)
    journal = Journal(config.state_dir)
    federation = Federation(config, journal, sites)
    messages = {s: upload_messages(s, site_rows(i, 200), max_chunk_bytes=CHUNK_BYTES)
                for i, s in enumerate(sites)}
    batches_before = journal.batches
    futures: list[Future[bool]] = []

    def upload(site: str) -> None:
        summary, chunks = messages[site]
        for item in (summary, *chunks):
            futures.append(federation.submit(site, item,
                                             upload_request_to_proto(item).SerializeToString()))

    threads = [threading.Thread(target=upload, args=(s,)) for s in sites]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(f.result(timeout=60) for f in futures)
    records = len(futures)
    batches = journal.batches - batches_before
    federation.close()
    assert records == 4 * (1 + len(messages["a"][1]))
    assert batches < records / 2, (batches, records)


@pytest.mark.parametrize("tail", ["zeros", "partial header then zeros"])
def test_a_torn_zero_filled_tail_is_cut_at_start(tmp_path: Path, tail: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A crash between write and fsync can leave zeros (unwritten extents) or a partly written
    header followed by zeros after the last durable record: nothing there was acknowledged, so
    the journal starts, cuts it and says so."""
    journal = Journal(tmp_path)
    for i in range(3):
        journal.append(RecordKind.CHUNK, bytes([i + 1]) * 100)
    journal.close()
    path = tmp_path / "journal.log"
    size = path.stat().st_size
    garbage = bytes(4096) if tail == "zeros" else b"\x64\x00\x00\x00\x03\x9a" + bytes(4090)
    with open(path, "ab") as handle:
        handle.write(garbage)
    records = list(Journal(tmp_path).records())
    assert [r.payload[0] for r in records] == [1, 2, 3]
    assert path.stat().st_size == size
    assert "cutting off a torn last record" in caplog.text
    # Nonzero bytes after the damage are not a tail: acknowledged data may follow.
    with open(path, "ab") as handle:
        handle.write(bytes(100) + b"\x01" + bytes(50))
    from fedserver.journal import JournalCorruptError
    with pytest.raises(JournalCorruptError):
        Journal(tmp_path)
    assert path.read_bytes()[: len(MAGIC)] == MAGIC


def test_a_resent_chunk_with_other_bytes_but_the_same_checksum_is_data_loss(
    tmp_path: Path,
) -> None:
    config, _ = make_config(tmp_path, ["a", "b"])
    federation = Federation(config, Journal(config.state_dir), ("a", "b"))
    summary, chunks = upload_messages("a", site_rows(0, 100), max_chunk_bytes=CHUNK_BYTES)
    for item in (summary, chunks[0]):
        assert federation.receive("a", item, upload_request_to_proto(item).SerializeToString())
    proto = upload_request_to_proto(chunks[0])
    payload = bytearray(proto.chunk.features.payload)
    payload[len(payload) // 2] ^= 0x01  # same declared fields and checksum, other bytes
    proto.chunk.features.payload = bytes(payload)
    from core.serde import upload_request_from_proto
    tampered = upload_request_from_proto(proto)
    with pytest.raises(ChecksumMismatchError):
        federation.receive("a", tampered, proto.SerializeToString())
    # The identical resend is still ignored, and nothing was lost.
    assert not federation.receive("a", chunks[0],
                                  upload_request_to_proto(chunks[0]).SerializeToString())
    assert federation.progress("a").committed_sequence == 1
    federation.close()


def test_waiting_sites_hold_no_thread(tmp_path: Path) -> None:
    """100 WatchRound streams of waiting sites: the server process gains no thread per stream
    (asyncio: a waiting rpc is a parked coroutine)."""
    sites = [f"s{i:03d}" for i in range(100)]
    config, tokens = make_config(tmp_path, sites)
    server, port = create_server(config)
    server.start()
    threads_before = threading.active_count()
    ch = channel(port)
    calls = []
    try:
        from fedpatchcore.v1 import federation_pb2_grpc as fgrpc
        stub = fgrpc.FederationServiceStub(ch)
        for site in sites:
            calls.append(stub.WatchRound(
                fpb.WatchRoundRequest(site_id=site, round=1, min_interval_ms=50),
                metadata=(("authorization", f"Bearer {tokens[site]}"),), timeout=60))
        for call in calls:
            assert next(call).state == fpb.ROUND_STATE_COLLECTING  # every watch is open
        grown = threading.active_count() - threads_before
    finally:
        for call in calls:
            call.cancel()
        ch.close()
        server.stop(0)
    assert grown < 10, grown  # the client's channel threads, not one per stream
