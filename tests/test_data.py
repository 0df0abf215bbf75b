"""Tests of core.data: synthetic generator, readers, error reporting, partitioners."""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import (
    AUTOVI_OBJECTS,
    DEFAULT_SATURATION,
    SYNTHETIC_CATEGORIES,
    SYNTHETIC_DEFECTS,
    AnomalyDataset,
    AutoVIDataset,
    CategoryPartitioner,
    DatasetError,
    DefectType,
    DirichletPartitioner,
    IIDPartitioner,
    ImageFolderDataset,
    ImageSample,
    MVTecDataset,
    SyntheticConfig,
    defects_config_to_json,
    generate_synthetic_dataset,
    load_defects_config,
    parse_defects_config,
    render_synthetic_image,
    synthetic_defect_types,
    synthetic_image_rng,
)
from core.metrics import SaturationSpec

SIZE = 64
NUM_TRAIN = 6
NUM_TEST = 10  # 5 good + scratch, spot, missing, combined, scratch


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("mvtec") / "data",
        categories=SYNTHETIC_CATEGORIES,
        num_train=NUM_TRAIN,
        num_test=NUM_TEST,
        image_size=SIZE,
        seed=3,
    )


@pytest.fixture(scope="module")
def autovi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("autovi") / "data",
        categories=SYNTHETIC_CATEGORIES,
        num_train=NUM_TRAIN,
        num_test=NUM_TEST,
        image_size=SIZE,
        seed=3,
        layout="autovi",
    )


def _small(tmp_path: Path, layout: str = "mvtec") -> Path:
    """A fresh tiny dataset a test may damage: one category, 2 train, 4 test (2 good)."""
    return generate_synthetic_dataset(
        tmp_path / layout,
        categories=("washer",),
        num_train=2,
        num_test=4,
        image_size=32,
        seed=0,
        layout=layout,
    )


# ---------------------------------------------------------------------------------------------
# Synthetic generator


def test_generator_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    def generate(name: str, seed: int) -> dict[str, bytes]:
        root = generate_synthetic_dataset(
            tmp_path / name,
            ("stripes", "washer"),
            num_train=3,
            num_test=6,
            image_size=48,
            seed=seed,
        )
        return _files(root)

    a, b, c = generate("a", 5), generate("b", 5), generate("c", 6)
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if "/train/" in k or "/test/" in k]
    differing = [k for k in images if a[k] != c[k]]
    assert len(differing) == len(images)


def test_generator_refuses_non_empty_root(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        generate_synthetic_dataset(tmp_path, num_train=1, num_test=0)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("categories", ("stripes", "nope")),
        ("categories", ()),
        ("categories", "stripes"),
        ("categories", ("mesh", "mesh")),
        ("num_train", 0),
        ("num_test", -1),
        ("image_size", 16),
        ("image_size", 64.0),
        ("seed", -1),
        ("layout", "coco"),
    ],
)
def test_synthetic_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field if field != "categories" else "categor"):
        SyntheticConfig(**{field: value})  # type: ignore[arg-type]


def test_mvtec_layout_on_disk(mvtec_root: Path) -> None:
    plan = SyntheticConfig(num_test=NUM_TEST).test_plan()
    assert plan[:5] == ["good"] * 5
    per_defect = Counter(plan)
    expected: set[str] = set()
    for category in SYNTHETIC_CATEGORIES:
        expected |= {f"{category}/train/good/{i:03d}.png" for i in range(NUM_TRAIN)}
        for defect, n in per_defect.items():
            expected |= {f"{category}/test/{defect}/{k:03d}.png" for k in range(n)}
            if defect != "good":
                expected |= {f"{category}/ground_truth/{defect}/{k:03d}_mask.png" for k in range(n)}
    assert set(_files(mvtec_root)) == expected


def test_autovi_layout_on_disk(autovi_root: Path) -> None:
    files = set(_files(autovi_root))
    for category in SYNTHETIC_CATEGORIES:
        assert f"{category}/defects_config.json" in files
        gt = sorted(f for f in files if f.startswith(f"{category}/ground_truth/"))
        assert gt == [
            f"{category}/ground_truth/combined/000/0000.png",
            f"{category}/ground_truth/combined/000/0001.png",
            f"{category}/ground_truth/missing/000/0000.png",
            f"{category}/ground_truth/scratch/000/0000.png",
            f"{category}/ground_truth/scratch/001/0000.png",
            f"{category}/ground_truth/spot/000/0000.png",
        ]
        config = json.loads((autovi_root / category / "defects_config.json").read_text())
        assert isinstance(config, list)
        assert {e["defect_name"] for e in config} == {"scratch", "spot", "missing"}


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_defect_changes_image_exactly_on_its_mask(category: str) -> None:
    good, good_channels = render_synthetic_image(category, 96, np.random.default_rng(11))
    assert good_channels == []
    for defect in SYNTHETIC_DEFECTS:
        image, channels = render_synthetic_image(
            category, 96, np.random.default_rng(11), defect=defect
        )
        assert len(channels) == (2 if defect == "combined" else 1)
        union = np.logical_or.reduce(channels)
        assert all(c.dtype == bool and c.shape == (96, 96) and c.any() for c in channels)
        changed = np.abs(image.astype(int) - good.astype(int)).max(axis=2)
        # Outside the mask the pixels are identical; inside nearly all of them clearly changed.
        assert not changed[~union].any(), (category, defect)
        assert (changed[union] > 20).mean() > 0.9, (category, defect)
        # Visible but local.
        assert 0.002 < union.mean() < 0.05, (category, defect, union.mean())


def test_files_on_disk_are_the_documented_renders(mvtec_root: Path, autovi_root: Path) -> None:
    plan = SyntheticConfig(num_test=NUM_TEST).test_plan()
    j = plan.index("combined")
    for category in ("screw", "fabric"):
        image, channels = render_synthetic_image(
            category, SIZE, synthetic_image_rng(3, category, "test", j), "combined"
        )
        on_disk = np.asarray(Image.open(mvtec_root / category / "test/combined/000.png"))
        assert np.array_equal(on_disk, image)
        mask = np.asarray(Image.open(mvtec_root / category / "ground_truth/combined/000_mask.png"))
        assert np.array_equal(mask, np.logical_or.reduce(channels).astype(np.uint8) * 255)
        values = {t.name: t.pixel_value for t in synthetic_defect_types(SIZE)}
        for c, kind in enumerate(("scratch", "spot")):
            raw = np.asarray(
                Image.open(autovi_root / category / f"ground_truth/combined/000/{c:04d}.png")
            )
            assert np.array_equal(raw, channels[c].astype(np.uint8) * values[kind])


def test_defects_are_detectable_by_a_patch_nearest_neighbour_detector(mvtec_root: Path) -> None:
    """A PatchCore-like detector on raw 8x8 RGB patches must rank every defect image above
    every good one: the defects are visible and normal variation is small."""
    train, test = MVTecDataset(mvtec_root), MVTecDataset(mvtec_root, split="test")

    def patches(image: np.ndarray) -> np.ndarray:
        windows = np.lib.stride_tricks.sliding_window_view(image.astype(np.float32), (8, 8, 3))
        return windows[::4, ::4, 0].reshape(-1, 8 * 8 * 3)

    for category in SYNTHETIC_CATEGORIES:
        bank = np.concatenate(
            [patches(train.load_image(i)) for i, s in enumerate(train) if s.category == category]
        )
        bank_sq = (bank**2).sum(1)
        scores: dict[int, list[float]] = {0: [], 1: []}
        for i, sample in enumerate(test):
            if sample.category != category:
                continue
            q = patches(test.load_image(i))
            d2 = (q**2).sum(1)[:, None] + bank_sq[None] - 2 * q @ bank.T
            scores[sample.label].append(float(np.sqrt(np.maximum(d2.min(1), 0)).max()))
        assert len(scores[0]) == 5 and len(scores[1]) == 5
        assert min(scores[1]) > max(scores[0]), (category, scores)


def test_categories_look_clearly_different(mvtec_root: Path) -> None:
    """Colour statistics alone identify the category (leave-one-out 1-NN is always right)."""
    train = MVTecDataset(mvtec_root)
    feats, cats = [], []
    for i, sample in enumerate(train):
        img = train.load_image(i).reshape(-1, 3).astype(np.float64)
        feats.append(np.concatenate([img.mean(0), img.std(0)]))
        cats.append(sample.category)
    x = np.asarray(feats)
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(d, np.inf)
    nearest = d.argmin(1)
    assert all(cats[int(n)] == c for n, c in zip(nearest, cats, strict=True))
    # And the categories are far apart relative to their own spread.
    within = max(
        d[i][[j for j in range(len(cats)) if cats[j] == cats[i]]].min() for i in range(len(cats))
    )
    between = min(
        d[i][[j for j in range(len(cats)) if cats[j] != cats[i]]].min() for i in range(len(cats))
    )
    assert between > 3 * within


# ---------------------------------------------------------------------------------------------
# Readers


def test_mvtec_reader_reads_what_the_generator_wrote(mvtec_root: Path) -> None:
    train = MVTecDataset(mvtec_root)
    assert train.categories == tuple(sorted(SYNTHETIC_CATEGORIES))
    assert len(train) == NUM_TRAIN * len(SYNTHETIC_CATEGORIES)
    assert not train.labels.any()
    assert {s.split for s in train} == {"train"}

    test = MVTecDataset(mvtec_root, split="test")
    assert len(test) == NUM_TEST * len(SYNTHETIC_CATEGORIES)
    assert test.labels.tolist() == [int(s.defect != "good") for s in test]
    per_category = {"good": 5, "scratch": 2, "spot": 1, "missing": 1, "combined": 1}
    assert Counter(s.defect for s in test) == {
        defect: n * len(SYNTHETIC_CATEGORIES) for defect, n in per_category.items()
    }
    for i, sample in enumerate(test):
        image = test.load_image(i)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        mask = test.load_mask(i)
        assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
        assert mask.any() == sample.is_anomalous
        channels = test.load_mask_channels(i)
        assert len(channels) == (1 if sample.is_anomalous else 0)
        if sample.is_anomalous:
            assert sample.mask_paths == (
                mvtec_root
                / sample.category
                / "ground_truth"
                / sample.defect
                / f"{sample.image_path.stem}_mask.png",
            )
            assert np.array_equal(channels[0], mask)
            [channel] = test.load_defect_channels(i)
            assert channel.defect == sample.defect and channel.saturation == DEFAULT_SATURATION
    assert test.defect_config("washer") == {}


def test_mvtec_reader_category_selection(mvtec_root: Path) -> None:
    one = MVTecDataset(mvtec_root, categories="washer", split="test")
    assert one.categories == ("washer",) and len(one) == NUM_TEST
    two = MVTecDataset(mvtec_root, categories=["washer", "mesh"])
    # Category order as given, each sorted inside.
    assert [s.category for s in two] == ["washer"] * NUM_TRAIN + ["mesh"] * NUM_TRAIN
    assert [s.image_path.name for s in two][:3] == ["000.png", "001.png", "002.png"]
    with pytest.raises(ValueError, match="duplicate"):
        MVTecDataset(mvtec_root, categories=["mesh", "mesh"])
    with pytest.raises(ValueError, match="split"):
        MVTecDataset(mvtec_root, split="val")


def test_autovi_reader_reads_channels_and_configs(mvtec_root: Path, autovi_root: Path) -> None:
    test = AutoVIDataset(autovi_root, objects=None, split="test")
    mvtec = MVTecDataset(mvtec_root, split="test")
    assert len(test) == len(mvtec) and test.categories == mvtec.categories
    expected = {
        "scratch": SaturationSpec(1.0, relative=True),
        "spot": SaturationSpec(0.5, relative=True),
        "missing": SaturationSpec(float(round(0.004 * SIZE * SIZE)), relative=False),
    }
    for category in test.categories:
        assert test.defect_config(category) == expected
    for i, (sample, twin) in enumerate(zip(test, mvtec, strict=True)):
        assert (sample.category, sample.defect, sample.image_path.name) == (
            twin.category,
            twin.defect,
            twin.image_path.name,
        )
        # Same seed: identical images in both layouts, and the union of the AutoVI channels is
        # the MVTec mask.
        assert np.array_equal(test.load_image(i), mvtec.load_image(i))
        assert np.array_equal(test.load_mask(i), mvtec.load_mask(i))
        channels = test.load_mask_channels(i)
        assert len(channels) == {"good": 0, "combined": 2}.get(sample.defect, 1)
        defect_channels = test.load_defect_channels(i)
        names = [c.defect for c in defect_channels]
        if sample.defect == "combined":
            assert names == ["scratch", "spot"]
        elif sample.is_anomalous:
            assert names == [sample.defect]
        for c, plain in zip(defect_channels, channels, strict=True):
            assert c.saturation == expected[c.defect]
            assert np.array_equal(c.mask, plain) and c.mask.any()
            # The file holds the pixel value, not 255: the reader must not test for 255.
            raw = np.asarray(Image.open(c.path))
            assert set(np.unique(raw).tolist()) == {
                0,
                {"scratch": 60, "spot": 120, "missing": 180}[c.defect],
            }


def test_autovi_objects_constant_and_selection(autovi_root: Path) -> None:
    assert AUTOVI_OBJECTS == (
        "engine_wiring",
        "pipe_clip",
        "pipe_staple",
        "tank_screw",
        "underbody_pipes",
        "underbody_screw",
    )
    train = AutoVIDataset(root=autovi_root, objects=["stripes", "screw"], split="train")
    assert train.categories == ("screw", "stripes") and len(train) == 2 * NUM_TRAIN
    # A subset keeps only the configs of the categories it still holds.
    screws = train.subset([i for i, s in enumerate(train) if s.category == "screw"])
    assert screws.defect_config("screw") == train.defect_config("screw") != {}
    with pytest.raises(DatasetError, match="stripes"):
        screws.defect_config("stripes")
    with pytest.raises(DatasetError, match="nope"):
        AutoVIDataset(autovi_root, objects=["nope"])


def test_image_folder_dataset(tmp_path: Path) -> None:
    root = tmp_path / "site_a"
    pixels = np.zeros((8, 8, 3), np.uint8)
    for rel in ["b.png", "a/z.JPG", "a/c.jpeg", "a/deeper/x.bmp", "t.tif"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(
            root / rel, format=Image.registered_extensions()[Path(rel).suffix.lower()]
        )
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(pixels).save(root / ".hidden" / "h.png")
    Image.fromarray(pixels).save(root / ".dot.png")
    ds = ImageFolderDataset(root)
    assert [s.image_path.relative_to(root).as_posix() for s in ds] == [
        "a/c.jpeg",
        "a/deeper/x.bmp",
        "a/z.JPG",
        "b.png",
        "t.tif",
    ]
    assert ds.categories == ("site_a",) and not ds.labels.any()
    assert ds.load_image(1).shape == (8, 8, 3)
    assert not ds.load_mask(0).any() and ds.load_mask_channels(0) == []
    assert ImageFolderDataset(root, category="bottle").categories == ("bottle",)
    with pytest.raises(DatasetError, match=str(tmp_path / "empty")):
        (tmp_path / "empty").mkdir()
        ImageFolderDataset(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# AnomalyDataset and ImageSample


def test_anomaly_dataset_sequence_api(mvtec_root: Path) -> None:
    ds = MVTecDataset(mvtec_root, split="test")
    assert len(list(ds)) == len(ds)
    assert ds[-1] == ds[len(ds) - 1]
    head = ds[:3]
    assert isinstance(head, AnomalyDataset) and list(head) == list(ds)[:3]
    picked = ds.subset([5, 0, 5])
    assert list(picked) == [ds[5], ds[0], ds[5]]
    assert ds.subset(np.array([2, 1])) == AnomalyDataset([ds[2], ds[1]])
    assert len(ds.subset([])) == 0
    with pytest.raises(IndexError, match="999"):
        ds.subset([0, 999])
    with pytest.raises(TypeError):
        ds.subset(np.ones(len(ds), dtype=bool))
    # Plain data: copies compare equal and hold no file handles.
    assert copy.deepcopy(ds) == ds
    assert all(isinstance(v, tuple | Path | str) for s in ds for v in vars(s).values())


def test_dataset_construction_is_lazy(tmp_path: Path) -> None:
    root = _small(tmp_path)
    bad = root / "washer" / "train" / "good" / "000.png"
    bad.write_bytes(b"definitely not a png")
    ds = MVTecDataset(root)  # paths only: the corrupt file is not opened here
    assert len(ds) == 2
    ds.load_image(1)
    with pytest.raises(DatasetError, match=str(bad)):
        ds.load_image(0)


def test_image_sample_validation() -> None:
    # str and list are accepted at run time and normalised to Path and tuple.
    good = ImageSample(image_path="a.png", category="c", split="train")  # type: ignore[arg-type]
    assert good.image_path == Path("a.png") and good.label == 0 and not good.is_anomalous
    bad = ImageSample(Path("b.png"), "c", "test", "scratch", [Path("m.png")])  # type: ignore[arg-type]
    assert bad.label == 1 and bad.is_anomalous and bad.mask_paths == (Path("m.png"),)
    with pytest.raises(ValueError, match="good image"):
        ImageSample(Path("a.png"), "c", "test", "good", (Path("m.png"),))
    with pytest.raises(ValueError, match="no mask"):
        ImageSample(Path("a.png"), "c", "test", "scratch")
    with pytest.raises(ValueError, match="split"):
        ImageSample(Path("a.png"), "c", "val")
    with pytest.raises(ValueError, match="category"):
        ImageSample(Path("a.png"), "", "train")


# ---------------------------------------------------------------------------------------------
# Errors that name the offending path


def test_missing_root_and_category(tmp_path: Path) -> None:
    root = _small(tmp_path)
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        MVTecDataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=str(root / "bottle")):
        MVTecDataset(root, categories=["washer", "bottle"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=str(empty)):
        MVTecDataset(empty)


def test_category_without_train_good(tmp_path: Path) -> None:
    root = _small(tmp_path)
    shutil.rmtree(root / "washer" / "train" / "good")
    with pytest.raises(DatasetError, match=str(root / "washer")) as info:
        MVTecDataset(root, split="test")
    assert "train/good" in str(info.value)


def test_missing_split_folder(tmp_path: Path) -> None:
    root = _small(tmp_path)
    with pytest.raises(DatasetError, match=str(root / "washer" / "validation")):
        MVTecDataset(root, split="validation")


def test_defect_image_without_mask(tmp_path: Path) -> None:
    root = _small(tmp_path)
    mask = root / "washer" / "ground_truth" / "scratch" / "000_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError) as info:
        MVTecDataset(root, split="test")
    assert str(root / "washer" / "test" / "scratch" / "000.png") in str(info.value)
    assert str(mask) in str(info.value)

    autovi = _small(tmp_path, "autovi")
    shutil.rmtree(autovi / "washer" / "ground_truth" / "spot" / "000")
    with pytest.raises(DatasetError, match=str(autovi / "washer" / "test" / "spot" / "000.png")):
        AutoVIDataset(autovi, split="test")


def test_mask_size_mismatch_names_both_files(tmp_path: Path) -> None:
    root = _small(tmp_path)
    mask = root / "washer" / "ground_truth" / "spot" / "000_mask.png"
    ds = MVTecDataset(root, split="test")  # read while the mask was right, damaged afterwards
    Image.fromarray(np.full((16, 32), 255, np.uint8)).save(mask)
    i = next(i for i, s in enumerate(ds) if s.defect == "spot")
    for load in (ds.load_mask, ds.load_mask_channels, ds.load_defect_channels):
        with pytest.raises(DatasetError) as info:
            load(i)
        assert str(mask) in str(info.value) and str(ds[i].image_path) in str(info.value)


@pytest.mark.parametrize("layout", ["mvtec", "autovi"])
def test_wrong_size_mask_is_refused_when_the_dataset_is_read(tmp_path: Path, layout: str) -> None:
    """Before any fit or predict: the reader compares mask and image headers."""
    root = _small(tmp_path, layout)
    test_dir = root / "washer" / "test" / "spot"
    image = sorted(test_dir.iterdir())[0]
    if layout == "mvtec":
        mask = root / "washer" / "ground_truth" / "spot" / f"{image.stem}_mask.png"
        reader = MVTecDataset
    else:
        mask = sorted((root / "washer" / "ground_truth" / "spot" / image.stem).iterdir())[0]
        reader = AutoVIDataset
    Image.fromarray(np.full((16, 32), 255, np.uint8)).save(mask)
    reader(root, split="train")  # the train split has no masks and is unaffected
    with pytest.raises(DatasetError) as info:
        reader(root, split="test")
    assert str(mask) in str(info.value) and str(image) in str(info.value)
    assert "32x16" in str(info.value)


def test_corrupt_mask_is_reported_when_reading_and_loading(tmp_path: Path) -> None:
    root = _small(tmp_path)
    mask = root / "washer" / "ground_truth" / "scratch" / "000_mask.png"
    ds = MVTecDataset(root, split="test")
    mask.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    i = next(i for i, s in enumerate(ds) if s.defect == "scratch")
    with pytest.raises(DatasetError, match=str(mask)):
        ds.load_mask(i)
    with pytest.raises(DatasetError, match=str(mask)):
        MVTecDataset(root, split="test")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "malformed JSON"),
        ('"a string"', "expected a JSON list"),
        ("[]", "no defect entries"),
        ('[{"defect_name": "x", "pixel_value": 1, "saturation_threshold": 1.0}]', "missing"),
        (
            '[{"defect_name": "x", "pixel_value": 300, "saturation_threshold": 1.0,'
            ' "relative_saturation": true}]',
            "pixel_value",
        ),
        (
            '[{"defect_name": "x", "pixel_value": 1, "saturation_threshold": 2.0,'
            ' "relative_saturation": true}]',
            "2.0",
        ),
        (
            '[{"defect_name": "x", "pixel_value": 1, "saturation_threshold": 0,'
            ' "relative_saturation": false}]',
            "threshold",
        ),
        (
            '[{"defect_name": "x", "pixel_value": 1, "saturation_threshold": 1.0,'
            ' "relative_saturation": "yes"}]',
            "relative_saturation",
        ),
        (
            '[{"defect_name": "x", "pixel_value": 1, "saturation_threshold": 1.0,'
            ' "relative_saturation": true, "pixel_vlaue": 2}]',
            "unknown field",
        ),
        (
            '[{"defect_name": "x", "pixel_value": 1, "saturation_threshold": 1.0,'
            ' "relative_saturation": true}, {"defect_name": "y", "pixel_value": 1,'
            ' "saturation_threshold": 1.0, "relative_saturation": true}]',
            "duplicate pixel_value",
        ),
    ],
)
def test_malformed_defects_config(tmp_path: Path, content: str, needle: str) -> None:
    root = _small(tmp_path, "autovi")
    config = root / "washer" / "defects_config.json"
    config.write_text(content)
    with pytest.raises(DatasetError) as info:
        AutoVIDataset(root, split="test")
    assert str(config) in str(info.value) and needle in str(info.value)


def test_missing_defects_config(tmp_path: Path) -> None:
    root = _small(tmp_path, "autovi")
    config = root / "washer" / "defects_config.json"
    config.unlink()
    with pytest.raises(DatasetError, match=str(config)):
        AutoVIDataset(root)


def test_channel_with_unknown_pixel_value(tmp_path: Path) -> None:
    root = _small(tmp_path, "autovi")
    channel = root / "washer" / "ground_truth" / "scratch" / "000" / "0000.png"
    raw = np.asarray(Image.open(channel)).copy()
    raw[raw > 0] = 77
    Image.fromarray(raw).save(channel)
    ds = AutoVIDataset(root, split="test")
    i = next(i for i, s in enumerate(ds) if s.defect == "scratch")
    assert ds.load_mask(i).any()  # plain masks only need non-zero pixels
    with pytest.raises(DatasetError, match="77") as info:
        ds.load_defect_channels(i)
    assert str(channel) in str(info.value)


def test_defects_config_formats_round_trip(tmp_path: Path) -> None:
    types = synthetic_defect_types(128)
    path = tmp_path / "defects_config.json"
    path.write_text(defects_config_to_json(types))
    assert load_defects_config(path) == types
    as_dict = {
        t.name: {
            "pixel_value": t.pixel_value,
            "saturation_threshold": t.saturation.threshold,
            "relative_saturation": t.saturation.relative,
        }
        for t in types
    }
    assert parse_defects_config(as_dict, "inline") == types
    # The reference evaluation code expects an int for absolute (pixel) thresholds.
    entries = json.loads(path.read_text())
    assert entries[2]["saturation_threshold"] == 66 and isinstance(
        entries[2]["saturation_threshold"], int
    )
    with pytest.raises(ValueError, match="pixel_value"):
        DefectType("x", 0, SaturationSpec(1.0, relative=True))


# ---------------------------------------------------------------------------------------------
# Partitioners


def _fake(counts: dict[str, int]) -> AnomalyDataset:
    """A dataset of non-existent files: partitioning never touches the disk."""
    return AnomalyDataset(
        ImageSample(Path(f"/nonexistent/{c}/{i:04d}.png"), c, "train")
        for c, n in counts.items()
        for i in range(n)
    )


def _check_partition(parts: list[np.ndarray], dataset: AnomalyDataset, k: int) -> None:
    assert len(parts) == k
    assert all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(dataset)))  # disjoint and covering


PARTITIONERS = [
    CategoryPartitioner(num_clients=2),
    CategoryPartitioner(num_clients=5),
    CategoryPartitioner(num_clients=9),
    IIDPartitioner(num_clients=4, seed=1),
    DirichletPartitioner(num_clients=4, alpha=0.01, seed=2),
    DirichletPartitioner(num_clients=7, alpha=1.0, seed=3),
]


@pytest.mark.parametrize("partitioner", PARTITIONERS, ids=repr)
def test_partitions_are_disjoint_covering_non_empty_and_deterministic(partitioner) -> None:
    dataset = _fake({"a": 12, "b": 5, "c": 3, "d": 1})
    parts = partitioner.partition_indices(dataset)
    _check_partition(parts, dataset, partitioner.num_clients)
    again = type(partitioner)(**vars(partitioner)).partition_indices(dataset)
    assert [p.tolist() for p in parts] == [p.tolist() for p in again]
    datasets = partitioner.partition(dataset)
    assert [list(d) for d in datasets] == [[dataset[i] for i in p] for p in parts]


def test_category_partition_fewer_clients_keeps_categories_whole() -> None:
    dataset = _fake({"a": 10, "b": 9, "c": 8, "d": 3})
    parts = CategoryPartitioner(num_clients=2).partition(dataset)
    # Largest first to the lightest client: a->0, b->1, c->1 (9 < 10), d->0 (10 < 17).
    assert [d.categories for d in parts] == [("a", "d"), ("b", "c")]
    assert [len(d) for d in parts] == [13, 17]
    one = CategoryPartitioner(num_clients=1).partition(dataset)
    assert len(one) == 1 and one[0] == dataset


def test_category_partition_more_clients_splits_fewest_categories() -> None:
    dataset = _fake({"a": 30, "b": 10})
    parts = CategoryPartitioner(num_clients=5).partition(dataset)
    # Every client holds one category; a is split 4 ways (30/1, 15, 10 tie broken by size).
    assert [d.categories for d in parts] == [("a",)] * 4 + [("b",)]
    assert [len(d) for d in parts] == [8, 8, 7, 7, 10]
    # Round-robin dealing: each a-client gets every 4th image.
    assert [s.image_path.name for s in parts[1]][:3] == ["0001.png", "0005.png", "0009.png"]


def test_category_partition_spreads_each_category_over_as_few_clients_as_possible() -> None:
    dataset = _fake({"a": 7, "b": 7, "c": 7})
    for k in range(1, 10):
        parts = CategoryPartitioner(num_clients=k).partition(dataset)
        holders = Counter(c for d in parts for c in d.categories)
        if k <= 3:
            assert set(holders.values()) == {1}
        else:
            # k clients, none empty, each with one category: spreads add up to exactly k and
            # differ by at most one between equal-sized categories.
            assert all(len(d.categories) == 1 for d in parts)
            assert sum(holders.values()) == k
            assert max(holders.values()) - min(holders.values()) <= 1


def test_iid_partition_balanced_and_seeded() -> None:
    dataset = _fake({"a": 50, "b": 53})
    parts = IIDPartitioner(num_clients=4, seed=0).partition_indices(dataset)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    other = IIDPartitioner(num_clients=4, seed=1).partition_indices(dataset)
    assert [p.tolist() for p in parts] != [p.tolist() for p in other]


def _category_shares(parts: list[AnomalyDataset], categories: list[str]) -> np.ndarray:
    """[categories, clients] fraction of each category held by each client."""
    counts = np.array(
        [[sum(s.category == c for s in d) for d in parts] for c in categories], dtype=float
    )
    return counts / counts.sum(axis=1, keepdims=True)


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_uniform() -> None:
    categories = ["a", "b", "c", "d"]
    dataset = _fake(dict.fromkeys(categories, 300))
    k = 4
    skewed = _category_shares(
        DirichletPartitioner(k, alpha=0.05, seed=0).partition(dataset), categories
    )
    uniform = _category_shares(
        DirichletPartitioner(k, alpha=1000.0, seed=0).partition(dataset), categories
    )
    assert skewed.max(axis=1).mean() > 0.8
    assert np.abs(uniform - 1 / k).max() < 0.06
    other_seed = DirichletPartitioner(k, alpha=0.05, seed=1).partition_indices(dataset)
    same_seed = DirichletPartitioner(k, alpha=0.05, seed=0).partition_indices(dataset)
    assert [p.tolist() for p in other_seed] != [p.tolist() for p in same_seed]


def test_dirichlet_never_leaves_a_client_empty() -> None:
    dataset = _fake({"a": 6, "b": 4})
    for seed in range(20):
        parts = DirichletPartitioner(num_clients=10, alpha=0.001, seed=seed).partition_indices(
            dataset
        )
        _check_partition(parts, dataset, 10)


@pytest.mark.parametrize(
    ("factory", "needle"),
    [
        (lambda: CategoryPartitioner(num_clients=0), "num_clients"),
        (lambda: CategoryPartitioner(num_clients=True), "num_clients"),
        (lambda: IIDPartitioner(num_clients=2.0), "num_clients"),  # type: ignore[arg-type]
        (lambda: IIDPartitioner(num_clients=2, seed=-1), "seed"),
        (lambda: DirichletPartitioner(num_clients=2, alpha=0.0), "alpha"),
        (lambda: DirichletPartitioner(num_clients=2, alpha=-1.0), "alpha"),
        (lambda: DirichletPartitioner(num_clients=2, alpha=float("nan")), "alpha"),
    ],
)
def test_partitioner_arguments_are_validated(factory, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        factory()


@pytest.mark.parametrize(
    "partitioner",
    [CategoryPartitioner(num_clients=4), IIDPartitioner(4), DirichletPartitioner(4, alpha=1.0)],
    ids=repr,
)
def test_more_clients_than_images_is_rejected(partitioner) -> None:
    with pytest.raises(ValueError, match=r"4 clients.*only 3 images"):
        partitioner.partition(_fake({"a": 2, "b": 1}))


def test_photo_dataset_is_deterministic_with_exact_defect_masks(tmp_path: Path) -> None:
    from core.data import GOOD, AutoVIDataset
    from core.data.photos import (
        PHOTO_CATEGORIES,
        generate_photo_dataset,
        photo_image_rng,
        render_photo_image,
    )

    a = generate_photo_dataset(tmp_path / "a", ["flower", "china_left"], 2, 4, 64, seed=3)
    b = generate_photo_dataset(tmp_path / "b", ["flower", "china_left"], 2, 4, 64, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    test = AutoVIDataset(a, split="test")
    assert len(test) == 8 and test.labels.sum() == 4
    # Same generator state with and without a defect: the images differ on the mask only
    # (up to the sensor noise, which is drawn alike).
    good, _ = render_photo_image("flower", 64, photo_image_rng(0, "flower", "test", 5))
    bad, channels = render_photo_image(
        "flower", 64, photo_image_rng(0, "flower", "test", 5), "spot"
    )
    assert len(channels) == 1 and channels[0].sum() >= 0.004 * 64 * 64
    differs = np.abs(good.astype(int) - bad.astype(int)).max(axis=2) > 0
    assert differs.any() and not differs[~channels[0]].any()
    assert GOOD not in PHOTO_CATEGORIES
    with pytest.raises(ValueError, match="categories"):
        generate_photo_dataset(tmp_path / "c", ["brick"], 1, 1, 64)
    with pytest.raises(FileExistsError):
        generate_photo_dataset(a, ["flower"], 1, 1, 64)
