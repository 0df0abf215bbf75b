"""The prefix-merge server selection (core.federated.prefix) and its place in the aggregator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.codec import CODEC_PRESETS
from core.coreset import coverage_radius, greedy_coreset
from core.federated import CommunicationProtocol, GlobalBankAggregator
from core.federated.aggregator import AggregationError
from core.federated.allocation import DEFAULT_FLOOR_FRACTION
from core.federated.communication import parse_upload
from core.federated.prefix import CapacityError, PrefixMergeSelector, prefix_separations
from core.knn import NearestNeighbourIndex
from core.messages import SiteSummary


def _sites(seed: int = 0) -> list[np.ndarray]:
    """Three sites of different diversity: a tight blob, a wide blob, a two-blob mixture."""
    rng = np.random.default_rng(seed)
    return [
        rng.normal(0.0, 0.3, size=(600, 12)).astype(np.float32),
        rng.normal(3.0, 1.5, size=(600, 12)).astype(np.float32),
        np.concatenate([rng.normal(-3.0, 0.5, size=(300, 12)),
                        rng.normal(6.0, 0.5, size=(300, 12))]).astype(np.float32),
    ]


def _upload(site: np.ndarray, fraction: float) -> np.ndarray:
    picks = greedy_coreset(site, math.ceil(fraction * len(site)), projection_dim=None).indices
    return site[picks]  # pick order


def test_separations_are_distances_to_earlier_rows() -> None:
    rows = np.random.default_rng(1).normal(size=(50, 5)).astype(np.float32)
    previous = rows[:20]
    sep, parent = prefix_separations(rows[20:], previous)
    for t in range(30):
        d = np.linalg.norm(rows[: 20 + t] - rows[20 + t], axis=1)
        assert sep[t] == pytest.approx(d.min(), rel=1e-4, abs=1e-5)
        assert parent[t] == int(d.argmin())
    first, parents = prefix_separations(rows[:3])
    assert math.isinf(first[0]) and parents[0] == -1


def test_prefix_merge_keeps_nested_prefixes_sized_by_diversity() -> None:
    sites = _sites()
    uploads = [_upload(s, 0.3) for s in sites]
    selector = PrefixMergeSelector(150, capacity=10_000)
    for i, upload in enumerate(uploads):
        selector.add(str(i), upload[:70])  # a site's stream continues across calls
        selector.add(str(i), upload[70:])
    chosen = selector.select()
    assert chosen.features.shape == (150, 12)
    assert sum(chosen.rows_kept.values()) == 150
    # The tight site needs fewer rows than the wide one to reach the common radius.
    assert chosen.rows_kept["0"] < chosen.rows_kept["1"]
    # Exact farthest-first picks have non-increasing separations: kept rows are prefixes.
    for i, upload in enumerate(uploads):
        kept = chosen.rows_kept[str(i)]
        np.testing.assert_array_equal(
            np.sort(chosen.features[[str(i) == s for s in _owners(chosen.rows_kept)]], axis=0),
            np.sort(upload[:kept], axis=0),
        )
    # r_S is exact over every uploaded row, so the certificate holds on every site patch.
    union = np.concatenate(uploads)
    assert chosen.radius_bound == pytest.approx(coverage_radius(union, chosen.features), rel=1e-4)
    for site, upload in zip(sites, uploads, strict=True):
        r_i = coverage_radius(site, upload)
        assert coverage_radius(site, chosen.features) <= r_i + chosen.radius_bound + 1e-4


def _owners(rows_kept: dict[str, int]) -> list[str]:
    """Site of each bank row: the bank keeps upload order (site by site)."""
    return [site for site, n in rows_kept.items() for _ in range(n)]


def test_prefix_merge_rejects_overflow_and_empty_selection() -> None:
    selector = PrefixMergeSelector(5, capacity=10)
    with pytest.raises(ValueError, match="nothing to select"):
        selector.select()
    selector.add("a", np.zeros((8, 3), np.float32))
    with pytest.raises(CapacityError, match="buffer of 10 rows"):
        selector.add("b", np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        selector.add("b", np.full((1, 3), np.nan, np.float32))


def _summary(site: str, rows: int) -> SiteSummary:
    return SiteSummary(
        site_id=site, round=1, num_images=4, num_patches=1000, coreset_rows=rows,
        coverage_radius=0.5, feature_dim=12, backbone="resnet18", layers=("layer2", "layer3"),
        codec=CODEC_PRESETS["lossless"], feature_fingerprint="ab" * 32,
    )


def test_aggregator_prefix_selection_over_the_wire_and_its_typed_errors() -> None:
    uploads = [_upload(s, 0.3) for s in _sites()]
    aggregator = GlobalBankAggregator(150)
    assert aggregator.server_selection == "prefix"
    aggregator.begin_round(1)
    reference = PrefixMergeSelector(150, capacity=10_000, floor_fraction=DEFAULT_FLOOR_FRACTION)
    for i, upload in enumerate(uploads):
        messages = CommunicationProtocol.send_to_server(
            str(i), upload, codec=CODEC_PRESETS["lossless"], summary=_summary(str(i), len(upload)),
            max_chunk_bytes=4096,
        )
        for item in parse_upload(messages):
            if isinstance(item, SiteSummary):
                aggregator.receive_summary(item)
            else:
                aggregator.receive_chunk(item)
        reference.add(str(i), upload)
    outcome = aggregator.finish_round()
    patches = {str(i): 1000 for i in range(len(uploads))}
    np.testing.assert_array_equal(outcome.bank, reference.select(num_patches=patches).features)
    assert outcome.server_radius == pytest.approx(
        reference.select(num_patches=patches).radius_bound)

    small = GlobalBankAggregator(10, buffer_rows=100)
    small.begin_round(1)
    small.receive_summary(_summary("a", 80))
    with pytest.raises(AggregationError, match="exceeds the server's buffer of 100 rows"):
        small.receive_summary(_summary("b", 30))
    with pytest.raises(ValueError, match="server_selection"):
        GlobalBankAggregator(10, server_selection="median")  # type: ignore[arg-type]


def test_direct_aggregate_uses_the_same_prefix_merge_as_the_rounds() -> None:
    from core.federated import FederatedServer, federated_prefix_aggregation

    uploads = [_upload(s, 0.3) for s in _sites()]
    reference = PrefixMergeSelector(150, capacity=10_000, floor_fraction=DEFAULT_FLOOR_FRACTION)
    for i, upload in enumerate(uploads):
        reference.add(str(i), upload)
    bank = FederatedServer(num_clients=3, global_bank_size=150).aggregate(uploads, [1, 2, 3])
    # Client sizes size the floors (in proportion: 1e6 x w / sum w patch counts).
    patches = {str(i): round(1e6 * w / 6) for i, w in enumerate([1, 2, 3])}
    np.testing.assert_array_equal(bank, reference.select(num_patches=patches).features)
    np.testing.assert_array_equal(bank, federated_prefix_aggregation(
        uploads, 150, [1, 2, 3], floor_fraction=DEFAULT_FLOOR_FRACTION))
    old = FederatedServer(3, 150, server_selection="farthest_first").aggregate(uploads)
    assert not np.array_equal(np.sort(old, axis=0), np.sort(bank, axis=0))


def test_a_later_round_adds_what_the_bank_covers_worst() -> None:
    """Round 2 rows are ranked by their distance to the bank the sites were sent: a far
    novel pattern displaces the least separated bank row and r_S stays exact."""
    uploads = [_upload(s, 0.3) for s in _sites()]
    selector = PrefixMergeSelector(150, capacity=10_000)
    for i, upload in enumerate(uploads):
        selector.add(str(i), upload)
    first = selector.select()
    # A novel patch 3 units beyond site 1's worst-covered upload, away from the bank: 3 from
    # the site's own upload (below every kept row's separation), far from the bank.
    index = NearestNeighbourIndex(first.features)
    distances, nearest = index.search(uploads[1], 1)
    worst = int(distances[:, 0].argmax())
    away = uploads[1][worst] - first.features[nearest[worst, 0]]
    novel = (uploads[1][worst] + 3.0 * away / np.linalg.norm(away))[None].astype(np.float32)
    assert np.linalg.norm(uploads[1] - novel, axis=1).min() <= 3.0 + 1e-4
    selector.start_round(first.features)
    selector.add("1", novel)
    second = selector.select()
    assert second.features.shape == (150, 12)
    assert any(np.array_equal(row, novel[0]) for row in second.features)
    union = np.concatenate([*uploads, novel])
    assert second.radius_bound == pytest.approx(coverage_radius(union, second.features), rel=1e-4)


def test_separations_and_radius_are_exact_far_from_the_origin() -> None:
    """At an offset of 1000 float32's |x|^2 - 2x.c + |c|^2 keeps no correct digit of a squared
    distance of about 1: separations and r_S must come from centred rows."""
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((300, 16)) * 0.5 + 1000.0).astype(np.float32)
    separations, _ = prefix_separations(rows)
    x = rows.astype(np.float64)
    for t in (1, 50, 299):
        expected = np.sqrt(((x[:t] - x[t]) ** 2).sum(1)).min()
        assert separations[t] == pytest.approx(expected, rel=1e-4)
    selector = PrefixMergeSelector(40, capacity=1000)
    selector.add("a", rows)
    chosen = selector.select()
    bank = chosen.features.astype(np.float64)
    exact = max(np.sqrt(((bank - row) ** 2).sum(1)).min() for row in x)
    assert chosen.radius_bound == pytest.approx(exact, rel=1e-4)
