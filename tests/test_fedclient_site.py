"""fedclient.report (metrics.json, overlays), site data detection and ``fedclient score``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import DatasetError, generate_synthetic_dataset
from core.patchcore import PatchCore, PatchCoreConfig
from core.preprocess import ImageTransform
from fedclient import cli
from fedclient.report import colorize, overlay, write_metrics
from fedclient.site import load_site_data
from tests.conftest import SMALL_FEATURES


def test_colorize_ramps_from_blue_to_red() -> None:
    values = np.array([[0.0, 0.5, 1.0, 2.0]])
    colours = colorize(values, 0.0, 1.0)
    assert colours.dtype == np.uint8 and colours.shape == (1, 4, 3)
    assert tuple(colours[0, 0]) == (0, 0, 140)  # low: dark blue
    assert tuple(colours[0, 2]) == (220, 0, 0)  # high: red
    assert tuple(colours[0, 3]) == (220, 0, 0)  # clipped
    assert (colorize(values, 1.0, 1.0) == colorize(np.zeros_like(values), 0, 1)).all()


def test_overlay_has_the_model_geometry() -> None:
    image = np.full((80, 120, 3), 200, dtype=np.uint8)
    transform = ImageTransform(resize=64, crop=48)  # 80x120 -> 64x96 -> crop 48x48
    out = overlay(image, np.zeros((48, 48)), transform, vmin=0, vmax=1, alpha=0.0)
    assert out.shape == (48, 48, 3)
    assert abs(int(out[0, 0, 0]) - 200) <= 1  # alpha 0: the image itself
    with pytest.raises(ValueError, match="anomaly map"):
        overlay(image, np.zeros((64, 64)), transform, vmin=0, vmax=1)


def test_metrics_json_is_strict_json(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "m" / "metrics.json",
                         {"r": math.inf, "x": np.float32(0.5), "rounds": [{"a": math.nan}]})
    data = json.loads(path.read_text())  # strict JSON: no Infinity / NaN tokens
    assert data == {"r": None, "x": 0.5, "rounds": [{"a": None}]}
    assert not (tmp_path / "m" / "metrics.json.tmp").exists()


def test_site_data_layouts(tmp_path: Path, synthetic_root: Path) -> None:
    train, test = load_site_data(synthetic_root, ("washer",))
    assert set(train.categories) == {"washer"} and test is not None and len(test) == 8
    mvtec = generate_synthetic_dataset(tmp_path / "mvtec", categories=("screw",), num_train=2,
                                       num_test=2, image_size=32, layout="mvtec")
    train, test = load_site_data(mvtec)
    assert len(train) == 2 and test is not None and len(test) == 2
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(plain / "a.png")
    train, test = load_site_data(plain)
    assert len(train) == 1 and test is None
    with pytest.raises(DatasetError, match="does not exist"):
        load_site_data(tmp_path / "missing")


def test_score_command_reuses_a_saved_bank(tmp_path: Path, synthetic_root: Path, capsys) -> None:
    from core.data import AutoVIDataset

    model = PatchCore(PatchCoreConfig(features=SMALL_FEATURES, coreset_size=64))
    model.fit(AutoVIDataset(synthetic_root, ["stripes"], split="train"))
    bank = model.save(tmp_path / "bank.safetensors", extra={"bank_version": 3})
    out = tmp_path / "scored"
    code = cli.main(["score", "--bank", str(bank), "--data", str(synthetic_root),
                     "--categories", "stripes", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bank_version"] == 3 and metrics["bank_rows"] == 64
    scores = metrics["test"]["image_scores"]
    assert len(scores) == 8 and metrics["test"]["image_auroc"] is not None
    assert len(list((out / "overlays").rglob("*.png"))) == 8
    expected = model.predict(AutoVIDataset(synthetic_root, ["stripes"], split="test"))
    np.testing.assert_allclose(sorted(scores.values()), np.sort(expected.image_scores),
                               rtol=1e-5)
    assert cli.main(["score", "--bank", str(tmp_path / "none.safetensors"), "--data",
                     str(synthetic_root), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["mvtec", "autovi"])
def test_a_category_folder_as_data_never_trains_on_test_or_ground_truth(
    tmp_path: Path, layout: str
) -> None:
    root = generate_synthetic_dataset(tmp_path / "data", categories=("washer", "screw"),
                                      num_train=3, num_test=4, image_size=32, layout=layout)
    category = root / "washer"
    train, test = load_site_data(category)
    assert train.categories == ("washer",) and len(train) == 3
    for sample in train:
        parts = sample.image_path.relative_to(category).parts
        assert parts[:2] == ("train", "good"), sample.image_path
    assert test is not None and len(test) == 4 and test.labels.any()
    # the same as the dataset folder with --categories
    same, _ = load_site_data(root, ("washer",))
    assert [s.image_path for s in same] == [s.image_path for s in train]
    with pytest.raises(DatasetError, match="category folder 'washer'"):
        load_site_data(category, ("screw",))
    # anything under test/ or ground_truth/ is refused, naming the category to give instead
    for inside in (category / "test", category / "test" / "good", category / "ground_truth"):
        with pytest.raises(DatasetError, match=f"Give --data {category}"):
            load_site_data(inside)
    # a plain folder holding a dataset deeper down is refused, not read as good images
    with pytest.raises(DatasetError, match="defects and masks included"):
        load_site_data(tmp_path)


def test_a_plain_folder_with_test_or_ground_truth_is_refused(tmp_path: Path) -> None:
    from core.data import ImageFolderDataset

    plain = tmp_path / "plain"
    for sub in ("cam1", "cam1/test"):
        (plain / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(plain / sub / "a.png")
    with pytest.raises(DatasetError, match="cam1/test/"):
        ImageFolderDataset(plain)
    with pytest.raises(DatasetError, match="cam1/test/"):
        load_site_data(plain)
    (plain / "cam1" / "test").rename(plain / "cam1" / "more")
    assert len(ImageFolderDataset(plain)) == 2
