"""Reliability campaign, part 5: security (issue 9).

TLS and mTLS end to end with certificates generated here (openssl CLI); under mTLS a client
certificate is bound to its site (CN or SAN = the token's site). A site can act, and read, only
as itself, and the only data it can read is the global bank. Tokens are compared in constant
time, stored hashed, never logged; the state directory and token files are owner-only.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
import os
import random
import shutil
import stat
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedserver_testing import TestClient, make_config, reference_bank, site_rows, upload_messages
from reliability_testing import make_pki

from fedclient.session import (
    ConnectionConfig,
    PermissionDeniedError,
    RetryPolicy,
    SiteSession,
    TLSConfig,
)
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver import auth
from fedserver.auth import TokenStore, hash_token, new_token
from fedserver.cli import main as fedserver_main
from fedserver.daemon import create_server
from fedserver.federation import Phase

pytestmark = pytest.mark.reliability  # the campaign; full=True: only with -m reliability

D = 32
CHUNK_BYTES = 20 * D * 4
SITES = ("a", "b")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed: cannot generate test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"), [*SITES, "intruder"])


def _session(port: int, site: str, token: str, pki: Path, cert: str | None) -> SiteSession:
    tls = TLSConfig(
        ca_file=pki / "ca.pem",
        cert_file=None if cert is None else pki / f"{cert}.pem",
        key_file=None if cert is None else pki / f"{cert}.key",
        server_name="localhost",
    )
    return SiteSession(
        ConnectionConfig(f"127.0.0.1:{port}", token=token, tls=tls, call_timeout_s=30), site,
        retry=RetryPolicy(max_attempts=1), rng=random.Random(0),
    )


#: The bank the server must reproduce from ``data`` (site -> rows) uploaded in CHUNK_BYTES chunks.
_reference = functools.partial(reference_bank, max_chunk_bytes=CHUNK_BYTES)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_end_to_end_and_certificates_bound_to_sites(
    tmp_path: Path, pki: Path, mutual: bool
) -> None:
    config, tokens = make_config(
        tmp_path, SITES, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
        client_ca=pki / "ca.pem" if mutual else None,
    )
    server, port = create_server(config)
    server.start()
    data = {site: site_rows(i, 90 + 30 * i) for i, site in enumerate(SITES)}
    try:
        banks = []
        for site in SITES:
            with _session(port, site, tokens[site], pki, site if mutual else None) as session:
                session.join()
                summary, chunks = upload_messages(site, data[site], max_chunk_bytes=CHUNK_BYTES)
                assert session.upload(summary, chunks).status.complete
        for site in SITES:
            with _session(port, site, tokens[site], pki, site if mutual else None) as session:
                session.wait_until_ready(1, timeout_s=60)
                banks.append(session.download_bank().bank)
        np.testing.assert_array_equal(banks[0], _reference(data))
        np.testing.assert_array_equal(banks[0], banks[1])
        if mutual:
            # b's certificate with a's token (a stolen token, or b acting as a): refused.
            with _session(port, "a", tokens["a"], pki, "b") as session, pytest.raises(
                PermissionDeniedError, match=r"does not belong to site 'a'"
            ) as error:
                session.join()
            assert error.value.code is grpc.StatusCode.PERMISSION_DENIED
            # A certificate of the right CA for no site of the federation: refused as well.
            with _session(port, "a", tokens["a"], pki, "intruder") as session, pytest.raises(
                PermissionDeniedError, match=r"names \['intruder'\]"
            ):
                session.download_bank()
            # No client certificate at all: the TLS handshake fails.
            with _session(port, "a", tokens["a"], pki, None) as session, pytest.raises(
                Exception, match="cannot reach the server"
            ):
                session.join()
        plaintext = TestClient(port, "a", tokens["a"])
        with pytest.raises(grpc.RpcError) as err:
            plaintext.join()  # plaintext to a TLS port
        plaintext.close()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_a_site_acts_and_reads_only_as_itself(tmp_path: Path) -> None:
    config, tokens = make_config(tmp_path, SITES)
    server, port = create_server(config)
    server.start()
    a = TestClient(port, "a", tokens["a"])
    as_b = TestClient(port, "b", tokens["a"])  # a's token, naming b
    try:
        summary, chunks = upload_messages("a", site_rows(0, 90), max_chunk_bytes=CHUNK_BYTES)
        a.upload([summary, *chunks])
        calls = {
            "upload": lambda: as_b.upload(upload_messages("b", site_rows(1, 90))[1][:1]),
            "upload status": lambda: as_b.status(),
            "download": lambda: as_b.download(),
            "watch": lambda: as_b.watch_until_done(timeout=10),
            "join": lambda: as_b.join(),
        }
        for what, call in calls.items():
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() is grpc.StatusCode.PERMISSION_DENIED, what
            assert "site 'a' cannot" in (error.value.details() or ""), what
        b_summary, b_chunks = upload_messages("b", site_rows(1, 90), max_chunk_bytes=CHUNK_BYTES)
        TestClient(port, "b", tokens["b"]).upload([b_summary, *b_chunks])
        a.watch_until_done()
        bank = a.download()
    finally:
        a.close()
        as_b.close()
        server.stop(0)
    # What a site can read: the service has no call that returns uploads, and the download
    # stream carries the global bank only (header, removed indices, bank chunks).
    service = fpb.DESCRIPTOR.services_by_name["FederationService"]
    assert {m.name: m.output_type.name for m in service.methods} == {
        "JoinRound": "JoinRoundResponse", "UploadFeatures": "UploadFeaturesResponse",
        "QueryUploadStatus": "QueryUploadStatusResponse",
        "DownloadBank": "DownloadBankResponse", "WatchRound": "RoundStatus",
    }
    assert {f.name for f in fpb.DownloadBankResponse.DESCRIPTOR.fields} == {
        "header", "removed", "chunk"
    }
    np.testing.assert_array_equal(
        bank.bank, _reference({"a": site_rows(0, 90), "b": site_rows(1, 90)})
    )


def test_tokens_are_compared_in_constant_time_and_stored_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = inspect.getsource(TokenStore.site_for_token)
    assert "hmac.compare_digest(" in source and "==" not in source and "return site" not in source
    tokens = {f"site-{i}": new_token() for i in range(5)}
    store = TokenStore((s, hash_token(t)) for s, t in tokens.items())
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(x: bytes, y: bytes) -> bool:
        calls.append(1)
        return real(x, y)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for token in [*tokens.values(), "unknown", ""]:
        calls.clear()
        store.site_for_token(token)
        assert len(calls) == len(tokens)  # every entry, every time: no early exit on a match
    assert store.site_for_token(tokens["site-3"]) == "site-3"
    # Stored hashed: the tokens file holds digests, no token.
    path = tmp_path / "tokens"
    auth.write_tokens_file(path, tokens)
    text = path.read_text()
    assert all(token not in text and hash_token(token) in text for token in tokens.values())


def test_tokens_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Server and client in this process, every logger at DEBUG: no token in any record, whether
    the call succeeds, names another site or presents a wrong token."""
    caplog.set_level(logging.DEBUG)
    config, tokens = make_config(tmp_path, SITES, log_level="DEBUG")
    wrong = new_token()
    server, port = create_server(config)
    server.start()
    try:
        sessions = [
            SiteSession(ConnectionConfig(f"127.0.0.1:{port}", token=tokens[site]), site,
                        retry=RetryPolicy(max_attempts=1))
            for site in SITES
        ]
        for session in sessions:
            session.join()
            summary, chunks = upload_messages(session.site_id, site_rows(3, 60),
                                              max_chunk_bytes=CHUNK_BYTES)
            session.upload(summary, chunks)
        for session in sessions:
            session.wait_until_ready(1, timeout_s=60)
            session.download_bank()
            session.close()
        for token, site in ((wrong, "a"), (tokens["a"], "b")):
            with SiteSession(ConnectionConfig(f"127.0.0.1:{port}", token=token), site,
                             retry=RetryPolicy(max_attempts=1)) as session, pytest.raises(
                Exception, match=r"refused the token|permission denied"
            ):
                session.join()
    finally:
        server.stop(0)
    text = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    )
    assert len(caplog.records) > 20, "expected server and client log records at DEBUG"
    assert "cannot act as site" in text and "unknown bearer token" in text
    for token in [*tokens.values(), wrong]:
        assert token not in text
        assert hash_token(token) not in text


def test_state_and_token_files_are_owner_only(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # a permissive umask: the modes must not depend on it
    try:
        assert fedserver_main(["init-config", "--sites", "a,b", "--dir", str(tmp_path / "fed"),
                               "--global-bank-size", "40"]) == 0
        config, tokens = make_config(tmp_path / "server", SITES)
        server, port = create_server(config)
        server.start()
        try:
            for i, site in enumerate(SITES):
                summary, chunks = upload_messages(site, site_rows(i, 80))
                client = TestClient(port, site, tokens[site])
                client.upload([summary, *chunks])
                client.close()
            server.federation.wait_for(1, {Phase.READY}, 60)
        finally:
            server.stop(0)
    finally:
        os.umask(previous)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    fed = tmp_path / "fed"
    assert mode(fed / "tokens") == 0o600
    assert mode(fed / "site-tokens") == 0o700
    assert {mode(p) for p in (fed / "site-tokens").iterdir()} == {0o600}
    state = config.state_dir
    entries = [state, *state.rglob("*")]
    assert {p.name for p in entries} >= {"journal.log", "settings.json", "banks",
                                          "v000001.npy", "v000001.json"}
    for path in entries:
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path
    assert mode(config.tokens_file) == 0o600
