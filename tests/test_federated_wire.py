"""The federated path over real wire messages: lossy codecs and the certificate, both
strategies through ``train_round``, site scoring, byte counts and typed errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from core.codec import CODEC_PRESETS
from core.data import AutoVIDataset, CategoryPartitioner
from core.features import FeatureConfig
from core.federated import (
    CommunicationProtocol,
    FederatedPatchCore,
    GlobalBankAggregator,
    PatchCoreClient,
)
from core.federated.aggregator import UploadSizeMismatchError
from core.federated.communication import parse_upload, receive_bank
from core.knn import NearestNeighbourIndex
from core.messages import InvalidMessageError, SiteSummary
from core.patchcore import PatchCore, PatchCoreConfig
from core.serde import IncompleteUploadError, chunked_roundtrip


@pytest.fixture(scope="module")
def train_set(synthetic_root: Path) -> AutoVIDataset:
    """6 training images of each of the 3 categories (the whole set is 12 each): fast."""
    full = AutoVIDataset(synthetic_root, split="train")
    return full.subset([i for i, s in enumerate(full) if s.image_path.stem < "006"])


@pytest.fixture(scope="module")
def test_set(synthetic_root: Path) -> AutoVIDataset:
    return AutoVIDataset(synthetic_root, split="test")


@pytest.fixture(scope="module")
def training_patches(train_set: AutoVIDataset) -> dict[str, np.ndarray]:
    """Every training patch of every site of the 3-site category split, [n_i, 128] each."""
    from conftest import SMALL_FEATURES

    datasets = CategoryPartitioner(num_clients=3).partition(train_set)
    extractor = PatchCore(PatchCoreConfig(features=SMALL_FEATURES))
    return {
        str(i): torch.cat(
            [f.reshape(-1, 128) for _, f, _ in extractor.iter_features(dataset)]
        ).numpy()
        for i, dataset in enumerate(datasets)
    }


def _worst_distance(bank: np.ndarray, patches: dict[str, np.ndarray]) -> float:
    index = NearestNeighbourIndex(bank)
    return max(float(index.search(p, 1)[0].max()) for p in patches.values())


@pytest.mark.parametrize("codec", sorted(CODEC_PRESETS))
def test_certificate_holds_for_the_decoded_bank_under_every_codec(
    codec: str,
    train_set: AutoVIDataset,
    small_features: FeatureConfig,
    training_patches: dict[str, np.ndarray],
) -> None:
    # A bank as large as the union: r_S is (nearly) 0 and the codec's error is all that
    # separates a training patch from the bank, so an uncorrected r_i is exceeded.
    fed = FederatedPatchCore(
        num_clients=3, backbone=small_features, global_bank_size=2000,
        coreset_percentage=0.1, codec=CODEC_PRESETS[codec],
    )
    fed.setup_clients(CategoryPartitioner(num_clients=3).partition(train_set))
    for round_number in (1, 2):
        fed.train(num_rounds=1)
        report = fed.reports[-1]
        bank = fed.global_bank
        # what the sites score with is what the wire delivered
        for client in fed.clients:
            np.testing.assert_array_equal(client.global_bank, bank)
        worst = _worst_distance(bank, training_patches)
        assert worst <= report.certificate * (1 + 1e-5), (codec, round_number)
        # each bound holds on its own: uploaded rows (decoded) within r_S of the decoded bank
        assert report.realised_radius <= report.server_radius * (1 + 1e-5) + 1e-6
    lossless = codec == "lossless"
    for client in fed.clients:
        error = client.decoded_coverage_radius(CODEC_PRESETS[codec]) - client.coverage_radius
        assert (error == 0.0) if lossless else (error > 0.0)


def _decoded_union(clients: list[PatchCoreClient], codec_name: str) -> np.ndarray:
    codec = CODEC_PRESETS[codec_name]
    return np.concatenate([chunked_roundtrip(c.get_coreset(), config=codec)[0] for c in clients])


def test_random_strategy_through_train_round(
    train_set: AutoVIDataset, small_features: FeatureConfig
) -> None:
    fed = FederatedPatchCore(
        num_clients=3, backbone=small_features, global_bank_size=40,
        coreset_percentage=0.2, aggregation_strategy="random",
    )
    fed.setup_clients(CategoryPartitioner(num_clients=3).partition(train_set))
    fed.train(num_rounds=1)
    first = fed.reports[0]
    assert fed.global_bank.shape == (40, 128)
    # random sampling certifies nothing, and says so
    assert first.server_radius == np.inf and first.certificate == np.inf
    assert 0.0 < first.realised_radius < np.inf
    # every bank row is one of the rows the sites uploaded, as decoded (fp16 round trip)
    union = _decoded_union(fed.clients, "fp16")
    distances, _ = NearestNeighbourIndex(union).search(fed.global_bank, 1)
    assert distances.max() == pytest.approx(0.0, abs=1e-5)
    assert len({row.tobytes() for row in fed.global_bank}) == 40  # without replacement
    # round 2 looks for patches beyond the realised radius (no r_S to use) and reports them
    fed.train(num_rounds=1)
    second = fed.reports[1]
    assert set(second.num_novel) == {"0", "1", "2"}
    assert second.training_radius is not None and second.training_radius > 0
    assert sum(second.rows_up.values()) <= sum(second.num_novel.values())
    assert (second.total_bytes_down > 0) == second.bank_changed


def test_client_predict_scores_with_its_coreset_then_the_global_bank(
    train_set: AutoVIDataset, test_set: AutoVIDataset, small_features: FeatureConfig
) -> None:
    client = PatchCoreClient("site", train_set, small_features, coreset_percentage=0.2)
    coreset = client.train()
    test = test_set.subset(range(6))
    local = client.predict(test)
    assert local.image_scores.shape == (6,) and local.anomaly_maps.shape == (6, 64, 64)
    reference = PatchCore(PatchCoreConfig(features=small_features))
    reference.set_memory_bank(coreset)
    np.testing.assert_allclose(local.image_scores, reference.predict(test).image_scores, rtol=1e-6)
    # a training image scores within the site's coverage radius of its own coreset
    assert client.predict(train_set.subset([0])).image_scores[0] <= client.coverage_radius + 1e-4
    # after a global bank arrives, the site scores with it
    global_bank = coreset[::3].copy()
    client.update_global_bank(global_bank)
    after = client.predict(test)
    reference.set_memory_bank(global_bank)
    np.testing.assert_allclose(after.image_scores, reference.predict(test).image_scores, rtol=1e-6)
    assert (after.image_scores >= local.image_scores - 1e-5).all()  # a subset covers no better
    assert not np.allclose(after.image_scores, local.image_scores)


def test_communication_cost_is_bytes_for_arrays_tensors_and_lists() -> None:
    rng = np.random.default_rng(0)
    coresets = [rng.standard_normal((100, 64)).astype(np.float32) for _ in range(2)]
    each = [CommunicationProtocol.compute_communication_cost(c) for c in coresets]
    for cost, coreset in zip(each, coresets, strict=True):
        assert cost == sum(len(m) for m in CommunicationProtocol.send_to_server(0, coreset))
    # a list of coresets: the sum of their uploads (it was the row count, 200)
    assert CommunicationProtocol.compute_communication_cost(coresets) == sum(each) > 200
    tensor = torch.from_numpy(coresets[0])
    assert CommunicationProtocol.compute_communication_cost(tensor) == each[0]
    assert CommunicationProtocol.compute_communication_cost([tensor, coresets[1]]) == sum(each)
    messages = CommunicationProtocol.send_to_server(0, coresets[0])
    assert CommunicationProtocol.compute_communication_cost(messages) == each[0]
    assert CommunicationProtocol.compute_communication_cost(messages[0]) == len(messages[0])
    lossless = CommunicationProtocol.compute_communication_cost(
        coresets, codec=CODEC_PRESETS["lossless"]
    )
    assert lossless > sum(each)
    for bad in ("abc", {"a": coresets[0]}, 3, None, [1, 2], [coresets[0], "x"]):
        with pytest.raises(TypeError, match="compute_communication_cost"):
            CommunicationProtocol.compute_communication_cost(bad)  # type: ignore[arg-type]


def test_garbage_and_empty_streams_raise_the_projects_typed_errors() -> None:
    truncated = b"\x0a\xff\x01"  # field 1, length 255, 1 byte of it
    with pytest.raises(InvalidMessageError, match="message 0 is not a serialized"):
        parse_upload([truncated])
    with pytest.raises(IncompleteUploadError, match="empty"):
        receive_bank([], max_rows=10)
    with pytest.raises(InvalidMessageError, match="BankChunk"):
        receive_bank([truncated], max_rows=10)
    assert issubclass(InvalidMessageError, ValueError)


def _summary(site: str, rows: int) -> SiteSummary:
    return SiteSummary(
        site_id=site, round=1, num_images=4, num_patches=1000, coreset_rows=rows,
        coverage_radius=0.5, feature_dim=16, backbone="resnet18", layers=("layer2", "layer3"),
        codec=CODEC_PRESETS["fp16"], feature_fingerprint="ab" * 32,
    )


def test_aggregator_refuses_fewer_rows_than_declared_and_keeps_what_it_accepted() -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((300, 16)).astype(np.float32)
    aggregator = GlobalBankAggregator(50)
    aggregator.begin_round(1)
    for item in parse_upload(CommunicationProtocol.send_to_server("a", rows, summary=_summary(
        "a", 300
    ))):
        aggregator.receive_summary(item) if isinstance(item, SiteSummary) else (
            aggregator.receive_chunk(item)
        )
    # "b" declares 1000 rows and ends its upload after 10 (5-row chunks)
    short = parse_upload(CommunicationProtocol.send_to_server(
        "b", rows[:10], summary=_summary("b", 1000), max_chunk_bytes=160
    ))
    aggregator.receive_summary(short[0])  # type: ignore[arg-type]
    assert aggregator.receive_chunk(short[1]) is True  # type: ignore[arg-type]
    with pytest.raises(UploadSizeMismatchError, match=r"declared 1000 rows .* at 10 rows"):
        aggregator.receive_chunk(short[2])  # type: ignore[arg-type]
    assert aggregator.next_sequence("b") == 1  # the refused chunk changed nothing
    # "c" declares 20 and sends 10 with last = True, then resumes with the right stream
    aggregator.receive_summary(_summary("c", 20))
    wrong = parse_upload(CommunicationProtocol.send_to_server("c", rows[:10], max_chunk_bytes=160))
    aggregator.receive_chunk(wrong[0])  # type: ignore[arg-type]
    with pytest.raises(UploadSizeMismatchError):
        aggregator.receive_chunk(wrong[1])  # type: ignore[arg-type]
    right = parse_upload(CommunicationProtocol.send_to_server("c", rows[:20], max_chunk_bytes=160))
    assert [aggregator.receive_chunk(c) for c in right] == [False, True, True, True]  # type: ignore[arg-type]
    with pytest.raises(Exception, match="incomplete"):
        aggregator.finish_round()  # "b" never completed: the round cannot close on it
    assert aggregator.next_sequence("a") == 1 and aggregator.next_sequence("c") == 4


def test_bank_is_rebroadcast_only_when_its_rows_change(
    train_set: AutoVIDataset, small_features: FeatureConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # farthest_first: its r_S is a bound above the exact radius, so round 2 has novel rows to
    # send here (with the prefix merge's exact r_S this data leaves none).
    fed = FederatedPatchCore(
        num_clients=3, backbone=small_features, global_bank_size=30, coreset_percentage=0.2,
        server_selection="farthest_first",
    )
    fed.setup_clients(CategoryPartitioner(num_clients=3).partition(train_set))
    fed.train(num_rounds=1)
    held = [c.global_bank for c in fed.clients]
    server = fed.server
    real_finish = server.aggregator.finish_round

    def same_rows_reordered(expected_sites: int | None = None):  # type: ignore[no-untyped-def]
        # The uploads still arrive and are consumed; the selection comes out as the same rows
        # in another order, which is no change for the sites.
        outcome = real_finish(expected_sites=expected_sites)
        assert server._sent_bank is not None
        return replace(outcome, bank=server._sent_bank[::-1].copy())

    monkeypatch.setattr(server.aggregator, "finish_round", same_rows_reordered)
    fed.train(num_rounds=1)
    second = fed.reports[1]
    assert sum(second.rows_up.values()) > 0  # rows did arrive ...
    assert not second.bank_changed and second.total_bytes_down == 0  # ... nothing went down
    for client, bank in zip(fed.clients, held, strict=True):
        assert client.global_bank is bank
    monkeypatch.undo()
    fed.train(num_rounds=1)  # the real selection over the new rows changes the bank
    third = fed.reports[2]
    assert third.bank_changed and third.total_bytes_down > 0
