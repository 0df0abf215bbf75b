"""Reliability campaign, part 4: load (issue 9).

Sites stream their uploads at once on loopback; every loop is bounded (timeouts on every call
and every join), so a deadlock fails the test instead of hanging it. Checked: every upload is
accounted for (each site's committed rows, each chunk journaled exactly once, the bank selected
from all of them), and a deliberately slow site (a trickling link, holding its stream open the
whole time) does not delay the others' acknowledgements: they all complete while it is still
sending, and the server's time to commit one of their chunks stays that of an unloaded server.

The full run (``pytest -m reliability``) has 32 sites against a ``fedserver`` process and
checks the server's peak resident memory (VmHWM) against the bound

    peak <= idle + 2 x buffer + 3 x bank + streams x (2 x max_message_bytes + 2 x max_chunk_bytes)

idle: the server's RSS after start (interpreter, torch, grpc); buffer: the rows the aggregator
holds, rows_total x D x 4 bytes (float32), twice for the copy selection makes; bank: k x D x 4,
three times (the selected bank, its stable-ordered copy, the codec round trip that measures
r_S's codec error); the in-flight window: per concurrent stream, one received message and its
parsed copy (max_message_bytes each) plus the decoded chunk and its float32 rows. CI runs a
12-site version in process (no RSS figure: the clients share the process).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from fedserver_testing import ServerProcess, aggregate, make_config, site_rows, upload_messages
from reliability_testing import current_rss_bytes, peak_rss_bytes

from core.codec import CODEC_PRESETS
from core.messages import FeatureChunk, SiteSummary
from fedclient.session import ConnectionConfig, RetryPolicy, SiteSession, UploadResult
from fedserver.auth import new_token, write_tokens_file
from fedserver.config import DEFAULT_MAX_MESSAGE_BYTES
from fedserver.daemon import create_server
from fedserver.federation import Phase
from fedserver.journal import Journal, RecordKind

pytestmark = pytest.mark.reliability  # the campaign; full=True: only with -m reliability

CODEC = CODEC_PRESETS["fp16"]
CHUNK_BYTES = 1 << 14


def _uploads(sites: Sequence[str], rows: int, dim: int) -> dict[
    str, tuple[SiteSummary, list[FeatureChunk]]
]:
    return {
        site: upload_messages(site, site_rows(100 + i, rows, dim=dim), codec=CODEC,
                              max_chunk_bytes=CHUNK_BYTES)
        for i, site in enumerate(sites)
    }


def _run_sites(
    port: int, tokens: dict[str, str], uploads: dict[str, tuple[SiteSummary, list[FeatureChunk]]],
    slow: str, slow_rate: float, timeout_s: float,
) -> tuple[dict[str, UploadResult], dict[str, float], list[str]]:
    """Upload every site at once (one thread and channel each); returns results, the time each
    finished (monotonic), and the errors (empty when all went well)."""
    results: dict[str, UploadResult] = {}
    finished: dict[str, float] = {}
    errors: list[str] = []
    start = threading.Barrier(len(uploads))

    def run(site: str) -> None:
        try:
            with SiteSession(
                ConnectionConfig(f"127.0.0.1:{port}", token=tokens[site], call_timeout_s=timeout_s),
                site, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.1),
                rng=random.Random(0),
                max_upload_bytes_per_s=slow_rate if site == slow else None,
            ) as session:
                start.wait(timeout=60)
                summary, chunks = uploads[site]
                results[site] = session.upload(summary, chunks)
                finished[site] = time.monotonic()
        except Exception as error:  # reported by the test, with the site
            errors.append(f"{site}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=run, args=(s,), name=f"site-{s}") for s in uploads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s + 60)
    assert not any(t.is_alive() for t in threads), "a site is stuck: deadlock or lost ack"
    return results, finished, errors


def _check_accounted(state_dir: Path, uploads: dict, results: dict) -> int:
    for site, (summary, chunks) in uploads.items():
        status = results[site].status
        assert status.complete and status.committed_rows == summary.coreset_rows, site
        assert status.committed_sequence == len(chunks), site
    journal = Journal(state_dir, fsync=False)
    keys = [
        (r.payload, r.kind) for r in journal.records() if r.kind is RecordKind.CHUNK
    ]
    journal.close()
    expected = sum(len(chunks) for _, chunks in uploads.values())
    assert len(keys) == expected == len(set(keys))  # each chunk journaled exactly once
    return expected




class _CommitTimer:
    """Per site, the wall time from each Federation.submit call to its message being durable
    and counted (checks + decode + waiting for the journal's group commit)."""

    def __init__(self, federation: object) -> None:
        self.samples: list[tuple[str, float, float]] = []  # (site, start, seconds)
        original = federation.submit  # type: ignore[attr-defined]

        def submit(site: str, item: object, raw: bytes) -> Future[bool]:
            began = time.monotonic()
            future = original(site, item, raw)
            future.add_done_callback(
                lambda _: self.samples.append((site, began, time.monotonic() - began)))
            return future

        federation.submit = submit  # type: ignore[attr-defined]


def test_sites_at_once_with_a_slow_one_in_process(tmp_path: Path) -> None:
    """CI subset: 12 sites at once, one trickling; the others finish first, all accounted."""
    sites = [f"s{i:02d}" for i in range(12)]
    slow = sites[0]
    config, tokens = make_config(tmp_path, sites, codec="fp16", max_chunk_bytes=CHUNK_BYTES,
                                 global_bank_size=300)
    uploads = _uploads(sites, rows=600, dim=64)  # 10 chunks of 60 rows per site
    server, port = create_server(config)
    timer = _CommitTimer(server.federation)
    server.start()
    try:
        slow_bytes = sum(c.features.decoded_size for c in uploads[slow][1])
        results, finished, errors = _run_sites(port, tokens, uploads, slow,
                                               slow_rate=slow_bytes / 6.0, timeout_s=120)
        assert not errors, errors
        assert server.federation.wait_for(1, {Phase.READY}, timeout=60).bank_rows == 300
    finally:
        server.stop(0)
    fast = [s for s in sites if s != slow]
    assert max(finished[s] for s in fast) < finished[slow]  # nobody waited for the slow site
    assert results[slow].seconds >= 5.0  # it really was slow (about 6 s by its throttle)
    total = _check_accounted(config.state_dir, uploads, results)
    commit = [seconds for site, _, seconds in timer.samples if site != slow]
    print(f"\n12 sites: {total} chunks, fast sites done in "
          f"{max(results[s].seconds for s in fast):.2f} s, slow site {results[slow].seconds:.2f} s;"
          f" commit time per message median {statistics.median(commit) * 1e3:.1f} ms, "
          f"max {max(commit) * 1e3:.1f} ms")


@pytest.mark.reliability(full=True)
@pytest.mark.timeout(900)
def test_32_sites_against_a_server_process(tmp_path: Path) -> None:
    sites = [f"s{i:02d}" for i in range(32)]
    slow = sites[0]
    rows, dim, k, max_workers = 1500, 128, 2000, 40
    tokens = {site: new_token() for site in sites}
    write_tokens_file(tmp_path / "tokens", tokens)
    (tmp_path / "server.toml").write_text(
        f'state_dir = "{tmp_path / "state"}"\ntokens_file = "{tmp_path / "tokens"}"\n'
        f'global_bank_size = {k}\ncodec = "fp16"\nmax_chunk_bytes = {CHUNK_BYTES}\n'
        f'device = "cpu"\nmax_workers = {max_workers}\n'
    )
    uploads = _uploads(sites, rows=rows, dim=dim)
    server = ServerProcess("--config", str(tmp_path / "server.toml"), "--bind", "127.0.0.1:0",
                           log_path=tmp_path / "server.log")
    pid = server.process.pid
    try:
        time.sleep(1.0)
        idle = current_rss_bytes(pid)
        slow_bytes = sum(c.features.decoded_size for c in uploads[slow][1])
        results, finished, errors = _run_sites(server.port, tokens, uploads, slow,
                                               slow_rate=slow_bytes / 20.0, timeout_s=300)
        assert not errors, errors
        with SiteSession(ConnectionConfig(f"127.0.0.1:{server.port}", token=tokens[sites[1]]),
                         sites[1]) as session:
            session.wait_until_ready(1, timeout_s=300)
            bank = session.download_bank().bank
        peak = peak_rss_bytes(pid)
    finally:
        assert server.stop() == 0
    fast = [s for s in sites if s != slow]
    assert max(finished[s] for s in fast) < finished[slow]
    total_chunks = _check_accounted(tmp_path / "state", uploads, results)
    np.testing.assert_array_equal(bank, aggregate(uploads, k))
    buffer = len(sites) * rows * dim * 4
    bank_bytes = k * dim * 4
    window = max_workers * (2 * DEFAULT_MAX_MESSAGE_BYTES + 2 * CHUNK_BYTES)
    bound = idle + 2 * buffer + 3 * bank_bytes + window
    fast_seconds = sorted(results[s].seconds for s in fast)
    mib = 1 << 20
    print(f"\n32 sites ({total_chunks} chunks, {len(sites) * rows} rows of D={dim}): peak RSS "
          f"{peak / mib:.0f} MiB (idle {idle / mib:.0f} MiB) <= bound {bound / mib:.0f} MiB = "
          f"idle + 2 x {buffer / mib:.1f} (buffer) + 3 x {bank_bytes / mib:.1f} (bank) + "
          f"{window / mib:.0f} (window); fast sites' uploads median "
          f"{statistics.median(fast_seconds):.2f} s, max {fast_seconds[-1]:.2f} s; slow site "
          f"{results[slow].seconds:.2f} s")
    assert peak <= bound
