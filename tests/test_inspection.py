"""Calibrated decisions (issue 20): thresholds, site model files, decisions, the watcher.

Small on purpose: resnet18 with random weights at 64 px on generated images (tests/conftest.py),
so each test takes seconds. The statistical checks compare counts with their exact
distributions (binomial / beta-binomial) at a 99.9 % level, so a correct implementation fails
about once in a thousand runs at most, and a wrong order statistic (the median, the maximum,
an off-by-one rank) fails them.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import betabinom, binom

from core.calibration import (
    CalibrationError,
    Normalisation,
    calibrate,
    minimum_images,
    split_validation,
    threshold_at_f1,
    threshold_at_fpr,
)
from core.data import ImageFolderDataset, MVTecDataset, generate_synthetic_dataset
from core.ivf import IVFIndex
from core.knn import NearestNeighbourIndex
from core.patchcore import FeatureMismatchError, PatchCore, PatchCoreConfig
from core.preprocess import ImageTransform
from core.sitemodel import SITE_MODEL_FILE, SiteModel
from fedclient import cli
from fedclient.inspect import COLUMNS, DECISIONS_CSV, DECISIONS_JSONL, FolderWatcher
from tests.conftest import SMALL_FEATURES

#: No crop, so masks come back at each image's original size.
FEATURES = replace(SMALL_FEATURES, transform=ImageTransform(resize=64, crop=None))
LEVEL = 0.999


@pytest.fixture(scope="module")
def good_images(tmp_path_factory: pytest.TempPathFactory) -> ImageFolderDataset:
    """100 generated good images of one part (64 px)."""
    root = tmp_path_factory.mktemp("good") / "data"
    generate_synthetic_dataset(root, categories=("washer",), num_train=100, num_test=0,
                               image_size=64, seed=3, layout="mvtec")
    return ImageFolderDataset(root / "washer" / "train" / "good")


@pytest.fixture(scope="module")
def fitted(good_images: ImageFolderDataset) -> PatchCore:
    """A bank fitted on the first 20 images."""
    return PatchCore(PatchCoreConfig(features=FEATURES, coreset_size=400)).fit(
        good_images.subset(range(20))
    )


@pytest.fixture(scope="module")
def site_model_file(
    tmp_path_factory: pytest.TempPathFactory, fitted: PatchCore, good_images: ImageFolderDataset
) -> Path:
    """A site model calibrated at a 10 % target on 39 held-out good images."""
    site_model = SiteModel.from_model(fitted, search="exact", provenance={"bank_version": 7})
    site_model.calibrate(good_images.subset(range(20, 59)), target_fpr=0.1,
                         pixel_target_fpr=0.02)
    return site_model.save(tmp_path_factory.mktemp("model") / SITE_MODEL_FILE)


# --- thresholds --------------------------------------------------------------------------------


def test_order_statistic_meets_the_target_rate_on_generated_scores() -> None:
    """Over many independent validation sets, the rate at which a fresh good score exceeds the
    threshold is (n + 1 - k) / (n + 1) <= target: the split-conformal guarantee."""
    rng = np.random.default_rng(0)
    n, target, trials = 199, 0.01, 4000
    k = int(np.ceil((n + 1) * (1 - target)))
    assert threshold_at_fpr(rng.gamma(2.0, size=n), target).rank == k == 198
    flagged = 0
    for _ in range(trials):
        estimate = threshold_at_fpr(rng.gamma(2.0, size=n), target, bound=False)
        flagged += int(rng.gamma(2.0) > estimate.value)
    expected = (n + 1 - k) / (n + 1)
    assert expected <= target
    low, high = binom.interval(LEVEL, trials, expected)
    assert low <= flagged <= high, (flagged, low, high)


def test_calibrated_threshold_holds_its_rate_on_held_out_good_images(
    good_images: ImageFolderDataset, site_model_file: Path
) -> None:
    """The whole path on generated images: threshold from 39 good validation images at a 10 %
    target, false positives counted on 41 other good images."""
    site_model = SiteModel.load(site_model_file)
    calibration = site_model.calibration
    assert calibration is not None and not calibration.uncertain
    assert (calibration.image.rank, calibration.image.num_good) == (36, 39)
    validation, _ = site_model.inferencer().predict(good_images.subset(range(20, 59)))
    assert calibration.threshold == pytest.approx(np.sort(validation.image_scores)[35])
    held_out, _ = site_model.inferencer().predict(good_images.subset(range(59, 100)))
    flagged = int(calibration.decide(held_out.image_scores).sum())
    # exchangeable good images: the count is beta-binomial(m, n + 1 - k, k)
    low, high = betabinom.interval(LEVEL, 41, 40 - 36, 36)
    assert low <= flagged <= high, (flagged, low, high)
    # pixel threshold: the order statistic of the validation pixels at 2 %
    pixels = validation.anomaly_maps.reshape(-1)
    k = int(np.ceil((pixels.size + 1) * 0.98))
    assert calibration.pixel_threshold == pytest.approx(np.partition(pixels, k - 1)[k - 1])


def test_too_few_good_images_say_so() -> None:
    estimate = threshold_at_fpr(np.arange(12.0), 0.01)
    assert estimate.uncertain and estimate.method == "fpr-max" and estimate.value == 11.0
    assert "12 good images cannot support a 0.01 false-positive rate" in estimate.note
    assert "needs at least 99" in estimate.note and minimum_images(0.01) == 99
    assert not threshold_at_fpr(np.arange(99.0), 0.01).uncertain
    result = calibrate(np.arange(12.0), np.zeros((12, 4, 4)))
    assert result.uncertain and "calibration uncertain" in result.summary()


def test_f1_threshold_with_labelled_validation_defects() -> None:
    scores = np.array([0.1, 0.2, 0.35, 0.3, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    estimate = threshold_at_f1(scores, labels)
    # flagging {0.9, 0.8}: F1 4/5; {.., 0.35}: 4/6; {.., 0.3}: tp 3, fp 1 -> F1 6/7 (best)
    assert estimate.method == "f1" and estimate.f1 == pytest.approx(6 / 7)
    assert estimate.value == pytest.approx((0.3 + 0.2) / 2)  # half-way to the next score
    assert estimate.validation_miss_rate == 0 and estimate.validation_fpr == pytest.approx(1 / 3)
    with pytest.raises(CalibrationError, match="both good and defective"):
        threshold_at_f1(scores[:3], labels[:3])


def test_decisions_are_score_above_threshold_and_half_is_the_threshold() -> None:
    rng = np.random.default_rng(1)
    good = rng.normal(size=300)
    calibration = calibrate(good, rng.random((300, 3, 3)), target_fpr=0.05)
    t = calibration.threshold
    scores = np.concatenate([rng.normal(size=500), [t, np.nextafter(t, np.inf)]])
    decided = calibration.decide(scores)
    np.testing.assert_array_equal(decided, scores > t)
    assert not decided[-2] and decided[-1]  # equal to the threshold: normal
    normalised = calibration.image_normalisation(scores)
    assert normalised[-2] == 0.5 and normalised.min() >= 0 and normalised.max() <= 1
    np.testing.assert_array_equal(normalised > 0.5, decided)
    flat = Normalisation(threshold=2.0, minimum=1.0, maximum=1.0)  # all validation scores equal
    assert flat(np.array([2.0]))[0] == 0.5 and flat(np.array([3.0]))[0] == 1.0


def test_validation_split_is_seeded_and_disjoint() -> None:
    fit, held = split_validation(40, 0.15, seed=5)
    assert held.size == 6 and fit.size == 34 and not set(fit) & set(held)
    again = split_validation(40, 0.15, seed=5)
    np.testing.assert_array_equal(held, again[1])
    assert split_validation(1, 0.5, 0)[1].size == 0  # never holds out the only image
    with pytest.raises(CalibrationError):
        split_validation(10, 1.0, 0)


def test_ivf_search_never_undercuts_the_exact_distance() -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 32)).astype(np.float32) * 4
    bank = (centres[rng.integers(0, 40, 3000)] + rng.normal(size=(3000, 32))).astype(np.float32)
    queries = (centres[rng.integers(0, 40, 500)] + rng.normal(size=(500, 32))).astype(np.float32)
    exact = NearestNeighbourIndex(bank, backend="torch").search(queries, 1)[0][:, 0]
    index = IVFIndex.build(bank, cells=32, seed=0)
    np.testing.assert_array_equal(np.sort(index.rows, axis=0), np.sort(bank, axis=0))
    assert np.all(index.search(queries, 4) >= exact - 1e-4)
    np.testing.assert_allclose(index.search(queries, 32), exact, rtol=1e-4, atol=1e-4)
    close = np.isclose(index.search(queries, 8), exact, rtol=1e-4, atol=1e-4).mean()
    assert close > 0.95  # clustered data: the nearest cells hold the nearest row


# --- the site model file -----------------------------------------------------------------------


def test_site_model_file_round_trips_and_refuses_another_extractor(
    tmp_path: Path, fitted: PatchCore, good_images: ImageFolderDataset, site_model_file: Path
) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    loaded = SiteModel.load(site_model_file)
    assert loaded.bank_version == 7 and loaded.calibration is not None
    np.testing.assert_array_equal(loaded.model.memory_bank, fitted.memory_bank)
    record = SiteModel.read_record(site_model_file)
    assert record["format_version"] == 1 and record["search"]["method"] == "exact"
    # an IVF model keeps its cells, and PatchCore.load still reads it as a bank
    ivf = SiteModel.from_model(fitted, search="ivf")
    ivf.calibrate(good_images.subset(range(20, 30)), target_fpr=0.2)
    path = ivf.save(tmp_path / "ivf.safetensors")
    again = SiteModel.load(path)
    assert again.ivf is not None and again.ivf.cells == ivf.ivf.cells  # type: ignore[union-attr]
    images = good_images.subset(range(30, 34))
    np.testing.assert_array_equal(again.inferencer().predict(images)[0].image_scores,
                                  ivf.inferencer().predict(images)[0].image_scores)
    assert PatchCore.load(path, pretrained=False).memory_bank.shape == fitted.memory_bank.shape
    # other weights than the bank's: refused by the API and by the CLI (one line, status 2)
    torch.manual_seed(99)
    weights = tmp_path / "other.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(weights))
    with pytest.raises(FeatureMismatchError, match="random init"):
        SiteModel.load(site_model_file, weights=str(weights))
    code = cli.main(["score", "--model", str(site_model_file), "--weights", str(weights),
                     "--data", str(good_images.root), "--out", str(tmp_path / "refused")])
    assert code == 2


# --- decisions on an unlabelled folder ---------------------------------------------------------


def test_unlabelled_folder_gets_decisions_masks_and_no_good_captions(
    tmp_path: Path, site_model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_reports import parse_report

    new = tmp_path / "new"
    defects = tmp_path / "gen"
    generate_synthetic_dataset(defects, categories=("washer",), num_train=1, num_test=8,
                               image_size=80, seed=9, layout="mvtec")
    for i, path in enumerate(sorted((defects / "washer" / "test").rglob("*.png"))):
        (new / "line-a").mkdir(parents=True, exist_ok=True)
        Image.open(path).save(new / "line-a" / f"part{i}.png")
    out = tmp_path / "scored"
    code = cli.main(["score", "--model", str(site_model_file), "--data", str(new),
                     "--out", str(out), "--no-overlays"])
    printed = capsys.readouterr().out
    assert code == 0
    with (out / DECISIONS_CSV).open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        rows = list(reader)
    records = [json.loads(line) for line in (out / DECISIONS_JSONL).read_text().splitlines()]
    assert len(rows) == len(records) == 8
    metrics = json.loads((out / "metrics.json").read_text())
    threshold = metrics["calibration"]["image"]["value"]
    for row, record in zip(rows, records, strict=True):
        assert set(COLUMNS) <= set(record) and record["image"] == row["image"]
        assert row["image"].startswith("line-a/part") and row["label"] == ""
        score = float(row["score"])
        assert row["decision"] == ("anomalous" if score > threshold else "normal")
        assert (float(row["normalised_score"]) > 0.5) == (score > threshold)
        mask = np.asarray(Image.open(out / row["mask"]))
        assert mask.shape == (80, 80)  # the image's own size: the transform does not crop
        assert set(np.unique(mask)) <= {0, 255}
        assert int((mask > 0).sum()) == int(row["mask_pixels"]) == record["mask_pixels"]
    counts = metrics["test"]["decisions"]
    anomalous = sum(r["decision"] == "anomalous" for r in rows)
    assert (counts["anomalous"], counts["normal"]) == (anomalous, 8 - anomalous)
    assert f"decisions: {anomalous} anomalous, {8 - anomalous} normal" in printed
    assert "no labels" in printed and "AUROC None" not in printed
    parser = parse_report(out / "report.html")
    captions = (out / "report.html").read_text()
    assert "Decisions" in " ".join(parser.headings)
    assert "| good |" not in captions and ("| anomalous (" in captions or "| normal (" in
                                           captions)


def test_labelled_score_reports_rates_at_the_threshold(
    tmp_path: Path, site_model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "labelled"
    generate_synthetic_dataset(root, categories=("washer",), num_train=1, num_test=12,
                               image_size=64, seed=4, layout="mvtec")
    out = tmp_path / "scored"
    assert cli.main(["score", "--model", str(site_model_file), "--data", str(root),
                     "--out", str(out), "--no-overlays"]) == 0
    test = json.loads((out / "metrics.json").read_text())["test"]
    rows = list(csv.DictReader((out / DECISIONS_CSV).open()))
    labels = MVTecDataset(root, split="test").labels
    flagged = np.array([r["decision"] == "anomalous" for r in rows])
    truth = np.array([r["label"] != "good" for r in rows])
    np.testing.assert_array_equal(np.sort(truth), np.sort(labels.astype(bool)))
    assert test["false_positive_rate"] == pytest.approx(flagged[~truth].mean())
    assert test["miss_rate"] == pytest.approx((~flagged[truth]).mean())
    assert "false-positive rate" in capsys.readouterr().out


# --- the watcher -------------------------------------------------------------------------------


def test_watcher_skips_a_corrupt_file_retries_a_half_written_one_and_goes_on(
    tmp_path: Path, site_model_file: Path, good_images: ImageFolderDataset
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    lines: list[str] = []
    watcher = FolderWatcher(SiteModel.load(site_model_file), folder, tmp_path / "out",
                            settle_s=0.05, retries=4, retry_delay_s=0.4, echo=lines.append)
    runner = threading.Thread(target=watcher.run, kwargs={"max_images": 4}, daemon=True)
    runner.start()
    assert watcher.started.wait(30)
    sources = [good_images[i].image_path.read_bytes() for i in (60, 61, 62)]
    (folder / "a.png").write_bytes(sources[0])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 50)
    with (folder / "slow.png").open("wb") as handle:  # a writer that pauses half-way
        handle.write(sources[1][: len(sources[1]) // 2])
        handle.flush()
        time.sleep(1.0)  # longer than the settle time (the watcher reads half a file), shorter
        # than the 4 retries 0.4 s apart (it is not given up)
        handle.write(sources[1][len(sources[1]) // 2 :])
    (folder / "sub").mkdir()
    (folder / "sub" / "b.png").write_bytes(sources[2])
    runner.join(timeout=60)
    assert not runner.is_alive(), lines
    summary = watcher.summary
    assert summary.images == 3 and [p for p, _ in summary.skipped] == [str(folder / "broken.png")]
    assert summary.retries >= 4 + 1  # broken.png 4 times, slow.png at least once
    skipped = [line for line in lines if line.startswith("skipped")]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    rows = list(csv.DictReader((tmp_path / "out" / DECISIONS_CSV).open()))
    assert sorted(r["image"] for r in rows) == ["a", "slow", "sub/b"]
    assert all(float(r["latency_ms"]) > 0 for r in rows)
    assert len(summary.latencies_ms) == 3 and "latency p50" in summary.line()


def test_inspect_reads_paths_from_stdin(
    tmp_path: Path, site_model_file: Path, good_images: ImageFolderDataset,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    paths = [str(good_images[i].image_path) for i in (70, 71)] + [str(tmp_path / "missing.png")]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(paths) + "\n"))
    assert cli.main(["inspect", "--model", str(site_model_file), "--watch", "-",
                     "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "inspected 2 image(s)" in out and "1 skipped" in out and "missing.png" in out
    assert len((tmp_path / "out" / DECISIONS_JSONL).read_text().splitlines()) == 2


# --- recalibration after every round -----------------------------------------------------------


def test_every_new_bank_is_recalibrated_and_the_model_file_records_its_version(
    tmp_path: Path, synthetic_root: Path
) -> None:
    """A site following a two-round federation (a real fedserver in process) writes a site
    model after each round's bank; the file ends with bank v2 and thresholds of that bank."""
    from fedserver_testing import make_config
    from safetensors.numpy import load_file

    from core.data import AutoVIDataset
    from fedclient.session import ConnectionConfig, RetryPolicy, SiteSession
    from fedclient.site import BANK_FILE, SiteOptions, run_site
    from fedserver.daemon import create_server

    config, tokens = make_config(tmp_path / "server", ["a"], rounds=2, global_bank_size=150)
    server, port = create_server(config)
    server.start()
    out = tmp_path / "site"
    try:
        with SiteSession(ConnectionConfig(f"127.0.0.1:{port}", token=tokens["a"]), "a",
                         retry=RetryPolicy(max_attempts=3)) as session:
            metrics = run_site(session, SiteOptions(
                data=synthetic_root, out_dir=out, features=FEATURES, categories=("washer",),
                coreset_percentage=0.25, validation_share=0.25, target_fpr=0.2,
                round_timeout_s=120, overlays=False, report=False,
            ))
    finally:
        server.stop(0)
    rounds = metrics["rounds"]
    assert [r["calibration"]["bank_version"] for r in rounds] == [1, 2]  # type: ignore[index]
    assert metrics["bank_version"] == 2 and metrics["num_validation_images"] == 3
    record = SiteModel.read_record(out / SITE_MODEL_FILE)
    assert record["provenance"]["bank_version"] == 2  # type: ignore[index]
    assert record["provenance"]["round"] == 2  # type: ignore[index]
    site_model = SiteModel.load(out / SITE_MODEL_FILE)
    bank = load_file(str(out / BANK_FILE))["memory_bank"]
    np.testing.assert_array_equal(np.sort(site_model.model.memory_bank, axis=0),
                                  np.sort(bank, axis=0))
    # the stored thresholds are those of bank v2 on the held-out images
    train = AutoVIDataset(synthetic_root, ["washer"], split="train")
    _, held = split_validation(len(train), 0.25, seed=0)
    stored = site_model.calibration
    assert stored is not None and stored.uncertain  # 3 images cannot support 20 %
    fresh = site_model.calibrate(train.subset(held), target_fpr=0.2)
    assert fresh.threshold == stored.threshold == rounds[1]["calibration"]["threshold"]  # type: ignore[index]
    assert metrics["test"]["decisions"]["anomalous"] + metrics["test"]["decisions"]["normal"] == 8  # type: ignore[index]


def test_latency_benchmark_quick_mode_prints_its_split(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import inspect_latency
    from benchmarks.report import RESULTS

    before = RESULTS.read_bytes()
    assert inspect_latency.main(["--quick", "--no-anomalib"]) == 0
    out = capsys.readouterr().out
    assert "| kNN ms |" in out and "ours ivf" in out and "ours exact" in out
    assert "image scores differ from the exact search's by at most" in out
    assert RESULTS.read_bytes() == before  # printed only: --record appends
