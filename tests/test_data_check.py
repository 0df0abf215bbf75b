"""``fedclient check --data``: broken site folders, each problem named with its file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import generate_synthetic_dataset
from core.data.check import DataCheck, check_site_data, detect_layout
from fedclient import cli


def _has(report: DataCheck, severity: str, path: Path, text: str) -> None:
    """Exactly one problem of ``severity`` names ``path`` and says ``text``."""
    found = [p for p in report.problems
             if p.severity == severity and p.path == path and text in p.message]
    assert len(found) == 1, (
        f"no single {severity} '{text}' for {path}; problems:\n"
        + "\n".join(str(p) for p in report.problems)
    )


def _save(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_a_clean_dataset_has_no_problem(tmp_path: Path) -> None:
    for layout in ("autovi", "mvtec"):
        root = generate_synthetic_dataset(tmp_path / layout, categories=("washer", "screw"),
                                          num_train=3, num_test=4, image_size=32, layout=layout)
        report = check_site_data(root)
        assert report.layout == layout and report.problems == []
        assert report.counts["washer"] == {"train": {"good": 3},
                                           "test": {"good": 2, "scratch": 1, "spot": 1}}
        assert (report.images("train"), report.images("test")) == (6, 8)


def test_broken_mvtec_folder_names_every_problem(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "m", categories=("washer",), num_train=6,
                                      num_test=4, image_size=32, layout="mvtec")
    cat = root / "washer"
    train, test, truth = cat / "train" / "good", cat / "test", cat / "ground_truth"
    (train / "000.png").write_bytes(b"")  # zero size
    (train / "001.png").write_bytes(b"this is not a png")  # unreadable
    data = (test / "good" / "000.png").read_bytes()
    (test / "good" / "000.png").write_bytes(data[: len(data) // 2])  # truncated
    _save(train / "002.png", np.zeros((48, 40, 3), np.uint8))  # another size
    _save(train / "003.png", np.zeros((32, 32), np.uint8))  # grey among RGB
    (train / "notes.txt").write_text("camera 2")
    (cat / "train" / "crack").mkdir()
    (truth / "spot" / "000_mask.png").unlink()  # missing mask
    _save(truth / "spot" / "007_mask.png", np.full((32, 32), 255, np.uint8))  # no such image
    _save(truth / "scratch" / "000_mask.png", np.zeros((16, 16), np.uint8))  # wrong size
    _save(test / "scratch" / "001.png", np.zeros((32, 32, 3), np.uint8))
    soft = np.zeros((32, 32), np.uint8)
    soft[4:8, 4:8], soft[8:10, 4:8] = 255, 128  # anti-aliased edge
    _save(truth / "scratch" / "001_mask.png", soft)
    _save(test / "scratch" / "002.png", np.zeros((32, 32, 3), np.uint8))
    _save(truth / "scratch" / "002_mask.png", np.zeros((32, 32), np.uint8))  # empty
    report = check_site_data(root)
    assert report.layout == "mvtec"
    _has(report, "error", train / "000.png", "empty file (0 bytes)")
    _has(report, "error", train / "001.png", "cannot read the image")
    _has(report, "error", test / "good" / "000.png", "cannot read the image")
    _has(report, "warning", cat,
         "mixed image sizes: 32x32: 8 image(s); 40x48: 1 (e.g. train/good/002.png)")
    _has(report, "warning", cat, "mixed image modes: RGB: 8 image(s); L: 1 (e.g. train/good/003")
    _has(report, "warning", train / "notes.txt", "not an image file")
    _has(report, "error", cat / "train" / "crack", "training images must all be normal")
    _has(report, "error", test / "spot" / "000.png", "defect image without its mask")
    _has(report, "warning", truth / "spot" / "007_mask.png", "without a test image")
    _has(report, "error", truth / "scratch" / "000_mask.png",
         "mask is 16x16 (WxH) but its image 000.png is 32x32")
    _has(report, "error", truth / "scratch" / "001_mask.png", "not binary: 2 non-zero values")
    _has(report, "error", truth / "scratch" / "002_mask.png", "no defect pixel")
    assert len(report.errors) == 8 and len(report.warnings) == 4
    assert report.counts["washer"]["test"] == {"good": 2, "scratch": 3, "spot": 1}


def test_broken_autovi_folder_names_every_problem(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "a", categories=("washer", "screw", "stripes"),
                                      num_train=2, num_test=4, image_size=32, layout="autovi")
    (root / "screw" / "defects_config.json").unlink()
    (root / "stripes" / "defects_config.json").write_text(json.dumps(
        [{"defect_name": "scratch", "pixel_value": 60, "saturation_threshold": 1.0,
          "relative_saturation": True},
         {"defect_name": "spot", "pixel_value": 60, "saturation_threshold": 1.0,
          "relative_saturation": True}]))
    truth = root / "washer" / "ground_truth"
    channel = truth / "scratch" / "000" / "0000.png"
    values = np.asarray(Image.open(channel)).copy()
    values[values > 0] = 77  # not a pixel_value of the config
    _save(channel, values)
    _save(truth / "spot" / "000" / "0001.png", np.zeros((32, 32), np.uint8))  # empty channel
    (truth / "good").mkdir()
    report = check_site_data(root)
    assert report.layout == "autovi"
    _has(report, "error", root / "screw" / "defects_config.json", "missing")
    _has(report, "error", root / "stripes" / "defects_config.json",
         "invalid defects config: ")
    assert "duplicate pixel_value(s) [60]" in str(report.errors[1])
    _has(report, "error", channel, "channel value 77 is not a pixel_value of defects_config")
    _has(report, "error", truth / "spot" / "000" / "0001.png", "no defect pixel")
    _has(report, "warning", truth / "good", "no test/<defect> folder")
    (root / "washer" / "ground_truth" / "scratch" / "000" / "0000.png").unlink()
    (root / "washer" / "ground_truth" / "scratch" / "000").rmdir()
    report = check_site_data(root, ("washer",))
    _has(report, "error", root / "washer" / "test" / "scratch" / "000.png",
         "defect image without ground truth")
    assert set(report.counts) == {"washer"}
    report = check_site_data(root, ("washer", "nut"))
    _has(report, "error", root / "nut", "category folder does not exist")


def test_plain_folders_and_missing_roots(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    (plain / "cam2").mkdir(parents=True)
    _save(plain / "a.png", np.zeros((20, 30, 3), np.uint8))
    _save(plain / "cam2" / "b.jpg", np.zeros((20, 30, 3), np.uint8))
    (plain / "cam2" / "c.png").write_bytes(b"")
    report = check_site_data(plain)
    assert report.layout == "folder" == detect_layout(plain)
    assert report.counts == {"plain": {"train": {"good": 3}}}
    _has(report, "error", plain / "cam2" / "c.png", "empty file")
    _has(report, "warning", plain, "no test split")
    empty = tmp_path / "empty"
    empty.mkdir()
    _has(check_site_data(empty), "error", empty, "no images found")
    _has(check_site_data(tmp_path / "nope"), "error", tmp_path / "nope", "does not exist")
    _has(check_site_data(plain, ("washer",)), "error", plain, "has no categories")


def test_cli_check_data_lists_errors_then_warnings_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = generate_synthetic_dataset(tmp_path / "m", categories=("washer",), num_train=3,
                                      num_test=4, image_size=32, layout="mvtec")
    random_weights = ["--backbone", "resnet18", "--no-pretrained"]  # no network in tests
    # no server: the data and the extractor
    assert cli.main(["check", "--data", str(root), *random_weights]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok   data: ") and "MVTec AD layout, 3 training image(s), 4 test" \
        in out[0]
    assert out[1].strip() == "washer: train good 3; test good 2, scratch 1, spot 1"
    (root / "washer" / "train" / "good" / "notes.txt").write_text("x")
    # a warning is not an error
    assert cli.main(["check", "--data", str(root), *random_weights]) == 0
    capsys.readouterr()
    (root / "washer" / "train" / "good" / "000.png").write_bytes(b"")
    assert cli.main(["check", "--data", str(root), *random_weights]) == 2
    out = capsys.readouterr().out.splitlines()
    errors = [i for i, line in enumerate(out) if line.startswith("error ")]
    warnings = [i for i, line in enumerate(out) if line.startswith("warning ")]
    assert len(errors) == 1 and len(warnings) == 1 and max(errors) < min(warnings)
    assert str(root / "washer" / "train" / "good" / "000.png") in out[errors[0]]
    assert out[max(warnings) + 1].strip() == "data: 1 error(s), 1 warning(s)"
    assert out[-2].startswith("ok   extractor resnet18") and "RANDOM weights" in out[-2]


def test_check_reads_a_category_folder_and_refuses_a_folder_under_test(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "m", categories=("washer", "screw"),
                                      num_train=3, num_test=2, image_size=32, layout="mvtec")
    report = check_site_data(root / "washer")
    assert report.layout == "mvtec" and not report.errors, report.problems
    assert list(report.counts) == ["washer"] and report.images("train") == 3
    _has(check_site_data(root / "washer" / "test"), "error", root / "washer" / "test",
         "inside test/ of the category folder")
    _has(check_site_data(tmp_path), "error", tmp_path, "defects and masks included")
