from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import save_file

from core.features import FeatureConfig, PatchFeatureExtractor, WeightsUnavailableError
from core.preprocess import ImageTransform


def reference_embedding(
    maps: list[torch.Tensor], pretrain_dim: int, target_dim: int
) -> torch.Tensor:
    """patchcore-inspection's order of operations: unfold every layer at its own resolution,
    resize the *unfolded* C*9 maps to the first grid, MeanMapper per layer, then Aggregator."""
    ref_h, ref_w = maps[0].shape[-2:]
    per_layer = []
    for fmap in maps:
        b, c, h, w = fmap.shape
        unfolded = F.unfold(fmap, kernel_size=3, padding=1).reshape(b, c * 9, h, w)
        if (h, w) != (ref_h, ref_w):
            unfolded = F.interpolate(
                unfolded, size=(ref_h, ref_w), mode="bilinear", align_corners=False
            )
        flat = unfolded.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)
        per_layer.append(F.adaptive_avg_pool1d(flat, pretrain_dim).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(len(per_layer[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim).squeeze(1)


def test_matches_original_patchcore_pipeline() -> None:
    torch.manual_seed(0)
    config = FeatureConfig(
        backbone="resnet18",
        pretrained=False,
        pretrain_embed_dim=96,
        target_embed_dim=80,
        transform=ImageTransform(64, None),
    )
    extractor = PatchFeatureExtractor(config)
    images = torch.randn(2, 3, 64, 64)
    features, grid = extractor(images)
    assert grid == (8, 8)
    assert features.shape == (2, 64, 80) and features.dtype == torch.float32
    maps = extractor.backbone(images)
    expected = reference_embedding(maps, 96, 80).reshape(2, 64, 80)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_random_weights_are_announced(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("core.features._WARNED_RANDOM", set())
    with caplog.at_level(logging.WARNING, logger="core.features"):
        PatchFeatureExtractor(FeatureConfig(backbone="resnet18", pretrained=False))
    assert any("RANDOM WEIGHTS" in r.message for r in caplog.records)


def test_local_weights_file_is_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(123)
    source = timm.create_model("resnet18", pretrained=False)
    weights = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(weights))
    config = FeatureConfig(
        backbone="resnet18", weights=str(weights), transform=ImageTransform(64, None)
    )
    with caplog.at_level(logging.WARNING, logger="core.features"):
        extractor = PatchFeatureExtractor(config)
    assert not any("RANDOM WEIGHTS" in r.message for r in caplog.records)
    loaded = extractor.backbone.state_dict()
    torch.testing.assert_close(
        loaded["layer2.0.conv1.weight"], source.state_dict()["layer2.0.conv1.weight"]
    )


def test_bad_configs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no stage"):
        PatchFeatureExtractor(
            FeatureConfig(backbone="resnet18", pretrained=False, layers=("layer9",))
        )
    with pytest.raises(ValueError, match="shallowest first"):
        PatchFeatureExtractor(
            FeatureConfig(backbone="resnet18", pretrained=False, layers=("layer3", "layer2"))
        )
    with pytest.raises(ValueError, match="weights file not found"):
        FeatureConfig(weights=str(tmp_path / "missing.safetensors"))


def test_extractor_stays_in_eval_mode() -> None:
    extractor = PatchFeatureExtractor(FeatureConfig(backbone="resnet18", pretrained=False))
    extractor.train()
    assert not extractor.backbone.training


def test_transform_geometry_of_images_and_masks() -> None:
    transform = ImageTransform(resize=32, crop=24)
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    image[:, 40:] = 255  # right half white
    out = transform.image(image)
    assert out.shape == (3, 24, 24)  # short side 40 -> 32, long 80 -> 64, centre crop 24
    mask = np.zeros((40, 80), dtype=bool)
    mask[:, 40:] = True
    m = transform.mask(mask)
    assert m.shape == (24, 24)
    assert m[:, 12:].all() and not m[:, :12].any()  # the crop is centred on the boundary
    with pytest.raises(ValueError, match="uint8"):
        transform.image(image.astype(np.float32))
    with pytest.raises(ValueError, match="exceeds"):
        ImageTransform(resize=(16, 16), crop=24).image(image)


def test_random_backbones_are_identical_across_sites() -> None:
    config = FeatureConfig(backbone="resnet18", pretrained=False, init_seed=7)
    torch.manual_seed(1)
    a = PatchFeatureExtractor(config).backbone.state_dict()
    torch.manual_seed(2)
    b = PatchFeatureExtractor(config).backbone.state_dict()
    c = PatchFeatureExtractor(FeatureConfig(backbone="resnet18", pretrained=False, init_seed=8))
    torch.testing.assert_close(a["layer3.0.conv1.weight"], b["layer3.0.conv1.weight"])
    assert not torch.equal(
        a["layer3.0.conv1.weight"], c.backbone.state_dict()["layer3.0.conv1.weight"]
    )


@pytest.fixture
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty huggingface cache and a hub endpoint that refuses connections: really offline."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as sock:  # a port nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def _assert_names_the_ways_out(message: str) -> None:
    assert "pretrained=False" in message
    assert "weights=FILE" in message
    assert "cache" in message


def test_default_pretrained_fails_fast_offline(no_hub: Path) -> None:
    """The spec's default client (pretrained wide_resnet50_2) with no network and a cold cache:
    one typed error naming the three ways out within seconds, not timm's minute of retries."""
    import time

    from core.federated import PatchCoreClient

    class OneImage:
        def __len__(self) -> int:
            return 1

        def load_image(self, index: int) -> np.ndarray:
            return np.zeros((64, 64, 3), dtype=np.uint8)

    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as caught:
        PatchCoreClient(0, OneImage()).train()
    assert time.perf_counter() - start < 30
    _assert_names_the_ways_out(str(caught.value))
    assert "127.0.0.1" in str(caught.value)  # says which host it could not reach


def test_hf_hub_offline_fails_without_probing(
    no_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(
        "core.features._probe", lambda url: pytest.fail("probed although HF_HUB_OFFLINE is set")
    )
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE") as caught:
        PatchFeatureExtractor(FeatureConfig("resnet18"))
    _assert_names_the_ways_out(str(caught.value))


def test_warm_hub_cache_loads_offline(no_hub: Path) -> None:
    """Weights already in the huggingface cache load with the network unreachable."""
    torch.manual_seed(5)
    source = timm.create_model("resnet18", pretrained=False)
    repo = "timm/resnet18.a1_in1k"  # timm's default tag of resnet18
    model_dir = no_hub / ("models--" + repo.replace("/", "--"))
    snapshot = model_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (model_dir / "refs").mkdir()
    (model_dir / "refs" / "main").write_text("0" * 40)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    extractor = PatchFeatureExtractor(FeatureConfig("resnet18", transform=ImageTransform(64, None)))
    torch.testing.assert_close(
        extractor.backbone.state_dict()["layer3.0.conv1.weight"],
        source.state_dict()["layer3.0.conv1.weight"],
    )
