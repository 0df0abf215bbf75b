"""End to end with real processes: ``fedserver serve`` and ``fedclient run`` on 127.0.0.1:0.

Small on purpose (resnet18 with random weights, D=128, 64 px, 12 images per site, 4 KiB chunks
so an upload is a dozen chunks): every process start imports torch, which dominates the time.

* three sites, one of them SIGKILLed mid-upload and restarted: it resumes from the server's
  committed position, sends no chunk the server had committed, and every site ends with the
  bank ``core.federated`` computes in-process on the same data;
* a server SIGKILLed mid-round and restarted from its state directory loses no acknowledged
  chunk, and the site whose upload it broke finishes;
* a wrong token, a wrong site, a wrong dimension and a corrupted chunk each get their status
  code while another site's upload goes on.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from core.codec import DEFAULT_CODEC
from core.data import AutoVIDataset
from core.federated import FederatedPatchCore
from core.messages import SiteSummary
from core.serde import split_into_chunks
from fedclient.demo import ServerProcess, SiteProcess, start_site, write_server_config
from fedclient.session import (
    AuthenticationError,
    ConnectionConfig,
    PermissionDeniedError,
    RejectedError,
    RetryPolicy,
    SiteSession,
)
from fedclient.site import BANK_FILE
from tests.conftest import SMALL_FEATURES

pytestmark = pytest.mark.slow

EXTRACTOR = {
    "backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False,
    "pretrain_embed_dim": 128, "target_embed_dim": 128, "patch_size": 3, "resize": 64,
    "crop": 0, "init_seed": 0,
}
BANK_SIZE = 300
CORESET = 0.25
CHUNK_BYTES = 4096  # fp16, D=128: 16 rows a chunk; a 192-row coreset is 12 chunks
PROCESS_TIMEOUT_S = 240


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env["OMP_NUM_THREADS"] = "1"  # several processes share 2 cores
    return env


def _site_args(*extra: str) -> list[str]:
    # The server pins EXTRACTOR; the site names its backbone and weights too, because it checks
    # their weights before it contacts the server (the default would be pretrained WRN-50).
    # --validation-share 0: the in-process reference fits on every training image, so the sites
    # must not hold any back for calibration here (the bank is what this test compares).
    return ["--coreset-percentage", str(CORESET), "--retries", "12", "--timeout", "120",
            "--backbone", "resnet18", "--no-pretrained", "--validation-share", "0", *extra]


def _session(address: str, fed: Path, site: str, **kwargs) -> SiteSession:
    token = (fed / "site-tokens" / f"{site}.token").read_text().strip()
    return SiteSession(
        ConnectionConfig(address, token=kwargs.pop("token", token), call_timeout_s=30),
        kwargs.pop("site_id", site),
        retry=kwargs.pop("retry", RetryPolicy(max_attempts=1)),
        rng=random.Random(0),
    )


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = PROCESS_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _finish(site: SiteProcess) -> dict:
    code = site.process.wait(PROCESS_TIMEOUT_S)
    assert code == 0, site.log_path.read_text()[-3000:]
    return json.loads((site.out_dir / "metrics.json").read_text())


def _bank(site: SiteProcess) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(site.out_dir / BANK_FILE))["memory_bank"]


def _committed(address: str, fed: Path, site: str) -> tuple[int, bool]:
    with _session(address, fed, site) as session:
        status = session.upload_status()
    return int(status.committed_sequence), bool(status.complete)


@pytest.fixture(scope="module")
def categories(synthetic_root: Path) -> list[str]:
    return sorted(AutoVIDataset(synthetic_root, split="train").categories)


def test_three_sites_with_a_killed_client_get_the_in_process_bank(
    synthetic_root: Path, categories: list[str], tmp_path: Path
) -> None:
    sites = ["a", "b", "c"]
    fed = tmp_path / "fed"
    config = write_server_config(
        fed, sites, global_bank_size=BANK_SIZE, extractor=EXTRACTOR,
        max_chunk_bytes=CHUNK_BYTES, env=_env(),
    )
    server = ServerProcess(config, tmp_path / "server.log", env=_env())
    try:
        token = {s: fed / "site-tokens" / f"{s}.token" for s in sites}
        procs = {
            s: start_site(
                server.address, s, token[s], synthetic_root, tmp_path / f"out-{s}",
                categories=[cat], env=_env(),
                # c uploads slowly (~1 chunk/s) so it can be killed half-way.
                extra_args=_site_args(*(["--max-upload-rate", "3000"] if s == "c" else [])),
            )
            for s, cat in zip(sites, categories, strict=True)
        }
        _wait(lambda: _committed(server.address, fed, "c")[0] >= 3, "site c to commit 3 chunks")
        procs["c"].process.kill()  # SIGKILL: no goodbye, the stream just breaks
        procs["c"].process.wait()
        committed_at_kill, complete = _committed(server.address, fed, "c")
        assert not complete
        procs["c"] = start_site(
            server.address, "c", token["c"], synthetic_root, tmp_path / "out-c2",
            categories=[categories[2]], env=_env(), extra_args=_site_args(),
        )
        metrics = {s: _finish(p) for s, p in procs.items()}
    finally:
        assert server.stop() == 0  # SIGTERM: drains and exits cleanly
    resumed = metrics["c"]["rounds"][0]
    total = resumed["chunks_total"]
    assert total >= 10
    assert resumed["chunks_committed_at_start"] == committed_at_kill
    # The restarted site sends exactly the chunks the server had not committed.
    assert resumed["chunks_sent"] == total - committed_at_kill
    assert resumed["upload_streams"] == 1
    print(f"\nresume: killed after {committed_at_kill}/{total} chunks committed; the restarted "
          f"site sent {resumed['chunks_sent']} chunk(s), {resumed['bytes_up']} B")

    reference = FederatedPatchCore(
        num_clients=3, backbone=replace(SMALL_FEATURES), global_bank_size=BANK_SIZE,
        coreset_percentage=CORESET, seed=0,
    )
    reference.setup_clients(
        [AutoVIDataset(synthetic_root, [cat], split="train") for cat in categories]
    )
    reference.train(num_rounds=1)
    expected = reference.global_bank
    for site, proc in procs.items():
        bank = _bank(proc)
        assert bank.shape == expected.shape, site
        np.testing.assert_array_equal(bank, expected, err_msg=f"site {site}")
    assert len({m["feature_fingerprint"] for m in metrics.values()}) == 1
    assert all(m["test"]["image_auroc"] is not None for m in metrics.values())
    assert all((p.out_dir / "overlays").is_dir() for p in procs.values())


def test_bad_requests_and_a_server_crash_while_a_site_uploads(
    synthetic_root: Path, categories: list[str], tmp_path: Path
) -> None:
    fed = tmp_path / "fed"
    config = write_server_config(
        fed, ["a", "x"], global_bank_size=BANK_SIZE, extractor=EXTRACTOR,
        max_chunk_bytes=CHUNK_BYTES, env=_env(),
    )
    server = ServerProcess(config, tmp_path / "server.log", env=_env())
    address = server.address
    port = server.port
    site_a = start_site(
        address, "a", fed / "site-tokens" / "a.token", synthetic_root, tmp_path / "out-a",
        categories=[categories[0]], env=_env(), extra_args=_site_args("--max-upload-rate", "3000"),
    )
    try:
        _wait(lambda: _committed(address, fed, "a")[0] >= 1, "site a's upload to start")
        fingerprint = replace(SMALL_FEATURES).fingerprint()
        rows = np.random.default_rng(0).random((40, 128), dtype=np.float32)

        def summary(dim: int) -> SiteSummary:
            return SiteSummary(
                site_id="x", round=1, num_images=4, num_patches=400, coreset_rows=40,
                coverage_radius=0.5, feature_dim=dim, backbone="resnet18",
                layers=("layer2", "layer3"), codec=DEFAULT_CODEC,
                feature_fingerprint=fingerprint,
            )

        def chunks(matrix: np.ndarray) -> list:
            return list(split_into_chunks(matrix, config=DEFAULT_CODEC, site_id="x", round=1,
                                          max_chunk_bytes=CHUNK_BYTES))

        with _session(address, fed, "x", token="not-a-token") as s, pytest.raises(
            AuthenticationError
        ) as error:
            s.join()
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        with _session(address, fed, "x", site_id="a") as s, pytest.raises(
            PermissionDeniedError
        ) as error:
            s.upload_status()  # x's token asking about site a
        assert error.value.code == grpc.StatusCode.PERMISSION_DENIED
        with _session(address, fed, "x") as s, pytest.raises(RejectedError) as error:
            s.upload(summary(64), chunks(rows[:, :64]))
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        good = chunks(rows)
        first = good[0]
        payload = bytearray(first.features.payload)
        payload[len(payload) // 2] ^= 0xFF
        corrupted = replace(first, features=replace(first.features, payload=bytes(payload)))
        with _session(address, fed, "x") as s, pytest.raises(RejectedError) as error:
            s.upload(summary(128), [corrupted, *good[1:]])
        assert error.value.code == grpc.StatusCode.DATA_LOSS
        with _session(address, fed, "x") as s:
            assert s.upload_status().committed_sequence == 0  # nothing of it was kept
            assert s.upload(summary(128), good).status.complete  # x's real upload

        # a's upload went on meanwhile; now crash the server in the middle of it.
        _wait(lambda: _committed(address, fed, "a")[0] >= 3, "site a to commit 3 chunks")
        acknowledged = _committed(address, fed, "a")[0]
        assert site_a.process.poll() is None
        server.kill()
        # Same state directory, same port: site a's retries find the server again.
        server = ServerProcess(config, tmp_path / "server2.log", env=_env(),
                               extra_args=["--bind", f"127.0.0.1:{port}"])
        assert server.port == port
        after, _ = _committed(address, fed, "a")
        assert after >= acknowledged  # no acknowledged chunk was lost
        x_done, x_complete = _committed(address, fed, "x")
        assert x_complete and x_done == len(good)
        metrics = _finish(site_a)
    finally:
        server.stop()
    record = metrics["rounds"][0]
    assert record["upload_streams"] >= 2  # the crash broke a stream; it resumed
    # The bank holds a's and x's rows (fewer than k together): x's upload was kept too.
    assert metrics["bank_version"] == 1
    assert metrics["bank_rows"] == min(BANK_SIZE, record["rows_up"] + rows.shape[0])
    print(f"\nserver crash: {acknowledged} chunk(s) acknowledged before SIGKILL, {after} "
          f"committed after restart; site a sent {record['chunks_sent']} chunk(s) of "
          f"{record['chunks_total']} over {record['upload_streams']} stream(s)")
