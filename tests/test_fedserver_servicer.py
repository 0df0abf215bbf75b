"""FederationServicer without sockets (grpc_testing): every status code and what stays committed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc_testing
import pytest
from fedserver_testing import make_config, site_rows, upload_messages

from core.serde import upload_request_to_proto
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.auth import TokenStore
from fedserver.federation import Federation, Phase
from fedserver.journal import Journal
from fedserver.servicer import FederationServicer

SERVICE = fpb.DESCRIPTOR.services_by_name["FederationService"]
CHUNK_BYTES = 32 * 4 * 20  # 20 rows of D=32 per chunk


class Harness:
    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        self.config, self.tokens = make_config(tmp_path, ["a", "b"], **overrides)
        self.federation = Federation(self.config, Journal(self.config.state_dir), ("a", "b"))
        self.federation.start()
        servicer = FederationServicer(self.federation, TokenStore.load(self.config.tokens_file))
        self.server = grpc_testing.server_from_dictionary(
            {SERVICE: servicer}, grpc_testing.strict_real_time()
        )

    def metadata(self, site: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[site]}"),)

    def unary(self, method: str, request: object, site: str = "a") -> tuple[object, object, str]:
        rpc = self.server.invoke_unary_unary(
            SERVICE.methods_by_name[method], self.metadata(site), request, 10
        )
        response, _, code, details = rpc.termination()
        return response, code, details

    def upload(
        self, requests: list[pb.UploadFeaturesRequest], site: str = "a"
    ) -> tuple[fpb.UploadFeaturesResponse, grpc.StatusCode, str]:
        rpc = self.server.invoke_stream_unary(
            SERVICE.methods_by_name["UploadFeatures"], self.metadata(site), 10
        )
        for request in requests:
            rpc.send_request(request)
        rpc.requests_closed()
        response, _, code, details = rpc.termination()
        return response, code, details

    def stream(self, method: str, request: object, site: str = "a") -> tuple[list, object, str]:
        rpc = self.server.invoke_unary_stream(
            SERVICE.methods_by_name[method], self.metadata(site), request, 10
        )
        responses = []
        while True:
            try:
                responses.append(rpc.take_response())
            except ValueError:  # grpc_testing: no more responses (the rpc terminated)
                break
        _, code, details = rpc.termination()
        return responses, code, details

    def close(self) -> None:
        self.federation.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    value = Harness(tmp_path, max_rows_per_site=500)
    yield value
    value.close()


def _requests(site: str, seed: int, rows: int = 100, dim: int = 32) -> list[
    pb.UploadFeaturesRequest
]:
    summary, chunks = upload_messages(site, site_rows(seed, rows, dim), max_chunk_bytes=CHUNK_BYTES)
    return [upload_request_to_proto(item) for item in (summary, *chunks)]


def test_join_and_status(harness: Harness) -> None:
    response, code, _ = harness.unary("JoinRound", fpb.JoinRoundRequest(site_id="a"))
    assert code is grpc.StatusCode.OK
    assert response.config.round == 1 and response.config.global_bank_size == 50
    assert response.status.state == fpb.ROUND_STATE_COLLECTING
    assert response.status.sites_expected == 2 and response.config.codec.value_type == 1


def test_unknown_token_and_other_site(harness: Harness) -> None:
    harness.tokens["a"] = "not-a-token"
    _, code, details = harness.unary("JoinRound", fpb.JoinRoundRequest(site_id="a"))
    assert code is grpc.StatusCode.UNAUTHENTICATED and "unknown bearer token" in details
    _, code, details = harness.unary("JoinRound", fpb.JoinRoundRequest(site_id="a"), site="b")
    assert code is grpc.StatusCode.PERMISSION_DENIED and "cannot act as site 'a'" in details
    requests = _requests("a", 0)
    _, code, details = harness.upload(requests, site="b")
    assert code is grpc.StatusCode.PERMISSION_DENIED and "cannot upload as site 'a'" in details


def test_corrupted_chunk_is_data_loss_and_the_rest_stays_committed(harness: Harness) -> None:
    requests = _requests("a", 0)
    corrupted = pb.UploadFeaturesRequest()
    corrupted.CopyFrom(requests[3])
    payload = bytearray(corrupted.chunk.features.payload)
    payload[len(payload) // 2] ^= 0x01
    corrupted.chunk.features.payload = bytes(payload)
    _, code, details = harness.upload([*requests[:3], corrupted, *requests[4:]])
    assert code is grpc.StatusCode.DATA_LOSS and "checksum" in details
    status, _, _ = harness.unary("QueryUploadStatus", fpb.QueryUploadStatusRequest(site_id="a"))
    assert status.upload.committed_sequence == 2  # chunks 0 and 1 were committed
    # Resuming from the committed position finishes the upload.
    response, code, _ = harness.upload(requests[3:])
    assert code is grpc.StatusCode.OK
    assert response.upload.complete and response.upload.committed_rows == 100


def test_resume_beyond_the_committed_position_is_out_of_range(harness: Harness) -> None:
    requests = _requests("a", 0)
    response, code, _ = harness.upload(requests[:2])  # summary + chunk 0
    assert code is grpc.StatusCode.OK and response.upload.committed_sequence == 1
    _, code, details = harness.upload(requests[3:])  # starts at chunk 2
    assert code is grpc.StatusCode.OUT_OF_RANGE and "resume from chunk 1" in details
    response, code, _ = harness.upload(requests[1:])  # chunk 0 again (ignored), then the rest
    assert code is grpc.StatusCode.OK
    assert (response.chunks_accepted, response.chunks_ignored) == (len(requests) - 2, 1)


def test_wrong_dimension_and_limits(harness: Harness) -> None:
    assert harness.upload(_requests("a", 0)[:1])[1] is grpc.StatusCode.OK  # a fixes D=32
    _, code, details = harness.upload(_requests("b", 1, dim=16)[:1], site="b")
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "D=16" in details
    _, code, details = harness.upload(_requests("b", 1, rows=600)[:1], site="b")
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_rows_per_site=500" in details
    chunk_first = _requests("b", 1)[1:2]
    _, code, details = harness.upload(chunk_first, site="b")
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "SiteSummary first" in details
    _, code, details = harness.upload([pb.UploadFeaturesRequest()], site="b")
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "no body" in details


def test_download_before_ready_then_after(harness: Harness) -> None:
    _, code, details = harness.stream("DownloadBank", fpb.DownloadBankRequest(site_id="a"))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "no bank is ready" in details
    _, code, _ = harness.unary("QueryUploadStatus",
                               fpb.QueryUploadStatusRequest(site_id="a", round=9))
    assert code is grpc.StatusCode.NOT_FOUND
    for site, seed in (("a", 0), ("b", 1)):
        assert harness.upload(_requests(site, seed), site=site)[1] is grpc.StatusCode.OK
    harness.federation.wait_for(1, {Phase.READY}, timeout=30)
    responses, code, _ = harness.stream(
        "DownloadBank", fpb.DownloadBankRequest(site_id="b"), site="b"
    )
    assert code is grpc.StatusCode.OK
    header = responses[0].header
    assert (header.version, header.total_rows, header.base_version) == (1, 50, 0)
    assert sum(r.chunk.features.rows for r in responses[1:]) == 50
    assert responses[-1].chunk.last
    # Uploads after the round closed are refused.
    _, code, details = harness.upload(_requests("a", 0)[:1])
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "ready" in details
