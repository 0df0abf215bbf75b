"""fedclient.session against a scripted server on 127.0.0.1:0: resume, bounded retries, delta
download, status-code mapping, and the CLI's one-line errors."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from core.codec import DEFAULT_CODEC
from core.messages import SiteSummary
from core.serde import split_into_chunks
from fedclient import cli
from fedclient.session import (
    AuthenticationError,
    ConnectionConfig,
    FingerprintMismatchError,
    PermissionDeniedError,
    RejectedError,
    RetryPolicy,
    RoundFailedError,
    ServerUnavailableError,
    SiteSession,
)
from fedpatchcore.v1 import federation_pb2 as fpb
from tests import fake_federation
from tests.fake_federation import FakeFederation, start

D = 32
FINGERPRINT = "ab" * 32


@pytest.fixture
def federation() -> Iterator[tuple[FakeFederation, int]]:
    servicer = FakeFederation({"tok-a": "site-a", "tok-b": "site-b"})
    server, port = start(servicer)
    yield servicer, port
    server.stop(grace=None)


def _session(port: int, token: str = "tok-a", site: str = "site-a", **kwargs) -> SiteSession:
    sleeps: list[float] = []
    session = SiteSession(
        ConnectionConfig(f"127.0.0.1:{port}", token=token, call_timeout_s=10),
        site,
        retry=kwargs.pop("retry", RetryPolicy(max_attempts=4, initial_backoff_s=0.01)),
        rng=random.Random(7),
        sleep=sleeps.append,
        **kwargs,
    )
    session.sleeps = sleeps  # type: ignore[attr-defined]
    return session


def _upload_of(rows: int, site: str = "site-a") -> tuple[np.ndarray, SiteSummary, list]:
    features = np.random.default_rng(0).random((rows, D), dtype=np.float32)
    summary = SiteSummary(
        site_id=site, round=1, num_images=3, num_patches=rows * 4, coreset_rows=rows,
        coverage_radius=0.5, feature_dim=D, backbone="resnet18", layers=("layer2",),
        codec=DEFAULT_CODEC, feature_fingerprint=FINGERPRINT,
    )
    # 4096-byte fp16 chunks of D=32: 64 rows each.
    chunks = list(split_into_chunks(features, config=DEFAULT_CODEC, site_id=site, round=1,
                                    max_chunk_bytes=4096))
    return features, summary, chunks


def test_upload_sends_every_chunk_once(federation) -> None:
    servicer, port = federation
    features, summary, chunks = _upload_of(640)
    assert len(chunks) == 10
    with _session(port) as session:
        result = session.upload(summary, chunks)
    upload = servicer.uploads["site-a"]
    assert result.status.complete and result.chunks_sent == 10 and result.attempts == 1
    assert upload.arrivals == list(range(10))
    np.testing.assert_allclose(upload.assembler.result(), features, rtol=1e-3, atol=1e-4)
    assert result.bytes_sent > sum(c.features.decoded_size for c in chunks) // 4  # counted


def test_upload_deadline_grows_with_the_bytes_to_send(federation) -> None:
    """A stream slower than call_timeout_s but faster than min_upload_bytes_per_s completes in
    one attempt; with the floor above the actual rate the same stream is cut and retried."""
    servicer, port = federation
    _, summary, chunks = _upload_of(640)
    total = sum(c.features.decoded_size for c in chunks)  # >= the encoded bytes (fp16 + zstd)
    rate = total / 1.5  # the throttled stream takes up to ~1.5 s, three times call_timeout_s

    def session(floor: float) -> SiteSession:
        return SiteSession(
            ConnectionConfig(f"127.0.0.1:{port}", token="tok-a", call_timeout_s=0.5,
                             min_upload_bytes_per_s=floor),
            "site-a", retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01),
            rng=random.Random(7), max_upload_bytes_per_s=rate,
        )

    with session(floor=rate / 2) as slow_but_allowed:
        result = slow_but_allowed.upload(summary, chunks)
    assert result.status.complete and result.attempts == 1
    servicer.uploads.clear()
    with session(floor=rate * 100) as too_slow, pytest.raises(ServerUnavailableError):
        too_slow.upload(summary, chunks)  # deadline ~0.5 s: every attempt is cut


def test_broken_stream_resumes_from_the_committed_position(federation) -> None:
    servicer, port = federation
    _, summary, chunks = _upload_of(640)
    servicer.break_after = 3  # the server commits chunks 0..2, then the connection drops
    with _session(port) as session:
        result = session.upload(summary, chunks)
        sleeps = session.sleeps  # type: ignore[attr-defined]
    arrivals = servicer.uploads["site-a"].arrivals
    assert result.status.complete and result.attempts == 2
    # The second stream starts where the server's durable copy ends and sends only the rest;
    # the first may have handed gRPC a few chunks beyond the break (flow-control window).
    (first_start, first_sent), (second_start, second_sent) = result.streams
    assert first_start == 0 and first_sent >= 3
    assert second_start == 3 and second_sent == 7
    assert sorted(set(arrivals)) == list(range(10)) and arrivals[-7:] == list(range(3, 10))
    assert result.extra_chunks == first_sent - 3
    assert len(sleeps) == 1 and 0.005 <= sleeps[0] <= 0.01  # jittered first backoff


def test_restarted_site_learns_the_position_from_the_server(federation) -> None:
    servicer, port = federation
    _, summary, chunks = _upload_of(640)
    servicer.break_after = 4
    with _session(port, retry=RetryPolicy(max_attempts=1)) as first, pytest.raises(
        ServerUnavailableError
    ):
        first.upload(summary, chunks)  # gives up at once: like a site killed mid-upload
    with _session(port) as restarted:  # a new session knows nothing of the first one
        result = restarted.upload(summary, chunks)
    assert result.committed_at_start == 4
    assert result.chunks_sent == 6 and result.extra_chunks == 0
    assert servicer.uploads["site-a"].arrivals.count(4) == 1


def test_retries_are_bounded(federation) -> None:
    servicer, port = federation
    servicer.fail_next = [grpc.StatusCode.UNAVAILABLE] * 10
    with _session(port) as session, pytest.raises(ServerUnavailableError, match="cannot reach"):
        session.join()
    assert len(session.sleeps) == 3  # type: ignore[attr-defined]  # 4 attempts, 3 waits
    assert len(servicer.fail_next) == 6
    backoffs = session.sleeps  # type: ignore[attr-defined]
    assert all(b2 > b1 for b1, b2 in itertools.pairwise(backoffs))


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=5.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(1)
    waits = [policy.backoff(n, rng) for n in range(1, 7)]
    for n, wait in enumerate(waits, start=1):
        base = min(5.0, 2.0 ** (n - 1))
        assert base * 0.5 <= wait <= base
    assert waits == [policy.backoff(n, random.Random(1)) for n in range(1, 2)] + waits[1:]
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_refusals_map_to_typed_errors_without_retry(federation) -> None:
    servicer, port = federation
    with _session(port, token="nope") as session, pytest.raises(AuthenticationError):
        session.join()
    assert session.sleeps == []  # type: ignore[attr-defined]
    with _session(port, site="site-b") as session, pytest.raises(PermissionDeniedError):
        session.join()  # tok-a belongs to site-a
    servicer.fingerprint = FINGERPRINT
    with _session(port) as session, pytest.raises(FingerprintMismatchError):
        session.join("cd" * 32)
    servicer.fail_next = [grpc.StatusCode.INVALID_ARGUMENT]
    with _session(port) as session, pytest.raises(RejectedError, match="INVALID_ARGUMENT"):
        session.upload_status()


def test_unreachable_server() -> None:
    servicer = FakeFederation({})
    server, port = start(servicer)
    server.stop(grace=None)  # the port is now closed
    retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.0)
    with _session(port, retry=retry) as session, pytest.raises(ServerUnavailableError):
        session.join()


def test_download_full_then_delta(federation) -> None:
    servicer, port = federation
    rng = np.random.default_rng(3)
    v1 = rng.random((300, D), dtype=np.float32)
    v2 = np.concatenate([np.delete(v1, [5, 17, 200], axis=0), rng.random((7, D), np.float32)])
    servicer.banks = {1: v1, 2: v2}
    with _session(port) as session:
        full = session.download_bank(version=1)
        delta = session.download_bank(version=2, have=(1, full.bank))
        fresh = session.download_bank(version=2)
    np.testing.assert_array_equal(full.bank, v1)
    assert delta.delta and delta.base_version == 1 and delta.rows_removed == 3
    np.testing.assert_array_equal(delta.bank, v2)
    np.testing.assert_array_equal(delta.bank, fresh.bank)
    assert delta.bytes_received * 10 < fresh.bytes_received  # only the change travelled


def test_a_stale_bank_is_replaced_by_the_full_one_with_one_line(federation, caplog) -> None:
    """A site's copy of v1 that is not the server's (an earlier federation's, or a reset
    server's): the delta fails the checksum or the row count, so the site downloads the whole
    bank and says why in one warning, instead of failing every rerun."""
    servicer, port = federation
    v1 = np.random.default_rng(4).random((50, D), dtype=np.float32)
    servicer.banks = {1: v1, 2: v1[:40]}
    same_rows = v1.copy()
    same_rows[0, 0] += 1.0  # same shape, other values: the checksum catches it
    more_rows = np.concatenate([v1, v1[:10]])  # an earlier federation's larger bank
    for stale, reason in ((same_rows, "fails its checksum"), (more_rows, "the header says 40")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedclient.session"), _session(port) as s:
            result = s.download_bank(version=2, have=(1, stale))
        np.testing.assert_array_equal(result.bank, v1[:40])
        assert not result.delta and reason in (result.replaced_stale or "")
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and reason in lines[0] and "full bank" in lines[0], lines
        assert result.bytes_received > 40 * D  # the refused delta's bytes and the full bank's
    with _session(port) as session:  # a full download that fails its checksum is not retried
        servicer.banks = {1: v1}
        original = fake_federation.bank_checksum
        fake_federation.bank_checksum = lambda bank: 12345
        try:
            with pytest.raises(RejectedError, match="checksum"):
                session.download_bank(version=1)
        finally:
            fake_federation.bank_checksum = original


def test_watch_until_ready_or_failed(federation) -> None:
    servicer, port = federation
    servicer.banks = {1: np.zeros((4, D), np.float32)}
    seen: list[int] = []
    with _session(port) as session:
        status = session.wait_until_ready(1, timeout_s=10, on_status=lambda s: seen.append(s.state))
        assert status.bank_version == 1
        assert seen == [fpb.ROUND_STATE_COLLECTING, fpb.ROUND_STATE_READY]
        servicer.state = fpb.ROUND_STATE_FAILED
        with pytest.raises(RoundFailedError, match="injected"):
            session.wait_until_ready(1, timeout_s=10)


def test_cli_prints_one_line_errors(federation, tmp_path, capsys) -> None:
    _, port = federation
    bad = tmp_path / "bad.token"
    bad.write_text("nope\n")
    code = cli.main(["status", "--server", f"127.0.0.1:{port}", "--site-id", "site-a",
                     "--token-file", str(bad)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "refused the token" in err
    assert "Traceback" not in err
    server = FakeFederation({})
    dead, dead_port = start(server)
    dead.stop(grace=None)
    code = cli.main(["status", "--server", f"127.0.0.1:{dead_port}", "--site-id", "site-a",
                     "--token-file", str(bad), "--retries", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "cannot reach the server" in err
    code = cli.main(["status", "--server", "no-port", "--site-id", "a"])
    assert code == 2 and "HOST:PORT" in capsys.readouterr().err


def test_cli_status_prints_the_round(federation, tmp_path, capsys) -> None:
    servicer, port = federation
    servicer.banks = {1: np.zeros((4, D), np.float32)}
    token = tmp_path / "t"
    token.write_text("tok-a")
    assert cli.main(["status", "--server", f"127.0.0.1:{port}", "--site-id", "site-a",
                     "--token-file", str(token), "--follow"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("round 1: collecting") and "bank v1 (4 rows)" in out[1]
    # sites_joined counts uploads begun (the server logs "joined" earlier, at JoinRound)
    assert "sites uploading or done" in out[0] and " joined" not in out[0]


def test_every_command_has_help(capsys) -> None:
    for command in ("run", "score", "status", "check", "init-config"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert len(capsys.readouterr().out) > 200


def test_init_config_writes_a_loadable_template(tmp_path, capsys) -> None:
    path = tmp_path / "site.toml"
    assert cli.main(["init-config", str(path)]) == 0
    args = cli.build_parser().parse_args(["run", "--config", str(path), "--site-id", "x"])
    values = cli._settings(args)
    assert values["site_id"] == "x" and values["server"] == "127.0.0.1:50051"
    assert values["token_file"] == tmp_path / "site.token"  # relative to the file
    assert cli.main(["init-config", str(path)]) == 2  # never overwritten


def _openssl(*args: str, cwd) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost and a site certificate (openssl CLI)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost\n")
    for name in ("server", "site"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={'localhost' if name == 'server' else name}",
                 cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                 *(["-extfile", "san.cnf"] if name == "server" else []), cwd=d)
    return d


def test_mutual_tls(pki) -> None:
    from concurrent import futures

    from fedclient.session import TLSConfig
    from fedpatchcore.v1 import federation_pb2_grpc as fgrpc

    servicer = FakeFederation({"tok-a": "site-a"})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fgrpc.add_FederationServiceServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(), require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        def session(tls: TLSConfig) -> SiteSession:
            return SiteSession(
                ConnectionConfig(f"127.0.0.1:{port}", token="tok-a", tls=tls, call_timeout_s=5),
                "site-a", retry=RetryPolicy(max_attempts=1),
            )

        mutual = TLSConfig(ca_file=pki / "ca.pem", cert_file=pki / "site.pem",
                           key_file=pki / "site.key", server_name="localhost")
        with session(mutual) as s:
            assert s.join().config.round == 1
        # Without a client certificate the server refuses the handshake.
        with session(TLSConfig(ca_file=pki / "ca.pem", server_name="localhost")) as s, \
                pytest.raises(ServerUnavailableError):
            s.join()
        # Plaintext against a TLS port fails too: nothing travels in the clear by accident.
        with SiteSession(ConnectionConfig(f"127.0.0.1:{port}", token="tok-a", call_timeout_s=5),
                         "site-a", retry=RetryPolicy(max_attempts=1)) as s, \
                pytest.raises(ServerUnavailableError):
            s.join()
    finally:
        server.stop(grace=None)
    with pytest.raises(ValueError, match="together"):
        TLSConfig(ca_file=pki / "ca.pem", cert_file=pki / "site.pem")


def offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No network and a cold weights cache (huggingface_hub's offline switch, empty caches)."""
    from huggingface_hub import constants

    cache = tmp_path / "cold-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(cache))


def test_cli_check_reports_each_step(tmp_path, synthetic_root, capsys, monkeypatch) -> None:
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from fedpatchcore.v1 import federation_pb2_grpc as fgrpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fgrpc.add_FederationServiceServicer_to_server(FakeFederation({"tok-a": "site-a"}), server)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    token = tmp_path / "t"
    token.write_text("tok-a\n")
    check = ["check", "--server", f"127.0.0.1:{port}", "--site-id", "site-a", "--token-file",
             str(token), "--data", str(synthetic_root), "--categories", "washer"]
    offline(monkeypatch, tmp_path)
    try:
        default_code = cli.main(check)  # the default extractor: pretrained, no network
        default_out = capsys.readouterr().out.splitlines()
        code = cli.main([*check, "--backbone", "resnet18", "--no-pretrained"])
    finally:
        server.stop(grace=None)
    out = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert code == 0
    assert [line.split(":")[0] for line in out[:3]] == [
        "ok   data", "ok   settings", "ok   server health"
    ]
    assert out[3] == ("ok   token accepted for site site-a; round 1 open, bank size 16, upload "
                      "committed 0 chunk(s)")
    assert "12 training image(s), 8 test image(s)" in out[0] and "SERVING" in out[2]
    assert out[4].startswith("ok   extractor resnet18 (from this site's settings): weights "
                             "loaded, RANDOM weights")
    assert out[5].startswith("ok   evaluation: scored on the 224x224 centre crop")
    # `check` said all was well offline although `run` could not load the weights: now it fails
    assert default_code == 2
    assert default_out[-1].startswith("FAIL extractor wide_resnet50_2 (from this site's settings)")
    assert "--weights FILE" in default_out[-1] and "--no-pretrained" in default_out[-1]


def test_cli_run_refuses_early_with_one_line(federation, tmp_path, synthetic_root, capsys) -> None:
    servicer, port = federation
    token = tmp_path / "t"
    token.write_text("tok-a")
    run = ["run", "--server", f"127.0.0.1:{port}", "--site-id", "site-a", "--token-file",
           str(token), "--data", str(synthetic_root), "--categories", "washer", "--out",
           str(tmp_path / "out"), "--backbone", "resnet18", "--no-pretrained"]
    servicer.fingerprint = FINGERPRINT  # the federation's extractor is another one
    assert cli.main(run) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "feature extractor mismatch" in err
    servicer.fingerprint = ""
    servicer.fail_next = [grpc.StatusCode.FAILED_PRECONDITION]  # e.g. the round is closed
    assert cli.main(run) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the round does not accept this (join)" in err
    assert not (tmp_path / "out" / "metrics.json").exists()  # refused before any work


def test_tls_against_a_plaintext_server_is_one_line_without_grpc_log_lines(
    federation, pki, tmp_path
) -> None:
    """A site with --tls-ca against a plaintext server: one line that says what to check,
    without gRPC's raw text or its C-core log lines (a fresh process: the C core reads its log
    level when grpc is first imported)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, port = federation
    token = tmp_path / "t"
    token.write_text("tok-a")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "protos")])
    done = subprocess.run(
        [sys.executable, "-m", "fedclient", "status", "--server", f"127.0.0.1:{port}",
         "--site-id", "site-a", "--token-file", str(token), "--tls-ca", str(pki / "ca.pem"),
         "--retries", "1", "--timeout", "5"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "TLS handshake with the server" in done.stderr and "--tls-ca" in done.stderr
    assert "ssl_transport_security" not in done.stderr


def test_progress_on_a_terminal_keeps_log_lines_out_of_the_bar(monkeypatch) -> None:
    """The random-weights warning used to be printed into the progress bar's line; steps
    between the fit and score bars, and the round's status while waiting, are shown."""
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    handler = logging.StreamHandler(terminal)
    logging.getLogger().addHandler(handler)
    try:
        bar = cli._progress_bar()
        bar("fit", 1, 4)
        logging.getLogger("core.features").warning("BACKBONE resnet18 HAS RANDOM WEIGHTS")
        bar("fit", 4, 4)
        bar.say("round 1: uploading 10 rows in 1 chunk(s)")
        bar.status(fpb.RoundStatus(round=1, state=fpb.ROUND_STATE_COLLECTING, sites_expected=3,
                                   sites_complete=1))
        bar.status(fpb.RoundStatus(round=1, state=fpb.ROUND_STATE_READY, sites_expected=3,
                                   sites_complete=3))
        bar.say("round 1: bank v1 downloaded")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = terminal.getvalue().split("\n")
    assert lines[0] == "\r  fit [#######.......................] 1/4"
    assert lines[1] == "BACKBONE resnet18 HAS RANDOM WEIGHTS"  # on a line of its own
    assert lines[2].endswith("4/4") and lines[3] == "round 1: uploading 10 rows in 1 chunk(s)"
    assert "round 1: ready, 3/3 site(s) uploaded" in lines[4]
    assert lines[5] == "round 1: bank v1 downloaded"


def test_a_concurrency_refusal_is_retried_and_a_limit_refusal_is_final() -> None:
    """RESOURCE_EXHAUSTED with fedserver's ``fedpatchcore-retry: concurrency`` trailer (the site
    held too many rpcs at once) may pass on a retry; RESOURCE_EXHAUSTED for too many rows may
    not."""
    from fedclient.session import _retryable

    class Refusal(grpc.RpcError):
        def __init__(self, details: str, trailing: tuple[tuple[str, str], ...]) -> None:
            self._details, self._trailing = details, trailing

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return self._details

        def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
            return self._trailing

    assert _retryable(Refusal("concurrency limit: site 'a' already holds 16 open rpcs",
                              (("fedpatchcore-retry", "concurrency"),)))
    assert _retryable(Refusal("Concurrent RPC limit exceeded!", ()))
    assert not _retryable(Refusal("site 'a' announces 5000 rows, more than max_rows_per_site=1000",
                                  ()))
