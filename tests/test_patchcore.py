from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from core.data import AutoVIDataset
from core.evaluation import evaluate
from core.features import FeatureConfig
from core.patchcore import PatchCore, PatchCoreConfig, gaussian_blur


def test_gaussian_blur_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((2, 40, 56)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps)[:, None], 4.0)[:, 0].numpy()
    for i in range(2):
        np.testing.assert_allclose(ours[i], ndimage.gaussian_filter(maps[i], 4.0), atol=1e-5)
    small = rng.random((1, 1, 6, 7)).astype(np.float32)  # radius 16 > size: repeated mirroring
    np.testing.assert_allclose(
        gaussian_blur(torch.from_numpy(small), 4.0)[0, 0].numpy(),
        ndimage.gaussian_filter(small[0, 0], 4.0),
        atol=1e-5,
    )


@pytest.fixture(scope="module")
def category_data(synthetic_root: Path) -> tuple[AutoVIDataset, AutoVIDataset]:
    return (
        AutoVIDataset(synthetic_root, objects=["washer"], split="train"),
        AutoVIDataset(synthetic_root, objects=["washer"], split="test"),
    )


def test_fit_predict_detects_defects(
    category_data: tuple[AutoVIDataset, AutoVIDataset], small_features: FeatureConfig
) -> None:
    train, test = category_data
    model = PatchCore(PatchCoreConfig(features=small_features, coreset_ratio=0.25, seed=0))
    model.fit(train)
    patches = len(train) * 8 * 8
    assert model.memory_bank.shape == (int(np.ceil(0.25 * patches)), 128)
    assert model.num_training_patches == patches
    predictions = model.predict(test)
    assert predictions.anomaly_maps.shape == (len(test), 64, 64)
    result = evaluate(predictions, test, small_features.transform)
    assert result.image_auroc is not None and result.image_auroc >= 0.9
    assert result.pixel_auroc is not None and result.pixel_auroc >= 0.9
    # A training image scores within the certified coverage radius of its own bank.
    train_scores = model.predict(train.subset([0, 1])).image_scores
    assert model.coverage_radius is not None
    assert (train_scores <= model.coverage_radius + 1e-4).all()


def test_streaming_fit_with_small_buffer_is_certified(
    category_data: tuple[AutoVIDataset, AutoVIDataset], small_features: FeatureConfig
) -> None:
    train, _ = category_data
    config = PatchCoreConfig(
        features=small_features, coreset_size=40, buffer_rows=100, batch_size=2
    )
    model = PatchCore(config).fit(train)
    assert model.memory_bank.shape == (40, 128)
    all_train = model.predict(train)  # patch maxima are the training patches' 1-NN distances
    assert model.coverage_radius is not None
    assert all_train.image_scores.max() <= model.coverage_radius + 1e-4


def test_save_load_gives_identical_scores(
    tmp_path: Path,
    category_data: tuple[AutoVIDataset, AutoVIDataset],
    small_features: FeatureConfig,
) -> None:
    train, test = category_data
    model = PatchCore(PatchCoreConfig(features=small_features, coreset_ratio=0.2)).fit(train)
    path = model.save(tmp_path / "model" / "bank.safetensors")
    before = model.predict(test)

    torch.manual_seed(1234)  # the global RNG must not matter: the backbone init is seeded
    loaded = PatchCore.load(path, pretrained=False)
    np.testing.assert_array_equal(loaded.memory_bank, model.memory_bank)
    assert loaded.config.features.to_dict() == small_features.to_dict()
    assert loaded.coverage_radius == model.coverage_radius
    after = loaded.predict(test)
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    np.testing.assert_array_equal(after.anomaly_maps, before.anomaly_maps)


def test_load_rejects_foreign_files(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    foreign = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="not a FedPatchCore model"):
        PatchCore.load(foreign)
    with pytest.raises(FileNotFoundError):
        PatchCore.load(tmp_path / "missing.safetensors")


def test_reweighting_matches_anomalib_formula(small_features: FeatureConfig) -> None:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((50, 128)).astype(np.float32)
    features = torch.from_numpy(rng.standard_normal((3, 20, 128)).astype(np.float32))
    model = PatchCore(PatchCoreConfig(features=small_features, num_neighbors=5))
    model.set_memory_bank(bank)
    patch_scores, image_scores = model.score_patches(features)
    # independent computation, straight from anomalib's compute_anomaly_score
    for b in range(3):
        dists = np.linalg.norm(features[b].numpy()[:, None] - bank[None], axis=2)
        np.testing.assert_allclose(patch_scores[b], dists.min(1), rtol=1e-4)
        m = int(dists.min(1).argmax())
        s_star = dists[m].min()
        nn = bank[dists[m].argmin()]
        support = np.argsort(np.linalg.norm(bank - nn, axis=1))[:5]
        d = np.linalg.norm(bank[support] - features[b].numpy()[m], axis=1)
        weight = 1 - np.exp(d[0]) / np.exp(d).sum()
        assert image_scores[b] == pytest.approx(weight * s_star, rel=1e-4)


def test_config_validation(small_features: FeatureConfig) -> None:
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCoreConfig(coreset_ratio=0.0)
    with pytest.raises(ValueError, match="num_neighbors"):
        PatchCoreConfig(num_neighbors=0)
    model = PatchCore(PatchCoreConfig(features=small_features))
    with pytest.raises(RuntimeError, match="no memory bank"):
        _ = model.memory_bank
    with pytest.raises(ValueError, match=r"\[K>0, 128\]"):
        model.set_memory_bank(np.zeros((4, 64), np.float32))
    assert replace(PatchCoreConfig(), coreset_size=5).bank_size(3) == 3


def _weights_file(tmp_path: Path, seed: int) -> str:
    """A resnet18 state dict as an air-gapped site would keep it (here: seeded random)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    path = tmp_path / f"resnet18-{seed}.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    return str(path)


def test_load_refuses_weights_other_than_the_fitted_ones(
    tmp_path: Path,
    category_data: tuple[AutoVIDataset, AutoVIDataset],
    small_features: FeatureConfig,
) -> None:
    """Fitted with weights=FILE, reloaded with pretrained=False: scores would silently change
    scale, so load() refuses; the same weights under another file name are accepted."""
    import shutil

    from core.patchcore import FeatureMismatchError

    train, test = category_data[0][:4], category_data[1][:4]
    weights = _weights_file(tmp_path, seed=11)
    features = replace(small_features, pretrained=True, weights=weights)
    model = PatchCore(PatchCoreConfig(features=features, coreset_ratio=0.2)).fit(train)
    path = model.save(tmp_path / "bank.safetensors")
    with pytest.raises(FeatureMismatchError, match=r"resnet18-11\.safetensors") as caught:
        PatchCore.load(path, pretrained=False)
    assert "random init" in str(caught.value)
    with pytest.raises(FeatureMismatchError):
        PatchCore.load(path, weights=_weights_file(tmp_path, seed=12))
    renamed = tmp_path / "copy.safetensors"
    shutil.copy(weights, renamed)
    loaded = PatchCore.load(path, weights=str(renamed))
    np.testing.assert_array_equal(
        loaded.predict(test).image_scores, model.predict(test).image_scores
    )
    # and the other way round: fitted with random weights, loaded with a weights file
    random_path = PatchCore(PatchCoreConfig(features=small_features, coreset_ratio=0.2)).fit(
        train
    ).save(tmp_path / "random.safetensors")
    with pytest.raises(FeatureMismatchError, match="random init"):
        PatchCore.load(random_path, weights=weights)


def test_format_1_files_load_with_a_warning(
    tmp_path: Path,
    category_data: tuple[AutoVIDataset, AutoVIDataset],
    small_features: FeatureConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json

    from safetensors.numpy import save_file

    model = PatchCore(PatchCoreConfig(features=small_features, coreset_ratio=0.2)).fit(
        category_data[0][:2]
    )
    meta = model.metadata()
    meta["format_version"] = 1
    del meta["feature_fingerprint"]
    old = tmp_path / "old.safetensors"
    save_file({"memory_bank": model.memory_bank}, str(old), {"fedpatchcore": json.dumps(meta)})
    with caplog.at_level("WARNING", logger="core.patchcore"):
        loaded = PatchCore.load(old, pretrained=False)
    assert any("format 1" in r.message for r in caplog.records)
    np.testing.assert_array_equal(loaded.memory_bank, model.memory_bank)


def test_mixed_image_sizes_are_refused_naming_the_file(
    tmp_path: Path, small_features: FeatureConfig
) -> None:
    """Short side resized to 64 px, no crop: a 48 x 64 image among 64 x 64 ones cannot share a
    patch grid. With file paths it is refused from the headers, before the backbone is built."""
    from PIL import Image

    from core.data import DatasetError, generate_synthetic_dataset

    root = generate_synthetic_dataset(
        tmp_path / "data", categories=("washer",), num_train=4, num_test=2, image_size=64,
        layout="autovi",
    )
    odd = sorted((root / "washer" / "train" / "good").iterdir())[2]
    Image.new("RGB", (64, 48)).save(odd)
    model = PatchCore(PatchCoreConfig(features=small_features, batch_size=1))
    with pytest.raises(DatasetError, match=str(odd)) as caught:
        model.fit(AutoVIDataset(root, split="train"))
    assert "48x64 (HxW), 64x85 after the transform" in str(caught.value)
    assert model._extractor is None  # refused before any feature was computed

    class InMemory:  # no file paths: checked image by image, named by index
        def __init__(self, sizes: list[tuple[int, int]]) -> None:
            self.sizes = sizes

        def __len__(self) -> int:
            return len(self.sizes)

        def load_image(self, index: int) -> np.ndarray:
            return np.zeros((*self.sizes[index], 3), dtype=np.uint8)

    model.fit(InMemory([(64, 64)] * 3))
    # batch_size=1: the odd image is alone in its batch (this was numpy's concatenate error)
    with pytest.raises(DatasetError, match=r"image 2 is 48x64 \(HxW\)"):
        model.predict(InMemory([(64, 64), (64, 64), (48, 64)]))


def test_truncated_or_foreign_model_files_are_named(
    tmp_path: Path,
    category_data: tuple[AutoVIDataset, AutoVIDataset],
    small_features: FeatureConfig,
) -> None:
    from core.federated import FederatedPatchCore
    from core.patchcore import ModelFileError

    model = PatchCore(PatchCoreConfig(features=small_features, coreset_ratio=0.2)).fit(
        category_data[0][:2]
    )
    good = model.save(tmp_path / "bank.safetensors").read_bytes()
    header_cut = tmp_path / "header-cut.safetensors"
    header_cut.write_bytes(good[:20])
    data_cut = tmp_path / "data-cut.safetensors"
    data_cut.write_bytes(good[: len(good) - 100])
    foreign = tmp_path / "photo.safetensors"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for bad in (header_cut, data_cut, foreign):
        for load in (
            lambda p: PatchCore.load(p, pretrained=False),
            lambda p: FederatedPatchCore.load(p, pretrained=False),
            PatchCore.read_extra,
        ):
            if bad is data_cut and load is PatchCore.read_extra:
                continue  # the header is intact: its metadata reads fine
            with pytest.raises(ModelFileError) as caught:
                load(bad)
            assert str(bad) in str(caught.value)
