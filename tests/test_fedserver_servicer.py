"""FederationServicer through a real grpc.aio server in this process (127.0.0.1:0): every status
code and what stays committed. (grpc_testing drives only synchronous servicers; the handlers are
asyncio coroutines now, so the calls go over loopback.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fedserver_testing import channel, make_config, site_rows, upload_messages

from core.serde import upload_request_to_proto
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedpatchcore.v1 import federation_pb2_grpc as fgrpc
from fedserver.daemon import create_server
from fedserver.federation import Phase

CHUNK_BYTES = 32 * 4 * 20  # 20 rows of D=32 per chunk


class Harness:
    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        self.config, self.tokens = make_config(tmp_path, ["a", "b"], **overrides)
        self.server, port = create_server(self.config)
        self.server.start()
        self.federation = self.server.federation
        self.channel = channel(port)
        self.stub = fgrpc.FederationServiceStub(self.channel)

    def metadata(self, site: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[site]}"),)

    def unary(self, method: str, request: object, site: str = "a") -> tuple[object, object, str]:
        try:
            response = getattr(self.stub, method)(request, metadata=self.metadata(site),
                                                  timeout=10)
        except grpc.RpcError as error:
            return None, error.code(), error.details() or ""  # type: ignore[attr-defined]
        return response, grpc.StatusCode.OK, ""

    def upload(
        self, requests: list[pb.UploadFeaturesRequest], site: str = "a"
    ) -> tuple[fpb.UploadFeaturesResponse, grpc.StatusCode, str]:
        return self.unary("UploadFeatures", iter(requests), site)  # type: ignore[return-value]

    def stream(self, method: str, request: object, site: str = "a") -> tuple[list, object, str]:
        responses: list = []
        try:
            for response in getattr(self.stub, method)(request, metadata=self.metadata(site),
                                                       timeout=10):
                responses.append(response)
        except grpc.RpcError as error:
            return responses, error.code(), error.details() or ""  # type: ignore[attr-defined]
        return responses, grpc.StatusCode.OK, ""

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)


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
    # New uploads after the round closed are refused (an identical resend is ignored).
    assert harness.upload(_requests("a", 0)[:1])[1] is grpc.StatusCode.OK
    _, code, details = harness.upload(_requests("a", 2)[1:2])  # another chunk 0
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "ready" in details
