"""Issue 17: the bank's allocation between sites (core.federated.allocation) -- every site gets
a floor, the rest follows coverage, an optional cap per site, the flooding flag -- in the
selector, the in-process API and through the gRPC daemon."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from fedserver_testing import TestClient, make_config, upload_messages

from core.federated import FederatedServer
from core.federated.allocation import (
    DEFAULT_FLOOR_FRACTION,
    SiteAllocation,
    allocate,
    flooding,
)
from core.federated.prefix import PrefixMergeSelector, prefix_separations
from fedserver.daemon import create_server
from fedserver.federation import Phase

D = 32


def _clustered(seed: int, rows: int, centres: int, spread: float = 0.05,
               scale: float = 3.0) -> np.ndarray:
    """[rows, D]: ``centres`` cluster centres (scale x N(0, 1)) with ``spread`` noise around
    them, shuffled: a site whose features are compact when ``centres`` is small."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(0.0, scale, size=(centres, D))
    picks = rng.integers(0, centres, size=rows)
    return (middle[picks] + rng.normal(0.0, spread, size=(rows, D))).astype(np.float32)


def _selector(uploads: dict[str, np.ndarray], k: int, **options: object) -> PrefixMergeSelector:
    selector = PrefixMergeSelector(k, capacity=sum(len(u) for u in uploads.values()),
                                   device="cpu", block_rows=64, **options)  # type: ignore[arg-type]
    for site, rows in uploads.items():
        selector.add(site, rows)
    return selector


def _uploads() -> dict[str, np.ndarray]:
    """A compact site beside two diverse ones, 200 rows each."""
    return {"compact": _clustered(1, 200, 3, spread=0.02),
            "diverse-1": _clustered(2, 200, 60), "diverse-2": _clustered(3, 200, 60)}


def _rows_of(bank: np.ndarray, rows: np.ndarray) -> int:
    """How many rows of ``bank`` are rows of ``rows`` (exact matches)."""
    mine = {r.tobytes() for r in rows}
    return sum(r.tobytes() in mine for r in bank)


def test_floor_is_honoured_with_the_sites_own_most_separated_rows() -> None:
    uploads = _uploads()
    k, patches = 90, {s: 1000 for s in uploads}
    old = _selector(uploads, k).select(num_patches=patches)
    assert old.rows_kept["compact"] < 5  # the k-center rule starves it
    selection = _selector(uploads, k, floor_fraction=0.2).select(num_patches=patches)
    floor = math.ceil(0.2 * k * 1000 / 3000)
    by_site = {a.site_id: a for a in selection.allocation}
    assert by_site["compact"].floor == floor
    assert selection.rows_kept["compact"] >= floor
    assert sum(selection.rows_kept.values()) == k
    assert by_site["compact"].proportional == pytest.approx(30.0)
    # The floor is the site's rows of largest own separation, not the first rows it sent:
    # reversing its upload order changes which rows those are, not the rule.
    separations, _ = prefix_separations(uploads["compact"])
    top = uploads["compact"][np.argsort(-separations, kind="stable")[: selection.rows_kept[
        "compact"]]]
    assert _rows_of(selection.features, top) == selection.rows_kept["compact"]


def test_floor_is_capped_by_the_upload_and_max_site_share_caps_every_site() -> None:
    uploads = _uploads()
    uploads["compact"] = uploads["compact"][:4]  # fewer rows than its floor
    k, patches = 90, {s: 1000 for s in uploads}
    selection = _selector(uploads, k, floor_fraction=0.5).select(num_patches=patches)
    compact = next(a for a in selection.allocation if a.site_id == "compact")
    assert compact.floor == 4 and compact.kept == 4 and compact.whole_upload_kept

    capped = _selector(_uploads(), k, floor_fraction=0.1, max_site_share=0.4).select(
        num_patches=patches)
    assert max(capped.rows_kept.values()) <= int(0.4 * k)
    assert sum(capped.rows_kept.values()) == k  # the compact site's rows fill the room
    assert any(a.capped for a in capped.allocation)
    assert all(a.cap == 36 for a in capped.allocation)


def test_floors_beyond_k_are_cut_by_separation_and_nothing_needs_all_sites() -> None:
    separations = torch_tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    site_of = torch_tensor([0, 0, 1, 1, 2, 2], integer=True)
    keep, allocation = allocate(separations, site_of, ["a", "b", "c"], 2,
                                num_patches={"a": 1, "b": 1, "c": 1}, floor_fraction=1.0)
    assert keep.tolist() == [0, 2]  # the floor rows (one per site), largest separations first
    assert [a.floor for a in allocation] == [1, 1, 1]
    with pytest.raises(ValueError, match="num_patches"):
        allocate(separations, site_of, ["a", "b", "c"], 2, floor_fraction=0.1)
    with pytest.raises(ValueError, match="max_site_share"):
        allocate(separations, site_of, ["a", "b", "c"], 2, max_site_share=0.0)


def torch_tensor(values: list[float], *, integer: bool = False) -> object:
    import torch

    return torch.tensor(values, dtype=torch.int64 if integer else torch.float32)


def test_the_bank_does_not_depend_on_how_chunks_interleave() -> None:
    uploads = _uploads()
    patches = {"compact": 900, "diverse-1": 1000, "diverse-2": 1100}
    first = _selector(uploads, 80, floor_fraction=0.1).select(num_patches=patches)
    selector = PrefixMergeSelector(80, capacity=600, device="cpu", block_rows=64,
                                   floor_fraction=0.1)
    for lo in range(0, 200, 30):  # round-robin in chunks of 30, the last site first
        for site in reversed(list(uploads)):
            selector.add(site, uploads[site][lo:lo + 30])
    second = selector.select(num_patches=patches)
    np.testing.assert_array_equal(first.features, second.features)
    assert first.allocation == second.allocation


def test_certificate_is_the_exact_max_distance_to_the_floored_bank() -> None:
    uploads = _uploads()
    selection = _selector(uploads, 60, floor_fraction=0.3, max_site_share=0.5).select(
        num_patches={s: 1000 for s in uploads})
    everything = np.concatenate(list(uploads.values())).astype(np.float64)
    bank = selection.features.astype(np.float64)
    brute = np.sqrt(((everything[:, None, :] - bank[None]) ** 2).sum(-1)).min(1).max()
    assert selection.radius_exact
    assert selection.radius_bound == pytest.approx(brute, rel=1e-5)


def test_flooding_flag_rule() -> None:
    def site(name: str, patches: int, kept: int) -> SiteAllocation:
        return SiteAllocation(name, patches, 100, kept, 0.0, 0, None, kept)

    honest = [site("a", 100, 50), site("b", 100, 45), site("c", 100, 5)]
    assert flooding(honest) == []  # 50 of 100 rows with a third of the patches: ratio 2
    flooded = [site("a", 100, 90), site("b", 100, 5), site("c", 100, 5)]
    assert [(a.site_id, round(r, 1)) for a, r in flooding(flooded)] == [("a", 18.0)]
    small = [site("a", 2, 3), site("b", 198, 97)]  # 5 x the rows per patch but 3 % of the bank
    assert flooding(small) == []


def test_in_process_api_applies_the_floor_and_reports_it() -> None:
    uploads = _uploads()
    sizes = [1000, 1000, 1000]
    server = FederatedServer(3, 90, floor_fraction=0.3, max_site_share=0.6)
    bank = server.aggregate(list(uploads.values()), sizes)
    floor = math.ceil(0.3 * 30)
    assert _rows_of(bank, uploads["compact"]) >= floor
    old = FederatedServer(3, 90, floor_fraction=0.0).aggregate(list(uploads.values()), sizes)
    assert _rows_of(old, uploads["compact"]) < floor
    with pytest.raises(ValueError, match="prefix selection only"):
        FederatedServer(3, 90, server_selection="farthest_first", floor_fraction=0.1)


def _noise_beside_honest_sites(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                               **overrides: object) -> dict[str, object]:
    """Two honest sites (clustered rows) and one of Gaussian noise, 150 rows and 600 patches
    each, through the gRPC daemon; returns the round report."""
    config, tokens = make_config(tmp_path, ["a", "b", "noise"], feature_dim=D, **overrides)
    rows = {"a": _clustered(1, 150, 5, scale=1.0), "b": _clustered(2, 150, 5, scale=1.0),
            "noise": np.random.default_rng(9).normal(0, 1.0, (150, D)).astype(np.float32)}
    fed, port = create_server(config)
    fed.start()
    try:
        with caplog.at_level(logging.INFO):
            for site, upload in rows.items():
                client = TestClient(port, site, tokens[site])
                client.join()
                summary, chunks = upload_messages(site, upload)
                client.upload([dataclasses.replace(summary, num_patches=600), *chunks])
                client.close()
            fed.federation.wait_for(1, {Phase.READY}, timeout=60)
    finally:
        fed.stop(0)
    report = json.loads((config.state_dir / "reports" / "round-1.json").read_text())
    assert report["state"] == "ready"
    return report


def test_grpc_flags_a_flooding_site_and_caps_it_with_max_site_share(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    report = _noise_beside_honest_sites(tmp_path / "flag", caplog)
    sites = {s["site_id"]: s for s in report["sites"]}
    assert set(report["allocation"]["flooding"]) == {"noise"}
    assert sites["noise"]["flooding_ratio"] > 5
    assert sites["noise"]["bank_rows_kept"] > 35  # of k = 50
    for site in sites.values():
        assert site["rows_uploaded_all_rounds"] == 150 and site["num_patches"] == 600
        assert site["proportional_share"] == pytest.approx(50 / 3)
        assert site["floor"] == math.ceil(DEFAULT_FLOOR_FRACTION * 50 / 3)
        assert site["bank_rows_kept"] >= site["floor"]
        assert site["whole_upload_kept"] is False
    assert report["allocation"]["cap_applied_to"] == []
    assert "site noise floods the bank" in caplog.text

    caplog.clear()
    capped = _noise_beside_honest_sites(tmp_path / "cap", caplog, max_site_share=0.4)
    sites = {s["site_id"]: s for s in capped["sites"]}
    assert sites["noise"]["bank_rows_kept"] == 20
    assert sites["noise"]["capped_from"] > 20
    assert capped["allocation"]["cap_applied_to"] == ["noise"]
    assert capped["allocation"]["max_site_share"] == 0.4
    assert sum(s["bank_rows_kept"] for s in sites.values()) == 50
    assert "max_site_share capped site noise at 20 rows" in caplog.text


def test_flower_aggregation_applies_the_cap_and_reports_the_allocation(tmp_path: Path) -> None:
    """Flower's ServerApp aggregates with the same aggregator and the server's settings."""
    pytest.importorskip("flwr")
    from core.serde import upload_request_to_proto
    from fedserver.flower_app import aggregate_uploads

    config, _ = make_config(tmp_path, ["a", "b", "noise"], feature_dim=D, max_site_share=0.4)
    rows = {"a": _clustered(1, 150, 5, scale=1.0), "b": _clustered(2, 150, 5, scale=1.0),
            "noise": np.random.default_rng(9).normal(0, 1.0, (150, D)).astype(np.float32)}
    uploads = {}
    for site, upload in rows.items():
        summary, chunks = upload_messages(site, upload)
        items = [dataclasses.replace(summary, num_patches=600), *chunks]
        uploads[site] = [upload_request_to_proto(i).SerializeToString() for i in items]
    outcome = aggregate_uploads(config, uploads)
    kept = {a.site_id: a.kept for a in outcome.allocation}
    assert kept["noise"] == 20 and sum(kept.values()) == 50
    assert [a.site_id for a in outcome.allocation if a.capped] == ["noise"]


def test_a_state_directory_remembers_the_allocation_settings(tmp_path: Path) -> None:
    from fedserver.config import ConfigError
    from fedserver.errors import StateMismatchError

    config, _ = make_config(tmp_path, ["a"], feature_dim=D)
    fed, _ = create_server(config)
    fed.stop(0)
    settings = json.loads((config.state_dir / "settings.json").read_text())
    assert settings["floor_fraction"] == DEFAULT_FLOOR_FRACTION
    assert settings["max_site_share"] is None
    other, _ = make_config(tmp_path, ["a"], feature_dim=D, max_site_share=0.4)
    with pytest.raises(StateMismatchError, match=r"max_site_share: None -> 0\.4"):
        create_server(other)
    with pytest.raises(ConfigError, match="prefix selection only"):
        make_config(tmp_path / "ff", ["a"], server_selection="farthest_first",
                    floor_fraction=0.1)
    with pytest.raises(ConfigError, match=r"max_site_share must be in \(0, 1\]"):
        make_config(tmp_path / "zero", ["a"], max_site_share=0.0)
