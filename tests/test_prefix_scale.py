"""The incremental prefix merge at federation scale (issue 16): its r_S certificate, its
determinism, its search structures and its device.

Streams here use small blocks (``block_rows``) and a small ``exhaustive_rows``, and D = 64 > the
projection's 32 dimensions, so that the projected cell search, the block boundaries and the
certificate's chain bounds and refinement are all exercised on a few thousand rows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.coreset import greedy_coreset
from core.federated import cells
from core.federated.cells import CellIndex, FlatIndex, smallest
from core.federated.coverage import chain_bounds
from core.federated.prefix import PrefixMergeSelector, prefix_separations, resolve_device

DIM = 64
SMALL = {"block_rows": 128, "exhaustive_rows": 200}


def _exact_radius(rows: np.ndarray, bank: np.ndarray) -> float:
    """max over ``rows`` of the distance to the nearest ``bank`` row, in float64 (reference)."""
    x, b = rows.astype(np.float64), bank.astype(np.float64)
    origin = b.mean(axis=0)
    x, b = x - origin, b - origin
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ b.T + (b * b).sum(1)[None, :]
    return float(np.sqrt(np.maximum(d2.min(axis=1), 0.0)).max())


def _clustered(seed: int, rows: int, clusters: int, spread: float,
               offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(clusters, DIM))
    labels = rng.integers(0, clusters, size=rows)
    x = centres[labels] + rng.normal(0.0, spread, size=(rows, DIM)) + offset
    return x.astype(np.float32)


def _feed(selector: PrefixMergeSelector, streams: dict[str, np.ndarray],
          chunks: int | list[int], order: str = "round-robin") -> None:
    """Add every site's stream in chunks; ``chunks`` is one size or a cycle of sizes."""
    sizes = [chunks] if isinstance(chunks, int) else chunks
    position = dict.fromkeys(streams, 0)
    sites = sorted(streams, reverse=order == "reversed")
    step = 0
    while any(position[s] < len(streams[s]) for s in sites):
        for site in sites:
            lo = position[site]
            if lo >= len(streams[site]):
                continue
            size = sizes[step % len(sizes)]
            step += 1
            selector.add(site, streams[site][lo : lo + size])
            position[site] = lo + size


def _scenario(name: str, seed: int) -> dict[str, np.ndarray]:
    if name == "sites":
        return {"a": _clustered(seed, 700, 12, 0.2), "b": _clustered(seed + 10, 500, 5, 0.6),
                "c": _clustered(seed + 20, 600, 30, 0.1)}
    if name == "single":
        return {"only": _clustered(seed, 1500, 20, 0.3)}
    if name == "duplicates":
        base = _clustered(seed, 300, 8, 0.3)
        rng = np.random.default_rng(seed)
        repeated = base[rng.integers(0, 300, size=900)]  # every row several times
        return {"a": np.concatenate([base, repeated]), "b": base[::-1].copy()}
    assert name == "far"
    return {"a": _clustered(seed, 800, 10, 0.05, offset=1000.0),
            "b": _clustered(seed + 1, 800, 10, 0.05, offset=1000.0)}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["sites", "single", "duplicates", "far"])
def test_reported_radius_bounds_every_uploaded_row(name: str, seed: int) -> None:
    streams = _scenario(name, seed)
    total = sum(len(s) for s in streams.values())
    selector = PrefixMergeSelector(total // 3, capacity=total, device="cpu", **SMALL)
    _feed(selector, streams, [97, 31, 256])
    chosen = selector.select()
    exact = _exact_radius(np.concatenate(list(streams.values())), chosen.features)
    assert chosen.radius_exact
    # Valid (up to float32 rounding of one norm, ~1e-7), and in fact the exact maximum.
    assert chosen.radius_bound >= exact * (1 - 1e-6)
    assert chosen.radius_bound == pytest.approx(exact, rel=1e-4, abs=1e-6)
    assert chosen.chain_radius >= chosen.radius_bound * (1 - 1e-6)
    assert sum(chosen.rows_kept.values()) == chosen.features.shape[0] == total // 3


def test_without_refinement_the_radius_is_still_a_bound_and_the_chain_bound_is_not_loose() -> None:
    """max_exact_rows=0: no full check, r_S is the largest bound left (tightened or chain),
    still >= the exact value; and the O(N) chain bound stays within 2.5 x of it on clustered
    rows (measured about 2 x on the scale workload and 1.8 x on resnet18 features)."""
    streams = {"a": _clustered(5, 1500, 40, 0.3), "b": _clustered(6, 1500, 40, 0.3)}
    selector = PrefixMergeSelector(1500, capacity=3000, device="cpu", max_exact_rows=0, **SMALL)
    _feed(selector, streams, 200)
    chosen = selector.select()
    exact = _exact_radius(np.concatenate(list(streams.values())), chosen.features)
    assert not chosen.radius_exact and chosen.exact_checks == 0
    assert exact * (1 - 1e-6) <= chosen.radius_bound <= chosen.chain_radius * (1 + 1e-6)
    assert chosen.chain_radius <= 2.5 * exact


def test_a_later_round_certifies_through_dropped_bank_rows() -> None:
    """Round 2 rows measured against the round-1 bank displace some of its rows; r_S covers
    every row of both rounds, through edge paths that end in the *new* bank."""
    first_streams = {"a": _clustered(1, 900, 15, 0.2), "b": _clustered(2, 900, 15, 0.2)}
    selector = PrefixMergeSelector(400, capacity=4000, device="cpu", **SMALL)
    _feed(selector, first_streams, 150)
    first = selector.select()
    selector.start_round(first.features)
    novel = {"a": _clustered(3, 600, 6, 0.5, offset=2.0), "b": _clustered(4, 500, 6, 0.5)}
    _feed(selector, novel, 150)
    second = selector.select()
    kept_before = {row.tobytes() for row in first.features}
    kept_now = {row.tobytes() for row in second.features}
    assert kept_before - kept_now, "some round-1 bank row should be dropped"
    assert kept_now - kept_before, "some round-2 row should be kept"
    union = np.concatenate([*first_streams.values(), *novel.values()])
    exact = _exact_radius(union, second.features)
    assert second.radius_bound >= exact * (1 - 1e-6)
    assert second.radius_bound == pytest.approx(exact, rel=1e-4)


def test_a_starting_bank_from_elsewhere_still_gives_a_valid_radius() -> None:
    """A start_round bank that is not this selector's last selection only serves separations
    (its rows are not uploaded rows, so no edge path may run through them)."""
    streams = {"a": _clustered(7, 800, 10, 0.3), "b": _clustered(8, 800, 10, 0.3)}
    selector = PrefixMergeSelector(300, capacity=2000, device="cpu", **SMALL)
    selector.start_round(_clustered(9, 300, 10, 0.3))
    _feed(selector, streams, 64)
    chosen = selector.select()
    exact = _exact_radius(np.concatenate(list(streams.values())), chosen.features)
    assert chosen.radius_bound == pytest.approx(exact, rel=1e-4)
    assert chosen.radius_bound >= exact * (1 - 1e-6)


def test_the_bank_depends_neither_on_interleaving_nor_on_chunk_boundaries() -> None:
    streams = _scenario("sites", 3)
    results = []
    for chunks, order in [(10_000, "round-robin"), ([13, 200, 77], "round-robin"),
                          ([128], "reversed"), ([5, 300], "reversed")]:
        selector = PrefixMergeSelector(600, capacity=2000, device="cpu", **SMALL)
        _feed(selector, streams, chunks, order)
        results.append(selector.select())
    for other in results[1:]:
        np.testing.assert_array_equal(other.features, results[0].features)
        assert other.radius_bound == results[0].radius_bound
        assert other.rows_kept == results[0].rows_kept


def test_selecting_mid_stream_changes_nothing_later() -> None:
    """A last partial block is processed provisionally for select(); when the stream goes
    on it is redone as a full block, so the final bank is as if select() was never called."""
    streams = {"a": _clustered(11, 3000, 60, 0.3), "b": _clustered(12, 2500, 60, 0.3)}
    plain = PrefixMergeSelector(2000, capacity=6000, device="cpu", **SMALL)
    _feed(plain, streams, 100)
    peeking = PrefixMergeSelector(2000, capacity=6000, device="cpu", **SMALL)
    _feed(peeking, {s: x[:1000] for s, x in streams.items()}, 100)  # 1,000 = 7 x 128 + 104
    peeking.select()
    peeking.finish_site("a")
    _feed(peeking, {s: x[1000:] for s, x in streams.items()}, 100)
    assert all(s.committed % SMALL["block_rows"] == 0 for s in peeking._streams)
    chosen, reference = peeking.select(), plain.select()
    np.testing.assert_array_equal(chosen.features, reference.features)
    assert chosen.chain_radius == reference.chain_radius
    np.testing.assert_array_equal(_canonical_separations(peeking),
                                  _canonical_separations(plain))


def _canonical_separations(selector: PrefixMergeSelector) -> np.ndarray:
    """Every uploaded row's separation, sites by id, each in upload order."""
    streams = sorted(selector._streams, key=lambda s: (s.site, s.epoch))
    assert selector._separations is not None
    return selector._separations[torch.cat([s.ids.view() for s in streams])].numpy()


def test_ties_go_to_the_smaller_site_id_then_upload_order() -> None:
    """Two sites upload the same stream: every separation is tied between them."""
    stream = _clustered(13, 500, 10, 0.3)
    selector = PrefixMergeSelector(301, capacity=1000, device="cpu", **SMALL)
    _feed(selector, {"b": stream, "a": stream.copy()}, 50, order="reversed")
    chosen = selector.select()
    assert chosen.rows_kept == {"a": 151, "b": 150}
    # The bank is site by site (a, then b), each in upload order; b keeps a's rows but the one
    # ranked 151st (same separations, the tie at each rank went to a).
    a_rows, b_rows = chosen.features[:151], chosen.features[151:]
    positions = [int(np.flatnonzero((stream == row).all(axis=1))[0]) for row in a_rows]
    assert positions == sorted(positions)
    b_keys = [row.tobytes() for row in b_rows]
    assert len(set(b_keys)) == 150 and set(b_keys) < {row.tobytes() for row in a_rows}


def test_separations_are_exact_distances_to_earlier_rows_and_rank_like_the_exact_ones() -> None:
    """Each separation is the exact distance to some earlier row (so >= the true one); on
    farthest-first uploads of low-dimensional structure (like CNN features) the approximate
    ranking keeps nearly the rows the exact ranking keeps, with about the same exact r_S."""
    rng = np.random.default_rng(14)
    sites = {}
    for name in ("a", "b"):
        latent = rng.normal(size=(3000, 4))
        embed = rng.normal(size=(4, DIM))
        patches = (np.tanh(latent @ embed) + 0.02 * rng.normal(size=(3000, DIM))).astype(
            np.float32)
        sites[name] = patches[greedy_coreset(patches, 1200, projection_dim=None).indices]
    selector = PrefixMergeSelector(1000, capacity=3000, device="cpu", **SMALL)
    _feed(selector, sites, 256)
    chosen = selector.select()
    exact_separations = np.concatenate([prefix_separations(sites[s])[0] for s in ("a", "b")])
    approximate = _canonical_separations(selector)
    finite = np.isfinite(exact_separations)
    assert np.array_equal(finite, np.isfinite(approximate))
    assert (approximate[finite] >= exact_separations[finite] * (1 - 1e-5)).all()
    assert np.mean(np.isclose(approximate[finite], exact_separations[finite], rtol=1e-4)) > 0.9
    union = np.concatenate([sites["a"], sites["b"]])
    exact_keep = np.sort(np.argsort(-exact_separations, kind="stable")[:1000])
    mine_keep = np.sort(np.argsort(-approximate, kind="stable")[:1000])
    assert np.intersect1d(exact_keep, mine_keep).size >= 950
    assert chosen.radius_bound <= 1.05 * _exact_radius(union, union[exact_keep])


def test_the_torch_path_runs_on_the_configured_device() -> None:
    selector = PrefixMergeSelector(50, capacity=500, device="cpu", **SMALL)
    assert selector.device == torch.device("cpu")
    selector.add("a", _clustered(15, 300, 5, 0.3))
    assert selector._rows is not None and selector._rows.device.type == "cpu"
    assert selector.select().features.dtype == np.float32
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected == resolve_device(None).type
    assert PrefixMergeSelector(5, capacity=10).device.type == expected


def test_the_gpu_configuration_runs_on_cpu_tensors() -> None:
    """What a GPU runs (every stream, start bank and bank searched exhaustively), on the CPU:
    the same certificate, and the ranking it gives is at least as close to the exact one."""
    streams = _scenario("sites", 5)
    total = sum(len(s) for s in streams.values())
    exhaustive = PrefixMergeSelector(600, capacity=4 * total, device="cpu", block_rows=128,
                                     exhaustive_rows=10**6)
    _feed(exhaustive, streams, 100)
    first = exhaustive.select()
    exhaustive.start_round(first.features)
    later = {"a": _clustered(21, 400, 4, 0.4, offset=1.5)}
    _feed(exhaustive, later, 100)
    chosen = exhaustive.select()
    union = np.concatenate([*streams.values(), *later.values()])
    exact = _exact_radius(union, chosen.features)
    assert chosen.radius_bound == pytest.approx(exact, rel=1e-4)
    assert chosen.radius_bound >= exact * (1 - 1e-6)


def test_gpu_selection_is_certified(cuda_device: torch.device) -> None:
    streams = _scenario("sites", 4)
    selector = PrefixMergeSelector(500, capacity=2000, device=cuda_device, **SMALL)
    _feed(selector, streams, 100)
    chosen = selector.select()
    exact = _exact_radius(np.concatenate(list(streams.values())), chosen.features)
    assert chosen.radius_bound == pytest.approx(exact, rel=1e-4)


def test_smallest_matches_topk_and_cell_search_matches_brute_force(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(300, 1000, generator=generator)
    for r in (1, 4, 9):
        got_v, got_i = smallest(values, r)
        want_v, _ = values.topk(r, dim=1, largest=False)
        torch.testing.assert_close(got_v, want_v)
        torch.testing.assert_close(values.gather(1, got_i), want_v)
    short_v, _ = smallest(values[:, :3], 5)
    assert torch.isinf(short_v[:, 3:]).all()
    members = torch.randn(700, 8, generator=generator)
    queries = torch.randn(50, 8, generator=generator)
    squared = (members * members).sum(1)
    monkeypatch.setattr(cells, "_MEMBER_BLOCK", 96)  # several member blocks, one short
    got_v, got_i = cells.exhaustive_topk(queries, members, squared, 6)
    want_v, _ = torch.addmm(squared, queries, members.T, alpha=-2.0).topk(6, largest=False)
    torch.testing.assert_close(got_v, want_v)
    torch.testing.assert_close(torch.addmm(squared, queries, members.T, alpha=-2.0).gather(
        1, got_i), want_v)
    points = torch.randn(2000, 8, generator=generator)
    ids = torch.arange(2000) * 10
    queries = torch.randn(100, 8, generator=generator)
    index = CellIndex(points[:1500], ids[:1500], num_cells=40, probes=40)  # every cell
    index.extend(points[1500:], ids[1500:])
    flat = FlatIndex(points, ids)
    cell_v, cell_ids = index.search(queries, 5)
    flat_v, flat_ids = flat.search(queries, 5)
    torch.testing.assert_close(cell_v, flat_v, rtol=1e-4, atol=1e-4)
    assert torch.equal(cell_ids, flat_ids)
    few_v, few_ids = CellIndex(points, ids, num_cells=40, probes=3).search(queries, 5)
    assert ((few_ids % 10) == 0).all() and (few_v >= flat_v - 1e-4).all()


def test_chain_bounds_are_shortest_edge_paths_to_the_bank() -> None:
    """Rows 0..4 in a line, bank = {0}; edges 1-0 (1.0), 2-1 (1.0), 3-2 (1.0), 3-0 (2.5) and
    4 -> nothing: bounds 0, 1, 2, 2.5, inf (both edge directions count)."""
    edges = torch.tensor([[-1, -1], [0, -1], [1, -1], [2, 0], [-1, -1]])
    lengths = torch.tensor([[math.inf] * 2, [1.0, math.inf], [1.0, math.inf], [1.0, 2.5],
                            [math.inf] * 2])
    bounds, sweeps = chain_bounds(5, torch.tensor([0]), edges, lengths)
    assert bounds.tolist()[:4] == [0.0, 1.0, 2.0, 2.5] and math.isinf(bounds[4])
    reverse, _ = chain_bounds(5, torch.tensor([2]), edges, lengths)  # bank = {2}: via 1 -> 0
    assert reverse.tolist()[:4] == [2.0, 1.0, 0.0, 1.0]
    assert sweeps <= 4
