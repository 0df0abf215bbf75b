"""The daemon on 127.0.0.1:0 driven by a minimal stub client: banks, resume, restart, codes."""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedserver_testing import (
    TestClient,
    channel,
    make_config,
    reference_bank,
    site_rows,
    upload_messages,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from core.codec import CODEC_PRESETS
from core.federated.aggregator import GlobalBankAggregator
from core.federated.communication import CommunicationProtocol, parse_upload
from core.serde import upload_request_to_proto
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.daemon import FedServer, create_server
from fedserver.federation import Phase
from fedserver.journal import RecordKind

SITES = ("plant-c", "plant-a", "plant-b")
CHUNK_BYTES = 32 * 4 * 25  # 25 rows of D=32 per chunk: several chunks per site


def _data() -> dict[str, np.ndarray]:
    return {site: site_rows(i, 120 + 30 * i) for i, site in enumerate(SITES)}


def _in_process_bank(data: dict[str, np.ndarray], k: int = 50) -> np.ndarray:
    """What core.federated computes in process: FederatedServer feeds the wire messages of each
    site (CommunicationProtocol) to a GlobalBankAggregator, site after site."""
    aggregator = GlobalBankAggregator(k, seed=0)
    aggregator.begin_round(1)
    for site, rows in data.items():
        summary = upload_messages(site, rows)[0]
        messages = CommunicationProtocol.send_to_server(
            site, rows, round_number=1, codec=CODEC_PRESETS["lossless"], summary=summary
        )
        for item in parse_upload(messages):
            if item is summary or item.__class__.__name__ == "SiteSummary":
                aggregator.receive_summary(item)  # type: ignore[arg-type]
            else:
                aggregator.receive_chunk(item)  # type: ignore[arg-type]
    return aggregator.finish_round().bank


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[FedServer, int, dict[str, str]]]:
    config, tokens = make_config(tmp_path, SITES)
    server, port = create_server(config)
    server.start()
    yield server, port, tokens
    server.stop(0)


def _upload_all(port: int, tokens: dict[str, str], data: dict[str, np.ndarray],
                interleave: bool) -> None:
    """Upload every site's data: concurrently chunk by chunk (interleave) or one after another
    in reverse order."""
    clients = {site: TestClient(port, site, tokens[site]) for site in data}
    messages = {
        site: (lambda s, c: [s, *c])(*upload_messages(site, rows, max_chunk_bytes=CHUNK_BYTES))
        for site, rows in data.items()
    }
    if not interleave:
        for site in reversed(list(data)):
            assert clients[site].upload(messages[site]).upload.complete
    else:
        turn = threading.Semaphore(1)

        def paced(site: str) -> Iterator[object]:
            for item in messages[site]:
                with turn:  # one message at a time across sites, order left to the scheduler
                    time.sleep(0.002)
                yield item

        threads = [threading.Thread(target=lambda s=site: clients[s].upload(paced(s)))
                   for site in data]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for client in clients.values():
        client.close()


def test_bank_equals_in_process_whatever_the_interleaving(tmp_path: Path) -> None:
    data = _data()
    reference = _in_process_bank(dict(sorted(data.items())))
    for interleave in (True, False):
        config, tokens = make_config(tmp_path / str(interleave), SITES)
        server, port = create_server(config)
        server.start()
        try:
            _upload_all(port, tokens, data, interleave)
            client = TestClient(port, "plant-a", tokens["plant-a"])
            statuses = client.watch_until_done()
            assert statuses[-1].state == fpb.ROUND_STATE_READY
            downloaded = client.download()
            client.close()
            arrival = [
                pb.UploadFeaturesRequest.FromString(r.payload).chunk.site_id
                for r in server.federation.journal.records() if r.kind is RecordKind.CHUNK
            ]
            switches = sum(a != b for a, b in itertools.pairwise(arrival))
            # Interleaved: sites alternate on the wire; else one site after another, in an
            # order (c, b, a reversed) that is not the canonical one either.
            assert switches > len(SITES) if interleave else switches == len(SITES) - 1
        finally:
            server.stop(0)
        np.testing.assert_array_equal(downloaded.bank, reference)
        assert downloaded.header.bank_checksum != 0


def test_resumed_upload_sends_only_the_uncommitted_part(
    running: tuple[FedServer, int, dict[str, str]],
) -> None:
    server, port, tokens = running
    client = TestClient(port, "plant-a", tokens["plant-a"])
    summary, chunks = upload_messages("plant-a", site_rows(1, 200), max_chunk_bytes=CHUNK_BYTES)
    assert len(chunks) == 8

    def breaks_after_three() -> Iterator[object]:
        yield upload_request_to_proto(summary)
        for chunk in chunks[:3]:
            yield upload_request_to_proto(chunk)
        deadline = time.monotonic() + 10
        while server.federation.progress("plant-a").committed_sequence < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        raise ConnectionError("the site's network went down")

    with pytest.raises(grpc.RpcError) as broken:
        client.stub.UploadFeatures(breaks_after_three(), metadata=client.metadata, timeout=30)
    assert broken.value.code() is grpc.StatusCode.UNKNOWN  # the client cancelled its call
    status = client.status()
    assert (status.committed_sequence, status.committed_rows) == (3, chunks[3].row_offset)
    response = client.upload(chunks[status.committed_sequence:])
    assert response.upload.complete
    assert (response.chunks_accepted, response.chunks_ignored) == (5, 0)
    client.close()


def test_status_codes_while_another_upload_goes_on(
    running: tuple[FedServer, int, dict[str, str]],
) -> None:
    server, port, tokens = running
    data = _data()
    good = TestClient(port, "plant-b", tokens["plant-b"])
    summary, chunks = upload_messages("plant-b", data["plant-b"], max_chunk_bytes=CHUNK_BYTES)
    results: dict[str, object] = {}
    errors_done = threading.Event()

    def slow_upload() -> Iterator[object]:
        yield upload_request_to_proto(summary)
        for index, chunk in enumerate(chunks):
            if index == 1:
                errors_done.wait(timeout=30)  # the bad requests happen mid-upload
            yield upload_request_to_proto(chunk)

    thread = threading.Thread(
        target=lambda: results.update(
            good=good.stub.UploadFeatures(slow_upload(), metadata=good.metadata, timeout=60)
        )
    )
    thread.start()
    try:
        codes = {}
        intruder = TestClient(port, "plant-a", "wrong-token")
        with pytest.raises(grpc.RpcError) as error:
            intruder.join()
        codes["wrong token"] = error.value.code()
        impostor = TestClient(port, "plant-b", tokens["plant-a"])  # a's token, claims b
        with pytest.raises(grpc.RpcError) as error:
            impostor.upload(upload_messages("plant-b", data["plant-b"])[1][:1])
        codes["wrong site"] = error.value.code()
        site_a = TestClient(port, "plant-a", tokens["plant-a"])
        with pytest.raises(grpc.RpcError) as error:
            site_a.upload([upload_messages("plant-a", site_rows(0, 10, dim=16))[0]])
        codes["wrong dimension"] = error.value.code()
        a_summary, a_chunks = upload_messages("plant-a", data["plant-a"],
                                              max_chunk_bytes=CHUNK_BYTES)
        corrupted = upload_request_to_proto(a_chunks[0])
        corrupted.chunk.features.checksum ^= 1
        with pytest.raises(grpc.RpcError) as error:
            site_a.stub.UploadFeatures(
                iter([upload_request_to_proto(a_summary), corrupted]),
                metadata=site_a.metadata, timeout=30,
            )
        codes["corrupted chunk"] = error.value.code()
        assert codes == {
            "wrong token": grpc.StatusCode.UNAUTHENTICATED,
            "wrong site": grpc.StatusCode.PERMISSION_DENIED,
            "wrong dimension": grpc.StatusCode.INVALID_ARGUMENT,
            "corrupted chunk": grpc.StatusCode.DATA_LOSS,
        }
    finally:
        errors_done.set()
        thread.join()
    response = results["good"]
    assert response.upload.complete and response.upload.committed_rows == 180  # type: ignore[attr-defined]
    # a's summary was committed before its corrupted chunk; it resumes and the round completes.
    assert site_a.status().summary_committed
    site_a.upload(a_chunks)
    c_summary, c_chunks = upload_messages("plant-c", data["plant-c"])
    TestClient(port, "plant-c", tokens["plant-c"]).upload([c_summary, *c_chunks])
    assert server.federation.wait_for(1, {Phase.READY}, timeout=60).bank_rows == 50


def test_second_round_downloads_only_the_change(tmp_path: Path) -> None:
    config, tokens = make_config(tmp_path, ("a", "b"), rounds=2, codec="fp16")
    server, port = create_server(config)
    server.start()
    try:
        clients = {s: TestClient(port, s, tokens[s]) for s in ("a", "b")}
        for i, (site, client) in enumerate(clients.items()):
            summary, chunks = upload_messages(site, site_rows(i, 150))
            client.upload([summary, *chunks])
        clients["a"].watch_until_done(1)
        first = clients["a"].download()
        joined = clients["a"].join()
        assert joined.config.round == 2 and joined.config.base_bank_version == 1
        assert joined.config.novelty_threshold > 0
        novel = site_rows(3, 4) + 100.0  # far from everything: must enter the bank
        for site, rows in (("a", novel), ("b", np.empty((0, 32), np.float32))):
            summary, chunks = upload_messages(site, rows, round_number=2)
            clients[site].upload([summary, *chunks])
        statuses = clients["b"].watch_until_done(2)
        assert statuses[-1].state == fpb.ROUND_STATE_READY and statuses[-1].bank_version == 2
        delta = clients["b"].download(have=first)
        full = clients["b"].download()
        # Farthest-first over the union re-picks some rows around the new ones, so the change
        # is more than the 4 novel rows, but far less than the bank.
        assert delta.header.base_version == 1 and 4 <= delta.header.rows_in_stream < 50
        assert delta.header.rows_removed == delta.header.rows_in_stream  # k rows both times
        novel_decoded = {r.tobytes() for r in novel.astype(np.float16).astype(np.float32)}
        assert novel_decoded <= {r.tobytes() for r in delta.bank}
        np.testing.assert_array_equal(delta.bank, full.bank)
        current = clients["b"].download(have=full)  # up to date: an empty delta
        assert (current.header.rows_in_stream, current.header.rows_removed) == (0, 0)
        np.testing.assert_array_equal(current.bank, full.bank)
        from core.bankdelta import bank_checksum

        assert bank_checksum(delta.bank) == delta.header.bank_checksum
        for client in clients.values():
            client.close()
    finally:
        server.stop(0)


def test_health_and_reflection_need_no_token(
    running: tuple[FedServer, int, dict[str, str]],
) -> None:
    _, port, _ = running
    with channel(port) as conn:
        health = health_pb2_grpc.HealthStub(conn).Check(
            health_pb2.HealthCheckRequest(service="fedpatchcore.v1.FederationService"), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(conn).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "fedpatchcore.v1.FederationService" in names and "grpc.health.v1.Health" in names
        with pytest.raises(grpc.RpcError) as error:
            TestClient(port, "plant-a", "").join()
        assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl is not installed")
    pki = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=pki)
    (pki / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    # The client certificate names site "a" (CN): under mTLS it must match the token's site.
    for name, common_name in (("server", "server"), ("client", "a")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={common_name}", cwd=pki)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext",
                 cwd=pki)
    return pki


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_and_mutual_tls(tmp_path: Path, certificates: Path, mutual: bool) -> None:
    pki = certificates
    config, tokens = make_config(
        tmp_path, ("a",), tls_cert=pki / "server.pem", tls_key=pki / "server.key",
        client_ca=pki / "ca.pem" if mutual else None,
    )
    server, port = create_server(config)
    server.start()
    try:
        root = (pki / "ca.pem").read_bytes()
        metadata = (("authorization", f"Bearer {tokens['a']}"),)
        with_cert = grpc.ssl_channel_credentials(
            root, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
        )
        from fedpatchcore.v1 import federation_pb2_grpc as fgrpc

        with grpc.secure_channel(f"127.0.0.1:{port}", with_cert) as conn:
            response = fgrpc.FederationServiceStub(conn).JoinRound(
                fpb.JoinRoundRequest(site_id="a"), metadata=metadata, timeout=10
            )
            assert response.config.round == 1
        with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root)) as conn:
            call = fgrpc.FederationServiceStub(conn).JoinRound
            if mutual:  # no client certificate: the handshake fails
                with pytest.raises(grpc.RpcError) as error:
                    call(fpb.JoinRoundRequest(site_id="a"), metadata=metadata, timeout=10)
                assert error.value.code() is grpc.StatusCode.UNAVAILABLE
            else:
                assert call(fpb.JoinRoundRequest(site_id="a"), metadata=metadata,
                            timeout=10).config.round == 1
        with grpc.insecure_channel(f"127.0.0.1:{port}") as conn:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError) as error:
                fgrpc.FederationServiceStub(conn).JoinRound(
                    fpb.JoinRoundRequest(site_id="a"), metadata=metadata, timeout=5
                )
            assert error.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_stop_drains_an_upload_in_flight_and_ends_watches(tmp_path: Path) -> None:
    config, tokens = make_config(tmp_path, ("a", "b"))
    server, port = create_server(config)
    server.start()
    uploader = TestClient(port, "a", tokens["a"])
    watcher = TestClient(port, "b", tokens["b"])
    summary, chunks = upload_messages("a", site_rows(0, 200), max_chunk_bytes=CHUNK_BYTES)
    sent_half = threading.Event()

    def slow() -> Iterator[object]:
        yield upload_request_to_proto(summary)
        for index, chunk in enumerate(chunks):
            if index == len(chunks) // 2:
                sent_half.set()
                time.sleep(0.5)  # the stop arrives now
            yield upload_request_to_proto(chunk)

    results: dict[str, object] = {}
    upload = threading.Thread(target=lambda: results.update(
        response=uploader.stub.UploadFeatures(slow(), metadata=uploader.metadata, timeout=30)
    ))
    watch = threading.Thread(target=lambda: results.update(statuses=watcher.watch_until_done()))
    watch.start()
    upload.start()
    assert sent_half.wait(timeout=30)
    server.stop(grace=10)  # returns after the drain
    upload.join(timeout=30)
    watch.join(timeout=30)
    response = results["response"]
    assert response.upload.complete and response.upload.committed_rows == 200  # type: ignore[attr-defined]
    statuses = results["statuses"]
    assert statuses and statuses[-1].state == fpb.ROUND_STATE_COLLECTING  # type: ignore[index]
    # Everything acknowledged is on disk for the next start.
    again, _ = create_server(config)
    assert again.federation.progress("a").complete
    again.federation.close()
    uploader.close()
    watcher.close()


def test_daemon_selects_on_cuda(tmp_path: Path, cuda_device: object) -> None:
    """device = "cuda": the round completes on the GPU and gives the bank the same aggregator
    computes in process on that device (runs only where CUDA exists; gpu_check.sh runs it)."""
    data = _data()
    config, tokens = make_config(tmp_path, SITES, device="cuda")
    server, port = create_server(config)
    assert server.federation.device == "cuda"
    server.start()
    try:
        _upload_all(port, tokens, data, interleave=True)
        client = TestClient(port, "plant-a", tokens["plant-a"])
        assert client.watch_until_done()[-1].state == fpb.ROUND_STATE_READY
        bank = client.download().bank
        client.close()
    finally:
        server.stop(0)
    np.testing.assert_array_equal(
        bank, reference_bank(data, max_chunk_bytes=CHUNK_BYTES, device="cuda")
    )
