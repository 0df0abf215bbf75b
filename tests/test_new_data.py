"""A site's new images in round 2 (issue 21, item 3), in process and with real processes.

Round 1 as always; then one site's folder gets a new product variant (the generator's
"anodised" washer, defect-free) and both sites run ``fedclient run`` again with the same
``--out``: the site with the variant reads only its new images and uploads the rows that cover
them, the other uploads nothing, both download the change as a delta, and every patch of the
variant site, old and new, lies within the certificate of the round-2 bank.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.codec import DEFAULT_CODEC
from core.data import AutoVIDataset, generate_synthetic_dataset
from core.features import FeatureConfig
from core.federated import FederatedPatchCore, PatchCoreClient
from core.federated.newdata import cover_new_patches
from core.knn import NearestNeighbourIndex
from core.preprocess import ImageTransform
from core.serde import chunked_roundtrip
from fedclient.demo import ServerProcess, start_site, write_server_config
from fedclient.site import BANK_FILE
from fedclient.sitestate import load_state
from tests.conftest import SMALL_FEATURES

EXTRACTOR = {
    "backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False,
    "pretrain_embed_dim": 128, "target_embed_dim": 128, "patch_size": 3, "resize": 64,
    "crop": 0, "init_seed": 0,
}
TIMEOUT_S = 240


def test_cover_new_patches_covers_every_patch_to_the_measured_radius() -> None:
    rng = np.random.default_rng(0)
    cover = rng.normal(size=(50, 16)).astype(np.float32)
    near = cover[:20] + 0.01 * rng.normal(size=(20, 16)).astype(np.float32)
    far = 5.0 + 0.1 * rng.normal(size=(60, 16)).astype(np.float32)
    upload = cover_new_patches([near, far], cover, 1.0, codec=DEFAULT_CODEC,
                               max_chunk_bytes=1 << 20)
    assert upload.num_patches == 80 and upload.num_uncovered == 60
    assert 0 < upload.features.shape[0] < 60  # the far cluster needs rows, not all of them
    decoded, _ = chunked_roundtrip(upload.features, config=DEFAULT_CODEC)
    np.testing.assert_array_equal(decoded, upload.decoded)
    everything = np.concatenate([cover, decoded])
    distances = NearestNeighbourIndex(everything).search(np.concatenate([near, far]), 1)[0]
    assert float(distances.max()) <= upload.radius + 1e-5
    assert upload.radius <= 1.0 + 0.01  # the target plus the fp16 error of the picks
    # A radius below the far cluster's spread takes several picks, each patch within it.
    tight = cover_new_patches([far], cover, 0.3, codec=DEFAULT_CODEC, max_chunk_bytes=1 << 20)
    assert tight.features.shape[0] > upload.features.shape[0]
    assert tight.radius <= 0.3 + 0.01
    # Nothing new to cover: no rows.
    none = cover_new_patches([near], cover, 1.0, codec=DEFAULT_CODEC, max_chunk_bytes=1 << 20)
    assert none.features.shape == (0, 16) and none.num_uncovered == 0


def _worst_distance(model_features: FeatureConfig, datasets: list, bank: np.ndarray) -> float:
    """Largest distance from any patch of ``datasets`` to ``bank``."""
    client = PatchCoreClient("probe", datasets[0], model_features)
    index = NearestNeighbourIndex(bank)
    worst = 0.0
    for dataset in datasets:
        for _, features, _ in client.model.iter_features(dataset):
            flat = features.reshape(-1, features.shape[-1]).numpy()
            worst = max(worst, float(index.search(flat, 1)[0].max()))
    return worst


def test_in_process_round_two_uploads_only_the_added_images(
    synthetic_root: Path, tmp_path: Path
) -> None:
    variant = generate_synthetic_dataset(tmp_path / "variant", categories=("washer",),
                                         num_train=3, num_test=2, image_size=64,
                                         layout="autovi", variant="anodised")
    datasets = [AutoVIDataset(synthetic_root, [c], split="train") for c in ("stripes", "washer")]
    fed = FederatedPatchCore(num_clients=2, backbone=SMALL_FEATURES, global_bank_size=200,
                             coreset_percentage=0.25)
    fed.setup_clients(datasets)
    fed.train(num_rounds=1)
    added = AutoVIDataset(variant, ["washer"], split="train")
    fed.clients[1].add_images(added)
    fed.train(num_rounds=1)
    first, second = fed.reports
    assert second.rows_up["1"] > 0 and second.num_novel["1"] >= second.rows_up["1"]
    # The unchanged site keeps today's later round (its patches the bank covers worst).
    assert second.rows_up["0"] < second.rows_up["1"]
    assert fed.clients[1].data_size == len(datasets[1]) + len(added)
    assert second.max_site_radius >= first.max_site_radius
    worst = _worst_distance(SMALL_FEATURES, [datasets[1], added], fed.clients[1].global_bank)
    assert worst <= second.certificate


@pytest.mark.slow
def test_round_two_with_a_new_variant_through_real_processes(
    synthetic_root: Path, tmp_path: Path
) -> None:
    env = os.environ.copy()
    env["OMP_NUM_THREADS"] = "1"
    data = {"a": tmp_path / "data-a", "b": tmp_path / "data-b"}
    shutil.copytree(synthetic_root / "stripes", data["a"] / "stripes")
    shutil.copytree(synthetic_root / "washer", data["b"] / "washer")
    fed = tmp_path / "fed"
    config = write_server_config(fed, ["a", "b"], global_bank_size=300, extractor=EXTRACTOR,
                                 rounds=2, max_chunk_bytes=4096, env=env)
    args = ["--coreset-percentage", "0.25", "--backbone", "resnet18", "--no-pretrained",
            "--max-rounds", "1", "--no-overlays"]
    server = ServerProcess(config, tmp_path / "server.log", env=env)

    def run_round() -> dict[str, dict]:
        procs = {s: start_site(server.address, s, fed / "site-tokens" / f"{s}.token", data[s],
                               tmp_path / f"out-{s}", extra_args=args, env=env)
                 for s in data}
        for p in procs.values():
            assert p.process.wait(TIMEOUT_S) == 0, p.log_path.read_text()[-3000:]
        return {s: json.loads((p.out_dir / "metrics.json").read_text())
                for s, p in procs.items()}

    try:
        round1 = run_round()
        # Months later: site b's folder gets a new, defect-free product variant.
        variant = generate_synthetic_dataset(tmp_path / "variant", categories=("washer",),
                                             num_train=4, num_test=2, image_size=64,
                                             layout="autovi", variant="anodised")
        for image in sorted((variant / "washer" / "train" / "good").glob("*.png")):
            shutil.copy2(image, data["b"] / "washer" / "train" / "good" / f"v-{image.name}")
        round2 = run_round()
    finally:
        assert server.stop() == 0
    a, b = round2["a"]["rounds"][0], round2["b"]["rounds"][0]
    assert (a["round"], b["round"]) == (2, 2)
    assert round2["a"]["num_new_images"] == 0 and a["rows_up"] == 0
    # 4 new images: 1 held out for calibration (15 %), 3 covered.
    assert round2["b"]["num_new_images"] == 3
    full_rows = round1["b"]["rounds"][0]["rows_up"]
    assert 0 < b["rows_up"] <= b["num_novel"] and b["rows_up"] < full_rows
    assert b["bytes_up"] < round1["b"]["rounds"][0]["bytes_up"]
    for record in (a, b):  # the change since round 1's bank, not the whole bank
        assert record["bank_delta"] and record["bank_rows_in_stream"] > 0
        assert record["bytes_down"] < round1["b"]["rounds"][0]["bytes_down"]
    state = load_state(tmp_path / "out-b")
    assert state is not None and state.round == 2
    assert state.client.uploaded.shape[0] == full_rows + b["rows_up"]
    # Every patch of site b, its round-1 images and the variant's, lies within the certificate.
    from safetensors.numpy import load_file

    bank = load_file(str(tmp_path / "out-b" / BANK_FILE))["memory_bank"]
    features = FeatureConfig("resnet18", pretrained=False, pretrain_embed_dim=128,
                             target_embed_dim=128, transform=ImageTransform(resize=64, crop=None))
    everything = AutoVIDataset(data["b"], ["washer"], split="train")
    assert len(everything) == 16
    worst = _worst_distance(features, [everything], bank)
    assert worst <= round2["b"]["certificate"]
    assert round2["b"]["max_site_coverage_radius"] >= round1["b"]["max_site_coverage_radius"]
