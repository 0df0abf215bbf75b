"""The spec's in-process federated API (shared/spec/federated-api.md), end to end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core.codec import CODEC_PRESETS
from core.data import AutoVIDataset, CategoryPartitioner, IIDPartitioner
from core.features import FeatureConfig
from core.federated import (
    CommunicationProtocol,
    FederatedPatchCore,
    FederatedServer,
    GlobalBankAggregator,
    PatchCoreClient,
    federated_coreset_aggregation,
    federated_random_aggregation,
    federated_weighted_union,
)
from core.federated.aggregator import IncompatibleSiteError, RoundStateError
from core.federated.communication import parse_upload
from core.federated.reservoir import WeightedReservoir
from core.knn import NearestNeighbourIndex
from core.messages import SiteSummary
from core.patchcore import FeatureMismatchError
from core.serde import ChunkOrderError


@pytest.fixture(scope="module")
def train_set(synthetic_root: Path) -> AutoVIDataset:
    return AutoVIDataset(synthetic_root, split="train")


@pytest.fixture(scope="module")
def test_set(synthetic_root: Path) -> AutoVIDataset:
    return AutoVIDataset(synthetic_root, split="test")


def test_basic_federated_training_example(
    synthetic_root: Path, small_features: FeatureConfig, tmp_path: Path, test_set: AutoVIDataset
) -> None:
    # The spec's "Basic Federated Training", as written but for the import path, the data root
    # and a small offline backbone.
    all_objects = list(AutoVIDataset(synthetic_root, split="train").categories)
    dataset = AutoVIDataset(root=synthetic_root, objects=all_objects, split="train")
    partitioner = CategoryPartitioner(num_clients=5)
    client_datasets = partitioner.partition(dataset)

    fed_model = FederatedPatchCore(num_clients=5, backbone=small_features, global_bank_size=150)
    fed_model.setup_clients(client_datasets)
    fed_model.train(num_rounds=1)
    fed_model.save(tmp_path / "outputs/federated/global_model.pt")

    assert fed_model.global_bank.shape == (150, 128)
    report = fed_model.reports[0]
    assert set(report.bytes_up) == {str(i) for i in range(5)}
    predictions = fed_model.predict(test_set)
    assert predictions.anomaly_maps.shape == (len(test_set), 64, 64)
    loaded = FederatedPatchCore.load(
        tmp_path / "outputs/federated/global_model.pt", pretrained=False
    )
    np.testing.assert_array_equal(loaded.predict(test_set).image_scores, predictions.image_scores)
    assert isinstance(loaded, FederatedPatchCore) and loaded.saved_federation is not None
    assert loaded.saved_federation["rounds"][0]["bytes_up"] == report.bytes_up  # type: ignore[index]
    np.testing.assert_array_equal(loaded.global_bank, fed_model.global_bank)
    # Fitted with random weights: a weights file is another extractor, refused on load.
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(weights))
    with pytest.raises(FeatureMismatchError, match="random init"):
        FederatedPatchCore.load(
            tmp_path / "outputs/federated/global_model.pt", weights=str(weights)
        )
    with pytest.raises(ValueError, match="no federation record"):
        FederatedPatchCore.load(
            fed_model.global_model.save(tmp_path / "plain.safetensors"), pretrained=False
        )


def test_manual_client_server_control_and_communication_examples(
    train_set: AutoVIDataset, small_features: FeatureConfig
) -> None:
    client_datasets = IIDPartitioner(num_clients=5, seed=0).partition(train_set)
    # "Manual Client/Server Control", as written (backbone aside)
    clients = []
    for i, client_data in enumerate(client_datasets):
        client = PatchCoreClient(
            client_id=i, dataset=client_data, backbone=small_features, coreset_percentage=0.1
        )
        clients.append(client)
    local_coresets = []
    for client in clients:
        coreset = client.train()
        local_coresets.append(coreset)
    server = FederatedServer(num_clients=5, global_bank_size=100)
    global_bank = server.aggregate(local_coresets, client_sizes=[c.data_size for c in clients])
    for client in clients:
        client.update_global_bank(global_bank)

    assert global_bank.shape == (100, 128)
    np.testing.assert_array_equal(server.get_global_model(), global_bank)
    for client, coreset in zip(clients, local_coresets, strict=True):
        np.testing.assert_array_equal(client.get_coreset(), coreset)
        np.testing.assert_array_equal(client.global_bank, global_bank)
        assert coreset.shape[0] == int(np.ceil(0.1 * client.data_size * 64))
    # the global bank is a subset of the union, chosen by farthest-first
    union = np.concatenate(local_coresets)
    distances, _ = NearestNeighbourIndex(union).search(global_bank, 1)
    assert distances.max() == pytest.approx(0.0, abs=1e-3)

    # "Communication Analysis": exact bytes of the serialized upload messages
    for coreset in local_coresets:
        cost = CommunicationProtocol.compute_communication_cost(coreset)
        messages = CommunicationProtocol.send_to_server(0, coreset)
        assert cost == sum(len(m) for m in messages)
        assert 0.2 * coreset.nbytes < cost < 0.6 * coreset.nbytes  # fp16 + zstd, not nbytes
        lossless = CommunicationProtocol.compute_communication_cost(
            coreset, codec=CODEC_PRESETS["lossless"]
        )
        assert cost < lossless
    global_cost = CommunicationProtocol.compute_communication_cost(global_bank)
    assert global_cost > 0


def test_rounds_report_bytes_and_a_certificate_that_holds(
    train_set: AutoVIDataset, small_features: FeatureConfig
) -> None:
    client_datasets = CategoryPartitioner(num_clients=3).partition(train_set)
    fed = FederatedPatchCore(
        num_clients=3, backbone=small_features, global_bank_size=150, coreset_percentage=0.3
    )
    fed.setup_clients(client_datasets)
    fed.train(num_rounds=2)
    first, second = fed.reports
    # round 1 moves the local coresets and the bank; round 2 only novel patches
    assert first.rows_up == {c.site_id: c.get_coreset().shape[0] for c in fed.clients}
    assert second.total_bytes_up < 0.2 * first.total_bytes_up
    assert first.total_bytes_down == 3 * first.bytes_down["0"] > 0
    # the certificate bounds every training patch's distance to the global bank
    index = NearestNeighbourIndex(fed.global_bank)
    worst = 0.0
    for client in fed.clients:
        for _, features, _ in client.model.iter_features(client.dataset):
            d, _ = index.search(features.reshape(-1, 128), 1)
            worst = max(worst, float(d.max()))
    last = fed.reports[-1]
    assert worst <= last.certificate + 1e-3
    assert last.realised_radius <= last.server_radius + 1e-3
    assert second.training_radius is not None
    assert second.training_radius <= first.certificate + 1e-3


def test_novel_round_uploads_exactly_the_patches_beyond_the_threshold(
    train_set: AutoVIDataset, small_features: FeatureConfig
) -> None:
    client = PatchCoreClient("site", train_set.subset(range(6)), small_features, 0.2)
    client.train()
    tiny_bank = client.get_coreset()[:5]
    upload = client.novel_features(tiny_bank, threshold=0.0)
    assert upload.num_novel > 0 and upload.features.shape[0] <= client.get_coreset().shape[0]
    none = client.novel_features(tiny_bank, threshold=upload.max_distance)
    assert none.num_novel == 0 and none.features.shape == (0, 128)


def test_coreset_strategy_streams_like_offline_greedy_and_ignores_weights() -> None:
    rng = np.random.default_rng(0)
    coresets = [rng.standard_normal((n, 32)).astype(np.float32) for n in (300, 120, 500)]
    bank = federated_coreset_aggregation(coresets, 200, seed=1)
    weighted = federated_coreset_aggregation(coresets, 200, [1.0, 50.0, 3.0], seed=1)
    np.testing.assert_array_equal(bank, weighted)
    from core.coreset import coverage_radius, greedy_coreset

    union = np.concatenate(coresets)
    offline = greedy_coreset(union, 200, seed=1)
    assert coverage_radius(union, bank) <= 1.25 * offline.radius  # type: ignore[operator]
    with pytest.raises(ValueError, match="feature dim"):
        federated_coreset_aggregation([coresets[0], coresets[1][:, :8]], 10)
    with pytest.raises(ValueError, match="client weights"):
        federated_coreset_aggregation(coresets, 10, [1.0, -1.0, 1.0])


def test_random_strategy_follows_client_weights() -> None:
    coresets = [np.full((1000, 4), i, dtype=np.float32) for i in range(2)]
    counts = np.zeros(2)
    for seed in range(20):
        bank = federated_random_aggregation(coresets, 100, [3.0, 1.0], seed=seed)
        assert bank.shape == (100, 4)
        counts += [np.sum(bank[:, 0] == 0), np.sum(bank[:, 0] == 1)]
    share = counts[0] / counts.sum()
    assert 0.70 < share < 0.80  # expected 0.75
    uniform = federated_random_aggregation(coresets, 100, None, seed=0)
    assert 30 < np.sum(uniform[:, 0] == 0) < 70


def test_weighted_union_keeps_everything_with_row_weights() -> None:
    coresets = [np.ones((4, 3), np.float32), np.zeros((1, 3), np.float32)]
    features, weights = federated_weighted_union(coresets, [1.0, 1.0])
    assert features.shape == (5, 3)
    np.testing.assert_allclose(weights, [0.125] * 4 + [0.5])


def test_reservoir_is_seeded_and_order_free_in_distribution() -> None:
    rows = np.arange(50, dtype=np.float32)[:, None]
    a = WeightedReservoir(10, seed=3)
    a.add(rows)
    b = WeightedReservoir(10, seed=3)
    b.add(rows)
    np.testing.assert_array_equal(a.sample(), b.sample())
    with pytest.raises(ValueError, match="> 0"):
        a.add(rows, 0.0)
    # Order-free in distribution: the same weighted rows arriving in another order and other
    # chunks are kept with the same probabilities. Row r (value r) has weight 1 + r % 4.
    weights = 1.0 + np.arange(12) % 4
    permutation = np.random.default_rng(0).permutation(12)
    trials, k = 3000, 3
    counts = {"in order": np.zeros(12), "permuted": np.zeros(12)}
    for trial in range(trials):
        forward = WeightedReservoir(k, seed=trial)
        forward.add(np.arange(12, dtype=np.float32)[:, None], weights)
        counts["in order"][forward.sample()[:, 0].astype(int)] += 1
        shuffled = WeightedReservoir(k, seed=trial)
        for part in np.array_split(permutation, 4):  # another order, in 4 chunks
            shuffled.add(part.astype(np.float32)[:, None], weights[part])
        counts["permuted"][shuffled.sample()[:, 0].astype(int)] += 1
    frequency = {name: c / trials for name, c in counts.items()}
    # binomial standard error <= sqrt(0.25 / 3000) ~ 0.009 per row: 0.045 is > 3.5 sigma of the
    # difference; a reservoir that kept, e.g., the first or last rows to arrive misses by > 0.3
    np.testing.assert_allclose(frequency["permuted"], frequency["in order"], atol=0.045)
    kept = frequency["in order"]
    assert kept[weights == 4].mean() > 1.5 * kept[weights == 1].mean()  # weights matter
    # k = 1: P(row r) = w_r / sum(w), exactly, whatever the order
    single = np.zeros(12)
    for trial in range(trials):
        one = WeightedReservoir(1, seed=trial)
        for part in np.array_split(permutation, 3):
            one.add(part.astype(np.float32)[:, None], weights[part])
        single[int(one.sample()[0, 0])] += 1
    np.testing.assert_allclose(single / trials, weights / weights.sum(), atol=0.03)


def _summary(
    site: str, rows: int, fingerprint: str = "ab" * 32, round_number: int = 1,
    radius: float = 0.5,
) -> SiteSummary:
    return SiteSummary(
        site_id=site,
        round=round_number,
        num_images=4,
        num_patches=1000,
        coreset_rows=rows,
        coverage_radius=radius,
        feature_dim=16,
        backbone="resnet18",
        layers=("layer2", "layer3"),
        codec=CODEC_PRESETS["fp16"],
        feature_fingerprint=fingerprint,
    )


def test_aggregator_is_idempotent_and_loses_nothing_on_bad_input() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 16)).astype(np.float32)
    aggregator = GlobalBankAggregator(50)
    aggregator.begin_round(1)
    messages = CommunicationProtocol.send_to_server(
        "a", rows, summary=_summary("a", 300), max_chunk_bytes=2048
    )
    items = parse_upload(messages)
    summary, chunks = items[0], items[1:]
    assert len(chunks) == 5
    with pytest.raises(RoundStateError, match="before the site's summary"):
        aggregator.receive_chunk(chunks[0])  # type: ignore[arg-type]
    aggregator.receive_summary(summary)  # type: ignore[arg-type]
    aggregator.receive_summary(summary)  # identical resend: ignored
    assert aggregator.receive_chunk(chunks[0]) is True  # type: ignore[arg-type]
    assert aggregator.receive_chunk(chunks[0]) is False  # type: ignore[arg-type]
    with pytest.raises(ChunkOrderError):
        aggregator.receive_chunk(chunks[2])  # type: ignore[arg-type]
    assert aggregator.next_sequence("a") == 1  # where the site resumes
    with pytest.raises(RoundStateError, match="incomplete"):
        aggregator.finish_round()
    for chunk in chunks[1:]:
        aggregator.receive_chunk(chunk)  # type: ignore[arg-type]
    with pytest.raises(IncompatibleSiteError, match="fingerprint"):
        aggregator.receive_summary(_summary("b", 10, fingerprint="cd" * 32))
    outcome = aggregator.finish_round()
    assert outcome.rows_received == {"a": 300}
    assert outcome.bank.shape == (50, 16)
    with pytest.raises(RoundStateError, match="expected round 2"):
        aggregator.begin_round(3)
    aggregator.begin_round(2)
    # A site unknown so far joins late (issue 21): its first summary's r_i enters the
    # certificate when the round closes.
    assert not aggregator.has_radius("new")
    late = CommunicationProtocol.send_to_server(
        "new", rows[:3] + 5.0, round_number=2,
        summary=_summary("new", 3, round_number=2, radius=9.5),
        max_chunk_bytes=2048,
    )
    for item in parse_upload(late):
        if isinstance(item, SiteSummary):
            aggregator.receive_summary(item)
        else:
            aggregator.receive_chunk(item)  # type: ignore[arg-type]
    assert aggregator.finish_round().max_site_radius == 9.5
    assert aggregator.has_radius("new")


def test_server_validates_its_arguments(small_features: FeatureConfig) -> None:
    with pytest.raises(ValueError, match="aggregation_strategy"):
        FederatedServer(aggregation_strategy="median")  # type: ignore[arg-type]
    server = FederatedServer(num_clients=2, global_bank_size=5)
    with pytest.raises(ValueError, match="expected 2 client coresets"):
        server.aggregate([np.zeros((3, 4), np.float32)])
    with pytest.raises(RuntimeError, match="no global bank"):
        server.get_global_model()
    fed = FederatedPatchCore(num_clients=2, backbone=small_features)
    with pytest.raises(RuntimeError, match="setup_clients"):
        fed.train()
    with pytest.raises(ValueError, match="expected 2 client datasets"):
        fed.setup_clients([])
    assert replace(small_features, init_seed=1).fingerprint() != small_features.fingerprint()


def test_a_bank_larger_than_the_uploads_is_announced_and_recorded_truthfully(
    train_set: AutoVIDataset,
    small_features: FeatureConfig,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sites = CategoryPartitioner(num_clients=3).partition(train_set)
    fed_model = FederatedPatchCore(num_clients=3, backbone=small_features, global_bank_size=10000)
    fed_model.setup_clients(sites)
    with caplog.at_level("WARNING", logger="core.federated.aggregator"):
        fed_model.train(num_rounds=1)
    uploaded = sum(fed_model.reports[0].rows_up.values())
    assert fed_model.global_bank.shape[0] == uploaded < 10000
    assert any("fewer than the 10000 asked for" in r.getMessage() for r in caplog.records)
    path = fed_model.save(tmp_path / "fed.safetensors")
    record = FederatedPatchCore.load(path, pretrained=False).saved_federation
    assert record is not None
    assert record["global_bank_size"] == uploaded
    assert record["requested_bank_size"] == 10000

    # the spec's direct aggregate() says so as well
    caplog.clear()
    rng = np.random.default_rng(0)
    coresets = [rng.standard_normal((30, 8)).astype(np.float32) for _ in range(2)]
    with caplog.at_level("WARNING", logger="core.federated.aggregator"):
        bank = FederatedServer(num_clients=2, global_bank_size=100).aggregate(coresets)
    assert bank.shape == (60, 8)
    assert any("fewer than the 100 asked for" in r.getMessage() for r in caplog.records)


def test_default_upload_is_twice_the_global_bank(
    train_set: AutoVIDataset, small_features: FeatureConfig
) -> None:
    from core.federated.federated_patchcore import UPLOAD_FACTOR

    parts = IIDPartitioner(num_clients=2, seed=0).partition(train_set)
    fed = FederatedPatchCore(num_clients=2, backbone=small_features, global_bank_size=100)
    assert fed.coreset_percentage is None
    fed.setup_clients(parts)
    assert fed.upload_budget is not None and fed.upload_budget.share == UPLOAD_FACTOR * 50
    fed.train(1)
    # every site sends ceil(2 x k / S) = 100 rows (each has more patches than that)
    assert fed.reports[0].rows_up == {"0": 100, "1": 100}
    assert fed.global_bank.shape == (100, 128)
    with pytest.raises(ValueError, match="coreset_percentage"):
        FederatedPatchCore(num_clients=2, backbone=small_features, coreset_percentage=1.5)
