"""Issue 18, "protocol truth": the certificate holds for what actually travels, the server checks
what it can, and the protocol's documented behaviour is what the server does.

* r_i covers the chunks a site really sends (the server's chunking, not 1 MiB);
* the header's r_S covers the bank a site holds after any delta path (chains and skips);
* a chunk must use its summary's codec;
* a bank of another federation (another state directory) is recognised and replaced;
* grpc.reflection.v1 lists the services, as v1alpha does.
"""

from __future__ import annotations

import logging
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
    site_rows,
    upload_messages,
)
from safetensors.numpy import load_file

from core.codec import CODEC_PRESETS, CodecConfig, decode_matrix
from core.federated import PatchCoreClient
from core.federated.aggregator import (
    CodecMismatchError,
    GlobalBankAggregator,
    SummaryConflictError,
)
from core.messages import FeatureChunk
from core.serde import (
    MAX_CHUNK_BYTES_LIMIT,
    bank_chunk_to_proto,
    split_into_chunks,
    upload_request_from_proto,
)
from fedclient.flower_app import site_upload
from fedclient.session import (
    BankDownload,
    ConnectionConfig,
    RoundConfig,
    SiteSession,
    UploadResult,
)
from fedclient.site import SiteOptions, _one_round
from fedpatchcore.v1 import features_pb2 as pb
from fedpatchcore.v1 import federation_pb2 as fpb
from fedserver.bankstore import BankStore
from fedserver.daemon import FedServer, create_server
from fedserver.errors import StateMismatchError
from fedserver.federation import Phase
from fedserver.journal import Journal
from fedserver.servicer import _header_responses

D = 32


def _row_errors(held: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Euclidean error of each held row against the true row [n] (float64)."""
    difference = held.astype(np.float64) - truth.astype(np.float64)
    return np.sqrt((difference * difference).sum(axis=1))


# -- 1. r_i is measured with the chunking that is sent --------------------------------------------


class _FakeImages:
    """Two "images"; the test replaces the fit, so they are never read."""

    def __len__(self) -> int:
        return 2

    def load_image(self, index: int) -> np.ndarray:
        raise AssertionError("not read")


def _fitted_client(coreset: np.ndarray, radius: float) -> PatchCoreClient:
    """A PatchCoreClient whose local fit produced ``coreset`` with coverage radius ``radius``."""
    client = PatchCoreClient("site-a", _FakeImages(), "resnet18")
    model = client.model

    def fit(_images: object) -> object:
        model.num_training_patches = coreset.shape[0] * 4
        model.set_memory_bank(coreset)
        model.coverage_radius = radius
        return model

    model.fit = fit  # type: ignore[method-assign]
    client.train()
    return client


def _two_cluster_coreset(dim: int, rows: int, split: int) -> np.ndarray:
    """[rows, dim]: rows before ``split`` near 0, the rest near 50 in every column. Cut at
    ``split`` each chunk spans one cluster (fine int8/int4 steps); a chunk holding both spans
    50 per column (coarse steps)."""
    rng = np.random.default_rng(3)
    coreset = rng.normal(0.0, 0.05, size=(rows, dim)).astype(np.float32)
    coreset[split:] += 50.0
    return coreset


class _RecordingSession:
    """What fedclient.site._one_round asks of a SiteSession, recording the upload."""

    site_id = "site-a"

    def __init__(self) -> None:
        self.uploaded: tuple[object, list[FeatureChunk]] | None = None

    def upload(self, summary: object, chunks: list[FeatureChunk]) -> UploadResult:
        self.uploaded = (summary, list(chunks))
        return UploadResult(round=1, chunks_total=len(chunks), committed_at_start=0,
                            chunks_sent=len(chunks), bytes_sent=1, attempts=1, seconds=0.0,
                            status=fpb.UploadStatus())

    def wait_until_ready(self, round_number: int, **_: object) -> fpb.RoundStatus:
        return fpb.RoundStatus(round=round_number, state=fpb.ROUND_STATE_READY, bank_version=1)

    def download_bank(self, **_: object) -> BankDownload:
        bank = np.zeros((4, 1024), dtype=np.float32)
        return BankDownload(bank=bank, version=1, round=1, base_version=0, delta=False,
                            rows_in_stream=4, rows_removed=0, server_radius=0.0,
                            max_site_radius=0.0, bytes_received=1, seconds=0.0)


def _round_config(codec: CodecConfig, max_chunk_bytes: int) -> RoundConfig:
    return RoundConfig(
        round=1, feature_fingerprint="", extractor=None, codec=codec,
        max_chunk_bytes=max_chunk_bytes, global_bank_size=4, max_rows_per_site=1 << 20,
        feature_dim=1024, deadline_unix_s=None, expected_sites=1, quorum=1,
        novelty_threshold=0.0, base_bank_version=0,
    )


@pytest.mark.parametrize("codec_name", ["int8", "int4"])
@pytest.mark.parametrize("path", ["fedclient-run", "flower"])
def test_site_radius_covers_the_chunks_sent_with_3_mib_chunks(
    codec_name: str, path: str, tmp_path: Path
) -> None:
    """r_i - (the float32 radius) >= the largest row error of the chunks as the server decodes
    them, with the largest chunks a server may ask for (3 MiB), on both site paths:
    ``fedclient run``'s round and the Flower ClientApp's upload."""
    codec = CODEC_PRESETS[codec_name]
    dim = 1024
    # 1 MiB of int8 is 1024 rows of D=1024 (int4: 2048): the default chunking would put each
    # cluster in chunks of its own and measure a small error; 3 MiB chunks mix both.
    split = (1 << 20) // dim * (2 if codec_name == "int4" else 1)
    coreset = _two_cluster_coreset(dim, split + 256, split)
    client = _fitted_client(coreset, radius=1.0)
    if path == "fedclient-run":
        session = _RecordingSession()
        options = SiteOptions(data=tmp_path, out_dir=tmp_path)
        _one_round(session, client, _round_config(codec, MAX_CHUNK_BYTES_LIMIT),  # type: ignore[arg-type]
                   None, options, None, lambda _line: None)
        assert session.uploaded is not None
        summary, chunks = session.uploaded
    else:
        items = [upload_request_from_proto(pb.UploadFeaturesRequest.FromString(m))
                 for m in site_upload(client, 1, codec, MAX_CHUNK_BYTES_LIMIT)]
        summary, chunks = items[0], items[1:]  # type: ignore[assignment]
    assert len(chunks) == 1  # one 3 MiB chunk holds both clusters
    decoded = np.concatenate([decode_matrix(c.features, max_decoded_bytes=MAX_CHUNK_BYTES_LIMIT)
                              for c in chunks])
    worst = float(_row_errors(decoded, coreset).max())
    assert worst > 0.5  # the mixed chunk quantises coarsely
    # (1e-9: the same error summed in another order)
    assert summary.coverage_radius - 1.0 >= worst - 1e-9  # type: ignore[attr-defined]


def test_summary_needs_the_chunk_size() -> None:
    """No default chunking can silently disagree with the chunks sent."""
    client = _fitted_client(_two_cluster_coreset(1024, 16, 8), radius=0.5)
    with pytest.raises(TypeError, match="max_chunk_bytes"):
        client.summary(1, 16, CODEC_PRESETS["int8"])  # type: ignore[call-arg]


# -- 3. a chunk must use its summary's codec ------------------------------------------------------


def _int4_chunks_declared_int8(site: str) -> tuple[object, list[FeatureChunk]]:
    """A summary that declares int8 (r_i computed for it) and chunks encoded as int4."""
    rows = site_rows(0, 40, D)
    summary, _ = upload_messages(site, rows, codec=CODEC_PRESETS["int8"])
    chunks = list(split_into_chunks(rows, config=CODEC_PRESETS["int4"], site_id=site, round=1,
                                    max_chunk_bytes=1 << 14))
    return summary, chunks


def test_aggregator_refuses_a_chunk_in_another_codec_than_its_summary() -> None:
    """The in-process API (and everything else that feeds GlobalBankAggregator)."""
    summary, chunks = _int4_chunks_declared_int8("a")
    aggregator = GlobalBankAggregator(10)
    aggregator.begin_round(1)
    aggregator.receive_summary(summary)  # type: ignore[arg-type]
    with pytest.raises(CodecMismatchError, match=r"encoded as 'int4', its SiteSummary "
                                                 r"declared 'int8'"):
        aggregator.receive_chunk(chunks[0])
    assert aggregator.next_sequence("a") == 0  # nothing was accepted
    # zstd_level (and byte_shuffle, the checksum type) change no decoded value: not compared.
    rows = site_rows(0, 40, D)
    releveled = CodecConfig("int8", byte_shuffle=False, zstd_level=9)
    for chunk in split_into_chunks(rows, config=releveled, site_id="a", round=1,
                                   max_chunk_bytes=1 << 14):
        assert aggregator.receive_chunk(chunk)
    summary, _ = upload_messages("b", rows)  # lossless: fp32 with byte shuffle
    aggregator.receive_summary(summary)
    unshuffled = CodecConfig("fp32", byte_shuffle=False)
    for chunk in split_into_chunks(rows, config=unshuffled, site_id="b", round=1,
                                   max_chunk_bytes=1 << 14):
        assert aggregator.receive_chunk(chunk)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[FedServer, int, dict[str, str]]]:
    config, tokens = make_config(tmp_path, ["a", "b"], feature_dim=D)
    fed, port = create_server(config)
    fed.start()
    yield fed, port, tokens
    fed.stop(0)


def test_daemon_refuses_a_chunk_in_another_codec_with_invalid_argument(
    server: tuple[FedServer, int, dict[str, str]],
) -> None:
    _, port, tokens = server
    summary, chunks = _int4_chunks_declared_int8("a")
    client = TestClient(port, "a", tokens["a"])
    try:
        with pytest.raises(grpc.RpcError) as error:
            client.upload([summary, *chunks])  # type: ignore[list-item]
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = error.value.details() or ""
        assert "encoded as 'int4'" in details and "declared 'int8'" in details
        assert client.status().committed_sequence == 0 and client.status().summary_committed
    finally:
        client.close()


def test_a_different_summary_or_chunk_resent_are_both_invalid_argument(
    server: tuple[FedServer, int, dict[str, str]],
) -> None:
    """A message that contradicts what the site already sent: INVALID_ARGUMENT, whether it is
    the summary or a chunk (the round being open)."""
    _, port, tokens = server
    summary, chunks = upload_messages("a", site_rows(0, 60, D))
    client = TestClient(port, "a", tokens["a"])
    try:
        client.upload([summary, chunks[0]])
        other_summary = upload_messages("a", site_rows(0, 61, D))[0]
        other_chunk = upload_messages("a", site_rows(9, 60, D))[1][0]
        for item, words in ((other_summary, "different summary"),
                            (other_chunk, "resent with different content")):
            with pytest.raises(grpc.RpcError) as error:
                client.upload([item])
            assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT, item
            assert words in (error.value.details() or "")
        with pytest.raises(grpc.RpcError) as error:
            client.upload([other_summary])
        assert "coreset_rows 60 -> 61" in (error.value.details() or "")
    finally:
        client.close()


def test_in_process_different_summary_is_a_summary_conflict() -> None:
    summary, _ = upload_messages("a", site_rows(0, 60, D))
    aggregator = GlobalBankAggregator(10)
    aggregator.begin_round(1)
    aggregator.receive_summary(summary)
    aggregator.receive_summary(summary)  # identical: ignored
    with pytest.raises(SummaryConflictError, match="coreset_rows 60 -> 61"):
        aggregator.receive_summary(upload_messages("a", site_rows(0, 61, D))[0])


# -- 2. r_S covers the bank a site holds after any delta path -------------------------------------


def _versions() -> list[np.ndarray]:
    """Three banks of k = 8 rows, D = 8, in stable order, built so that the skip v1 -> v3 puts
    far-apart rows in one int8 chunk (chunks of 4 rows) while every other stream does not:

        v1 = [K(2) R(6)]            all near 0
        v2 = [K(2) R'(4) B(2)]      R' = R[:4]; B near 0
        v3 = [K(2) B(2) C(4)]       C near 100 in every column

    full v3: [K B] [C]; delta v2 -> v3: [C]; delta v1 -> v3: [B C C] [C C]: spans 0..100.
    """
    rng = np.random.default_rng(7)

    def near(centre: float, rows: int) -> np.ndarray:
        return (centre + rng.normal(0.0, 0.02, size=(rows, 8))).astype(np.float32)

    k, r, b, c = near(0, 2), near(0, 6), near(0, 2), near(100, 4)
    return [np.concatenate(parts) for parts in ([k, r], [k, r[:4], b], [k, b, c])]


def _site_download(store: BankStore, session: SiteSession, version: int,
                   have: tuple[int, np.ndarray] | None) -> tuple[np.ndarray, float]:
    """What a site holds after DownloadBank(version, have_version), decoded by fedclient's own
    reader from the messages the servicer sends; and the header's r_S."""
    download = store.download(version, 0 if have is None else have[0])
    responses = [*_header_responses(download),
                 *(fpb.DownloadBankResponse(chunk=bank_chunk_to_proto(c))
                   for c in download.chunks)]
    result = session._read_bank(iter(responses), have, 100, time.perf_counter())
    assert result.base_version == (0 if have is None else have[0])
    return result.bank, download.header.server_coverage_radius


def test_server_radius_covers_delta_chains_and_skips_under_int8(tmp_path: Path) -> None:
    """The header's r_S (stored with r_S of the selection = 0, so all of it is codec error)
    bounds the row error of what a site holds, for every path to every version: full, the
    chain v1 -> v2 -> v3 and the skip v1 -> v3."""
    journal = Journal(tmp_path / "state")
    store = BankStore(journal, CODEC_PRESETS["int8"], "int8", max_chunk_bytes=32)
    versions = _versions()
    for number, bank in enumerate(versions, 1):
        assert store.store(number, bank, server_radius=0.0, max_site_radius=0.0)[0] == number
    session = SiteSession(ConnectionConfig("127.0.0.1:1"), "a")  # its reader only; no call
    try:
        paths: dict[str, tuple[np.ndarray, float]] = {}
        v1 = _site_download(store, session, 1, None)
        v2 = _site_download(store, session, 2, (1, v1[0]))
        paths["full v3"] = _site_download(store, session, 3, None)
        paths["chain v1 -> v2 -> v3"] = _site_download(store, session, 3, (2, v2[0]))
        paths["skip v1 -> v3"] = _site_download(store, session, 3, (1, v1[0]))
        paths["v1"], paths["v2 by delta"] = v1, v2
    finally:
        session.close()
    truth = {"v1": versions[0], "v2 by delta": versions[1]}
    errors = {}
    for name, (held, radius) in paths.items():
        worst = float(_row_errors(held, truth.get(name, versions[2])).max())
        errors[name] = worst
        assert worst <= radius, f"{name}: held rows are {worst:.4f} off, r_S says {radius:.4f}"
    # The skip is the path that needs the measured delta: its rows are far worse than a full
    # download's, and r_S is the same for every download of a version.
    assert errors["skip v1 -> v3"] > 10 * errors["full v3"]
    assert paths["skip v1 -> v3"][1] == paths["full v3"][1]
    journal.close()


def test_bank_streams_use_the_chunking_their_error_was_measured_with(tmp_path: Path) -> None:
    """A restart with another max_chunk_bytes does not change how a stored version travels
    (its r_S was measured for its own chunking)."""
    journal = Journal(tmp_path / "state")
    store = BankStore(journal, CODEC_PRESETS["int8"], "int8", max_chunk_bytes=32)
    store.store(1, _versions()[2], server_radius=0.0, max_site_radius=0.0)
    restarted = BankStore(journal, CODEC_PRESETS["int8"], "int8", max_chunk_bytes=1 << 20)
    stored = journal.load_bank(1)
    restarted.verify_replayed(1, 1, stored.bank)
    chunks = list(restarted.download(1).chunks)
    assert [c.features.rows for c in chunks] == [4, 4]
    journal.close()


# -- 8. federation id: a bank of another federation is replaced -----------------------------------


def _run_site_against(tmp_path: Path, name: str, out: Path, data: Path,
                      **overrides: object) -> tuple[dict[str, object], str, np.ndarray]:
    """One ``fedclient run`` round of site "a" against a fresh server (its own state
    directory): (metrics, the server's federation id, its bank as a full download decodes it)."""
    from fedclient.site import run_site
    from tests.conftest import SMALL_FEATURES

    config, tokens = make_config(tmp_path / name, ["a"], codec="int8", global_bank_size=20,
                                 **overrides)
    fed, port = create_server(config)
    fed.start()
    try:
        with SiteSession(ConnectionConfig(f"127.0.0.1:{port}", tokens["a"]), "a") as session:
            # a fixed 10 % (64 rows > k): sized from k, a lone site sends exactly k rows and
            # the "random" and "coreset" servers would have no choice between them
            options = SiteOptions(data=data, out_dir=out, features=SMALL_FEATURES,
                                  categories=("stripes",), overlays=False, report=False,
                                  coreset_percentage=0.1)
            metrics = run_site(session, options)
            full = session.download_bank()
        return metrics, fed.federation.federation_id, full.bank
    finally:
        fed.stop(0)


def test_a_bank_of_another_federation_is_replaced_not_kept_or_refused(
    tmp_path: Path, synthetic_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A site that saved bank version 1 of federation A meets server B (another state
    directory; its version 1 is another bank of the same size). int8 carries no bank checksum,
    so without the id B's empty delta "v1 -> v1" would leave A's bank in place unnoticed."""
    from core.patchcore import PatchCore

    out = tmp_path / "site-a"
    _, first_id, first_bank = _run_site_against(tmp_path, "A", out, synthetic_root)
    assert PatchCore.read_extra(out / "bank.safetensors")["federation_id"] == first_id
    caplog.set_level(logging.WARNING, logger="fedclient.site")
    metrics, second_id, second_bank = _run_site_against(tmp_path, "B", out, synthetic_root,
                                                        strategy="random")
    assert first_id != second_id and len(second_id) == 32
    assert not np.array_equal(first_bank, second_bank)  # the two version 1s differ
    saved = load_file(str(out / "bank.safetensors"))["memory_bank"]
    np.testing.assert_array_equal(saved, second_bank)
    assert metrics["rounds"][0]["bank_delta"] is False  # type: ignore[index]
    assert first_id in metrics["rounds"][0]["bank_replaced"]  # type: ignore[index]
    stale = [r.getMessage() for r in caplog.records if "is stale" in r.getMessage()]
    assert len(stale) == 1 and first_id in stale[0] and second_id in stale[0]
    assert PatchCore.read_extra(out / "bank.safetensors")["federation_id"] == second_id


def test_federation_id_is_kept_by_the_state_directory(tmp_path: Path) -> None:
    """Drawn once with the state directory, sent in RoundConfig and in every BankHeader, the
    same after a restart; a damaged id file stops the server with a message."""
    config, tokens = make_config(tmp_path, ["a"], feature_dim=D)
    fed, port = create_server(config)
    fed.start()
    try:
        client = TestClient(port, "a", tokens["a"])
        federation_id = client.join().config.federation_id
        summary, chunks = upload_messages("a", site_rows(0, 60, D))
        client.upload([summary, *chunks])
        fed.federation.wait_for(1, {Phase.READY}, timeout=60)
        assert client.download().header.federation_id == federation_id
        client.close()
    finally:
        fed.stop(0)
    assert (config.state_dir / "federation_id").read_text() == federation_id + "\n"
    fed, port = create_server(config)
    try:
        assert fed.federation.federation_id == federation_id
    finally:
        fed.stop(0)
    (config.state_dir / "federation_id").write_text("not-an-id\n")
    with pytest.raises(StateMismatchError, match="32 lowercase hex"):
        create_server(config)


# -- reflection v1 --------------------------------------------------------------------------------


def test_reflection_v1_lists_and_describes_the_services_without_a_token(tmp_path: Path) -> None:
    """What `grpcurl list` / `grpcurl describe` ask, through grpc.reflection.v1."""
    from google.protobuf import descriptor_pb2

    from fedpatchcore.reflection.v1 import reflection_pb2 as v1
    from fedpatchcore.reflection.v1 import reflection_pb2_grpc as v1_grpc

    config, _ = make_config(tmp_path, ["a"], max_exempt_streams_per_peer=2)
    fed, port = create_server(config)
    fed.start()
    try:
        with channel(port) as conn:  # no token
            stub = v1_grpc.ServerReflectionStub(conn)
            responses = list(stub.ServerReflectionInfo(iter([
                v1.ServerReflectionRequest(list_services=""),
                v1.ServerReflectionRequest(
                    file_containing_symbol="fedpatchcore.v1.FederationService"),
                v1.ServerReflectionRequest(
                    file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            ]), timeout=10))
            names = {s.name for s in responses[0].list_services_response.service}
            assert {"fedpatchcore.v1.FederationService", "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names
            files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                     for raw in responses[1].file_descriptor_response.file_descriptor_proto]
            services = {s.name for f in files for s in f.service}
            assert "FederationService" in services
            assert {f.package for f in files} >= {"fedpatchcore.v1"}
            v1_files = responses[2].file_descriptor_response.file_descriptor_proto
            assert descriptor_pb2.FileDescriptorProto.FromString(v1_files[0]).package == (
                "grpc.reflection.v1")
            # Token-exempt, so counted in the exempt stream budget: 2 per peer here.
            def idle() -> Iterator[v1.ServerReflectionRequest]:
                time.sleep(2)
                yield from ()

            held = [stub.ServerReflectionInfo(idle(), timeout=10) for _ in range(2)]
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as error:
                list(stub.ServerReflectionInfo(
                    iter([v1.ServerReflectionRequest(list_services="")]), timeout=10))
            assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("fedpatchcore-retry", "concurrency") in (
                error.value.trailing_metadata() or ())
            for call in held:
                list(call)
    finally:
        fed.stop(0)


def test_reflection_v1_messages_are_v1alpha_on_the_wire() -> None:
    """The v1 servicer is v1alpha's with v1alpha (de)serializers: safe because every message
    has the same fields, numbers, types and cardinality."""
    from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

    from fedpatchcore.reflection.v1 import reflection_pb2 as v1

    assert v1.DESCRIPTOR.package == "grpc.reflection.v1"
    assert set(v1.DESCRIPTOR.message_types_by_name) == set(v1alpha.DESCRIPTOR.message_types_by_name)
    for name, ours in v1.DESCRIPTOR.message_types_by_name.items():
        theirs = v1alpha.DESCRIPTOR.message_types_by_name[name]
        def shape(message: object) -> list[tuple[object, ...]]:
            return [(f.name, f.number, f.type, f.is_repeated, f.containing_oneof is not None)
                    for f in message.fields]  # type: ignore[attr-defined]

        assert shape(ours) == shape(theirs), name


# -- behaviour the docs describe ------------------------------------------------------------------


def test_refused_calls_with_a_valid_token_log_the_tokens_site(
    server: tuple[FedServer, int, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal's log line names the caller's site (from its token), not "site None"."""
    _, port, tokens = server
    caplog.set_level(logging.WARNING, logger="fedserver.servicer")
    client = TestClient(port, "b", tokens["b"])
    try:
        client.site = "a"  # b's token, a's name: PERMISSION_DENIED on every call
        calls = {
            "JoinRound": client.join,
            "QueryUploadStatus": client.status,
            "DownloadBank": client.download,
            "WatchRound": client.watch_until_done,
            "UploadFeatures": lambda: client.upload(
                [upload_messages("a", site_rows(0, 10, D))[0]]),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() is grpc.StatusCode.PERMISSION_DENIED, name
    finally:
        client.close()
    lines = [r.getMessage() for r in caplog.records if "PERMISSION_DENIED" in r.getMessage()]
    for name in calls:
        assert any(line.startswith(f"{name} from site b: ") for line in lines), (name, lines)
    assert not any("site None" in line for line in lines)


def test_unknown_bank_version_is_failed_precondition_until_a_bank_exists_then_not_found(
    server: tuple[FedServer, int, dict[str, str]],
) -> None:
    """As docs/protocol.md says: while no bank exists FAILED_PRECONDITION wins (the version
    may still come: watch the round); afterwards a version never built is NOT_FOUND."""
    fed, port, tokens = server
    client = TestClient(port, "a", tokens["a"])
    try:
        with pytest.raises(grpc.RpcError) as error:
            client.download(version=7)
        assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        for site, seed in (("a", 0), ("b", 1)):
            other = TestClient(port, site, tokens[site])
            summary, chunks = upload_messages(site, site_rows(seed, 60, D))
            other.upload([summary, *chunks])
            other.close()
        fed.federation.wait_for(1, {Phase.READY}, timeout=60)
        with pytest.raises(grpc.RpcError) as error:
            client.download(version=7)
        assert error.value.code() is grpc.StatusCode.NOT_FOUND
        assert "bank version 7 does not exist; the latest is 1" in (error.value.details() or "")
    finally:
        client.close()


def test_watch_round_sends_snapshots_and_may_skip_selecting(
    server: tuple[FedServer, int, dict[str, str]],
) -> None:
    """WatchRound sends the round's state when it changes, not every transition: a watch
    opened after the bank is ready gets one READY snapshot (SELECTING never shows)."""
    fed, port, tokens = server
    for site, seed in (("a", 0), ("b", 1)):
        client = TestClient(port, site, tokens[site])
        summary, chunks = upload_messages(site, site_rows(seed, 60, D))
        client.upload([summary, *chunks])
        client.close()
    fed.federation.wait_for(1, {Phase.READY}, timeout=60)
    client = TestClient(port, "a", tokens["a"])
    try:
        statuses = client.watch_until_done(1)
    finally:
        client.close()
    assert [s.state for s in statuses] == [fpb.ROUND_STATE_READY]
    assert statuses[0].bank_version == 1
