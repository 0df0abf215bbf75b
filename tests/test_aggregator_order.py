"""The aggregator's bank does not depend on how the sites' chunks interleave (issue 7, part 4)."""

from __future__ import annotations

import numpy as np
import pytest

from core.codec import CODEC_PRESETS, decode_matrix
from core.coreset import IncrementalCoreset
from core.federated.aggregator import GlobalBankAggregator, ServerSelection
from core.messages import FeatureChunk, SiteSummary
from core.serde import split_into_chunks

FINGERPRINT = "ab" * 32
CODEC = CODEC_PRESETS["lossless"]


def _uploads(seed: int = 0) -> dict[str, tuple[SiteSummary, list[FeatureChunk]]]:
    rng = np.random.default_rng(seed)
    uploads = {}
    for index, site in enumerate(["plant-b", "plant-a", "plant-c"]):
        rows = (rng.standard_normal((300 + 50 * index, 16)) + index).astype(np.float32)
        summary = SiteSummary(
            site_id=site, round=1, num_images=3, num_patches=rows.shape[0],
            coreset_rows=rows.shape[0], coverage_radius=0.5 + index, feature_dim=16,
            backbone="resnet18", layers=("layer2",), codec=CODEC, feature_fingerprint=FINGERPRINT,
        )
        pieces = split_into_chunks(
            rows, config=CODEC, site_id=site, round=1, max_chunk_bytes=16 * 4 * 64
        )
        chunks = list(pieces)
        uploads[site] = (summary, chunks)
    return uploads


def _bank(
    order: list[tuple[str, int]],
    buffer_rows: int | None = None,
    server_selection: ServerSelection = "farthest_first",
) -> np.ndarray:
    """Feed summaries first, then the chunks in ``order`` ((site, sequence) pairs)."""
    uploads = _uploads()
    aggregator = GlobalBankAggregator(
        40, seed=3, buffer_rows=buffer_rows, server_selection=server_selection
    )
    aggregator.begin_round(1)
    for summary, _ in uploads.values():
        aggregator.receive_summary(summary)
    for site, sequence in order:
        assert aggregator.receive_chunk(uploads[site][1][sequence])
    return aggregator.finish_round().bank


def _orders() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    uploads = _uploads()
    sequential = [(s, i) for s in sorted(uploads) for i in range(len(uploads[s][1]))]
    # Round-robin across sites, sites in reverse order: a different interleaving.
    interleaved = []
    longest = max(len(chunks) for _, chunks in uploads.values())
    for i in range(longest):
        for site in sorted(uploads, reverse=True):
            if i < len(uploads[site][1]):
                interleaved.append((site, i))
    assert sequential != interleaved and sorted(sequential) == sorted(interleaved)
    return sequential, interleaved


@pytest.mark.parametrize("server_selection", ["prefix", "farthest_first"])
def test_interleaving_does_not_change_the_bank(server_selection: ServerSelection) -> None:
    sequential, interleaved = _orders()
    first = _bank(sequential, server_selection=server_selection)
    second = _bank(interleaved, server_selection=server_selection)
    np.testing.assert_array_equal(first, second)


def test_without_canonical_order_the_bank_would_differ() -> None:
    """The property above is not vacuous: farthest-first on the raw arrival order differs."""
    uploads = _uploads()
    _, interleaved = _orders()
    selector = IncrementalCoreset(40, capacity=2000, seed=3)
    for site, sequence in interleaved:
        selector.add(decode_matrix(uploads[site][1][sequence].features, max_decoded_bytes=1 << 20))
    raw = selector.select().features
    assert not np.array_equal(raw, _bank(interleaved))


def test_reorder_rejects_a_non_permutation() -> None:
    selector = IncrementalCoreset(2, capacity=10)
    selector.add(np.arange(12, dtype=np.float32).reshape(4, 3))
    with pytest.raises(ValueError, match="permutation"):
        selector.reorder(np.array([0, 1, 1, 2]))
    selector.reorder(np.array([3, 2, 1, 0]))
    np.testing.assert_array_equal(
        selector.select(4).features, np.arange(12, dtype=np.float32).reshape(4, 3)[::-1]
    )


def test_beyond_the_buffer_the_order_is_no_longer_canonical(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sequential, _ = _orders()
    with caplog.at_level("WARNING", logger="core.federated.aggregator"):
        bank = _bank(sequential, buffer_rows=200)
    assert bank.shape == (40, 16)
    assert "depends on how uploads interleave" in caplog.text
