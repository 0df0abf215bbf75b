"""A site's whole job, as ``fedclient run`` does it: fit, join, upload, download, score, report.

The pieces are core's: ``core.federated.PatchCoreClient`` fits the local coreset, finds novel
patches and encodes the upload (summary and chunks), ``core.evaluation.evaluate`` scores;
:class:`~fedclient.session.SiteSession` moves the messages. This module only sequences them and
keeps the site's state in its output folder, so a restarted site carries on:

* ``bank.safetensors``: the newest global bank it received (a PatchCore model file, with the
  bank version, round and radii in its metadata); a later download asks only for the change;
* ``site-model.safetensors``: that bank calibrated on the site's validation images (a held-out
  share of its good training images, never uploaded), rewritten after every round's bank
  (core.sitemodel; what ``fedclient score`` and ``fedclient inspect`` decide with);
* ``decisions.csv`` / ``decisions.jsonl`` / ``masks/``: each test image's decision
  (fedclient.inspect);
* ``metrics.json``: what the run did (per round: rows, chunks, bytes, seconds) and the scores;
* ``overlays/``: one anomaly-map overlay PNG per test image;
* ``report.html``: the same results as one self-contained page for people (fedclient.report).

Where to resume an upload is never stored here: the session asks the server.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.calibration import (
    DEFAULT_PIXEL_TARGET_FPR,
    DEFAULT_TARGET_FPR,
    DEFAULT_VALIDATION_SHARE,
    split_validation,
)
from core.data import AnomalyDataset, AutoVIDataset, DatasetError, ImageFolderDataset, MVTecDataset
from core.data.check import resolve_site_folder
from core.data.imageio import image_size
from core.evaluation import Resolution, evaluate, evaluate_per_category
from core.features import FeatureConfig, check_image_sizes, check_weights
from core.federated import UPLOAD_FACTOR, PatchCoreClient, UploadBudget, short_bank_note
from core.metrics import Curve
from core.patchcore import ModelFileError, PatchCore, Predictions
from core.preprocess import ImageTransform
from core.sitemodel import SITE_MODEL_FILE, SearchSpec, SiteModel, provenance_of
from fedclient.inspect import DecisionWriter, decide, labelled_rates
from fedclient.report import Example, examples, write_metrics, write_overlays, write_site_report
from fedclient.session import (
    BankDownload,
    FingerprintMismatchError,
    RoundConfig,
    SiteSession,
    UploadResult,
)
from fedpatchcore.v1 import federation_pb2 as fpb

logger = logging.getLogger(__name__)

__all__ = ["BANK_FILE", "METRICS_FILE", "REPORT_FILE", "SITE_MODEL_FILE", "Prepared",
           "SiteOptions", "check_extractor", "evaluation_protocol", "load_site_data",
           "prepare_site", "run_site", "score"]

BANK_FILE = "bank.safetensors"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
OVERLAY_DIR = "overlays"

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as images are fitted or scored."""


@dataclass(frozen=True)
class SiteOptions:
    """How a site runs.

    data: the site's images: an AutoVI / MVTec LOCO folder (``<object>/defects_config.json``),
        an MVTec AD folder (``<category>/train/good``), or a plain folder of normal images (no
        test set then). categories: restrict to these object/category folders.
    out_dir: where the bank, metrics.json and overlays go (the site's state between runs).
    features: the extractor to use when the server pins none (it must match the federation's).
    weights: local backbone weights file for a server-pinned pretrained extractor.
    coreset_percentage: local coreset (the round-1 upload) as a fixed fraction of the site's
        training patches; None (default): sized from the round's terms by
        core.federated.upload.UploadBudget, min(n_i, k, upload_factor x k / S, the server's
        per-site limit) rows.
    upload_factor: f of that rule (> 0).
    seed / device / batch_size: as core.federated.PatchCoreClient.
    max_rounds: stop after this many rounds even if the server opens more (None: follow it).
    round_timeout_s: longest wait for a round's bank after uploading, seconds.
    overlays: write anomaly-map overlays of the test images.
    report: write report.html (metrics, curves, a few overlays, the bank's provenance).
    validation_share: share of the training images held back from the coreset (seeded by
        ``seed``) to calibrate the decisions on; 0 fits on all of them and writes no site model.
    target_fpr / pixel_target_fpr: false-positive rates the image and pixel thresholds aim at
        (core.calibration).
    knn: the site model's search, "auto", "exact" or "ivf" (core.sitemodel.SearchSpec).
    """

    data: Path
    out_dir: Path
    features: FeatureConfig = field(
        default_factory=lambda: FeatureConfig("resnet18", pretrained=False)
    )
    categories: tuple[str, ...] | None = None
    weights: str | None = None
    coreset_percentage: float | None = None
    upload_factor: float = UPLOAD_FACTOR
    seed: int = 0
    device: str | None = None
    batch_size: int = 8
    max_rounds: int | None = None
    round_timeout_s: float = 3600.0
    overlays: bool = True
    report: bool = True
    validation_share: float = DEFAULT_VALIDATION_SHARE
    target_fpr: float = DEFAULT_TARGET_FPR
    pixel_target_fpr: float = DEFAULT_PIXEL_TARGET_FPR
    knn: str = "auto"


def load_site_data(
    root: Path, categories: tuple[str, ...] | None = None
) -> tuple[AnomalyDataset, AnomalyDataset | None]:
    """(train, test or None) of a site's folder; DatasetError naming the folder if unusable.

    ``root`` may be an MVTec AD / AutoVI dataset folder, one of its category folders, or a
    plain folder of good images (core.data.check.resolve_site_folder): nothing under a
    category's test/ or ground_truth/ is ever read as a training image.
    """
    site = resolve_site_folder(root, categories)
    objects = list(site.categories) if site.categories else None
    if site.layout in ("autovi", "mvtec"):
        reader = AutoVIDataset if site.layout == "autovi" else MVTecDataset
        train: AnomalyDataset = reader(site.root, objects, split="train")
        has_test = all((site.root / c / "test").is_dir() for c in train.categories)
        return train, reader(site.root, objects, split="test") if has_test else None
    if categories:
        raise DatasetError(f"{root} is a plain image folder: it has no categories to select")
    return ImageFolderDataset(site.root), None


class _CountingImages:
    """An ImageSource that reports each image load (drives the progress bar without touching
    core's loops)."""

    def __init__(self, dataset: AnomalyDataset, stage: str, progress: Progress | None) -> None:
        self._dataset = dataset
        self._stage = stage
        self._progress = progress
        self._done = 0

    def __len__(self) -> int:
        return len(self._dataset)

    def load_image(self, index: int) -> np.ndarray:
        image = self._dataset.load_image(index)
        self._done += 1
        if self._progress is not None:
            self._progress(self._stage, self._done, len(self._dataset))
        return image

    def __getattr__(self, name: str) -> object:  # categories, samples, ... of the dataset
        return getattr(self._dataset, name)


@dataclass(frozen=True)
class HeldBank:
    """The global bank a site saved in its output folder on an earlier run.

    version: its bank version; bank: [K, D] float32; fingerprint: the feature fingerprint it
    was built with ("" in files that do not record it); federation_id: the federation it came
    from (BankHeader.federation_id; "" in files that do not record it).
    """

    version: int
    bank: np.ndarray
    fingerprint: str
    federation_id: str = ""


def _held_bank(out_dir: Path) -> HeldBank | None:
    """The bank this site saved earlier, or None (no file, or one that cannot be used: then one
    warning says why, and the next download is a full one)."""
    path = out_dir / BANK_FILE
    if not path.is_file():
        return None
    try:
        extra = PatchCore.read_extra(path)
        from safetensors.numpy import load_file

        bank = load_file(str(path))["memory_bank"]
    except (ModelFileError, OSError, KeyError, ValueError) as error:
        logger.warning("%s cannot be read (%s): it is ignored and the full bank downloaded",
                       path, error)
        return None
    version = extra.get("bank_version")
    if not isinstance(version, int) or version < 1:
        logger.warning("%s has no bank version: downloading the full bank", path)
        return None
    return HeldBank(version, bank, str(extra.get("feature_fingerprint", "")),
                    str(extra.get("federation_id", "")))


def evaluation_protocol(transform: ImageTransform) -> tuple[Resolution, str]:
    """(resolution for core.evaluation.evaluate, one sentence for the report) of ``transform``.

    Without a crop the maps cover every pixel and are scored at each image's original size
    (the official AutoVI / MVTec LOCO protocol). A centre crop (the default extractor: resize
    256, crop 224) discards the border, so the metrics are computed on the pixels the model saw,
    with the ground truth resized and cropped the same way: the PatchCore paper's protocol.
    """
    if transform.crop is None:
        return "original", (
            "scored at each image's original size: anomaly maps upsampled to it, ground truth as "
            "stored (the official AutoVI / MVTec LOCO protocol)"
        )
    return "model", (
        f"scored on the {transform.crop}x{transform.crop} centre crop the model saw (resize "
        f"{transform.resize}, crop {transform.crop}), ground truth resized and cropped the same "
        "way (the PatchCore paper's protocol); pixels outside the crop are not scored"
    )


def check_extractor(
    features: FeatureConfig, train: AnomalyDataset, test: AnomalyDataset | None
) -> str:
    """Check that ``features`` can score this site's data to the end: its weights can be had
    (core.features.check_weights), and every training and test image has one size after its
    transform (image headers only). Returns where the weights come from. Raises
    WeightsUnavailableError, DatasetError or ValueError naming what to change."""
    source = check_weights(features)
    check_image_sizes([sample.image_path for sample in train], features.transform)
    if test is not None:
        check_image_sizes([sample.image_path for sample in test], features.transform)
    return source


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare_site` checked and read before the site contacts the server."""

    train: AnomalyDataset
    test: AnomalyDataset | None
    weights_source: str
    held: HeldBank | None


def prepare_site(options: SiteOptions) -> Prepared:
    """Everything of a run that can fail without the server, checked before it joins: the
    output folder is writable, the data folder is usable (layout, readers), the extractor's
    weights can be had and every image has one size after its transform, and the bank saved by
    an earlier run (if any) is read. A failure here costs seconds, not a fit and a round.
    Raises ValueError / DatasetError / WeightsUnavailableError with one line that says what to
    change."""
    out = options.out_dir
    if options.coreset_percentage is not None and not 0.0 < options.coreset_percentage <= 1.0:
        raise ValueError(f"coreset percentage must be in (0, 1], got "
                         f"{options.coreset_percentage}")
    if not (math.isfinite(options.upload_factor) and options.upload_factor > 0):
        raise ValueError(f"upload factor must be a number > 0, got {options.upload_factor}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fedclient-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write to the output folder {out}: {error.strerror}") from None
    train, test = load_site_data(options.data, options.categories)
    source = check_extractor(options.features, train, test)
    logger.info("extractor %s: weights from %s", options.features.backbone, source)
    return Prepared(train, test, source, _held_bank(out))


def run_site(
    session: SiteSession,
    options: SiteOptions,
    *,
    progress: Progress | None = None,
    on_status: Callable[[fpb.RoundStatus], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Take part in every round the server opens for this site, then score its test images.

    ``progress`` follows the images fitted and scored, ``on_status`` the round while the site
    waits for its bank, and ``notify`` gets one line per step in between (fitted, uploading,
    waiting, downloaded), for a terminal. Returns the metrics dict it also writes to
    ``out_dir/metrics.json``. Raises the session's
    SessionError subclasses (unreachable server, refused token, closed round, fingerprint
    mismatch, ...) and DatasetError for unusable data.
    """
    started = time.perf_counter()
    out = options.out_dir
    say = notify if notify is not None else (lambda text: None)
    prepared = prepare_site(options)  # before joining: nothing local may fail after the round
    train, test = prepared.train, prepared.test

    joined = session.join()
    config = RoundConfig.from_proto(joined.config)
    features = config.feature_config(weights=options.weights) or options.features
    if features != options.features:
        # The server pins another extractor: check its weights and sizes now, before any work.
        source = check_extractor(features, train, test)
        logger.info("the server pins extractor %s: weights from %s", features.backbone, source)
    fingerprint = features.fingerprint()
    if config.feature_fingerprint and config.feature_fingerprint != fingerprint:
        raise FingerprintMismatchError(
            f"feature extractor mismatch: this site's extractor ({features.backbone}, "
            f"fingerprint {fingerprint[:12]}...) differs from the federation's "
            f"({config.feature_fingerprint[:12]}...), which the first site to upload fixed: "
            "give every site the same --backbone, --image-size, --target-dim and "
            "--pretrained/--no-pretrained/--weights (or pin the extractor in the server's "
            "server.toml); another extractor needs a new federation (a fresh state_dir)"
        )
    held = prepared.held
    if held is not None and held.fingerprint and held.fingerprint != fingerprint:
        logger.warning(
            "%s was built with another extractor (fingerprint %s..., this site's is %s...): it "
            "is discarded and the full bank downloaded", out / BANK_FILE, held.fingerprint[:12],
            fingerprint[:12],
        )
        held = None
    replaced: str | None = None
    if held is not None and held.federation_id != config.federation_id:
        # Bank versions count from 1 in every federation (and again after a server's state is
        # reset), so a version number alone does not identify a bank.
        replaced = (f"it belongs to federation {held.federation_id or '(not recorded)'}, this "
                    f"server runs federation {config.federation_id or '(none)'}")
        logger.warning(
            "%s (bank version %d) is stale: %s (another federation, or a server whose state was "
            "reset); it is discarded and the full bank downloaded", out / BANK_FILE,
            held.version, replaced,
        )
        held = None

    fit_images, validation = _split(train, options)
    budget = None if options.coreset_percentage is not None else UploadBudget(
        config.global_bank_size, config.expected_sites, config.max_rows_per_site,
        options.upload_factor,
    )
    client = PatchCoreClient(
        session.site_id,
        _CountingImages(fit_images, "fit", progress),  # type: ignore[arg-type]
        features,
        options.coreset_percentage,
        upload_budget=budget,
        seed=options.seed,
        device=options.device,
        batch_size=options.batch_size,
    )
    _ = client.model.extractor  # loads the weights now: a bad file fails before the fit
    t0 = time.perf_counter()
    client.train()
    fit_seconds = time.perf_counter() - t0
    if budget is None:
        rule = f"{options.coreset_percentage:g} of them"
    elif budget.num_sites:
        rule = (f"min(patches, {budget.factor:g} x k = {config.global_bank_size} / "
                f"{budget.num_sites} site(s))")
    else:
        rule = f"min(patches, k = {config.global_bank_size}): the round has no fixed sites"
    say(f"fitted {len(train)} image(s): local coreset {client.get_coreset().shape[0]} rows of "
        f"{client.model.num_training_patches} patches ({rule}), coverage radius r_i "
        f"{client.coverage_radius:.3f}")

    have = (held.version, held.bank) if held is not None else None
    site_model: SiteModel | None = None
    rounds: list[dict[str, object]] = []
    download: BankDownload | None = None
    while True:
        record, download, have = _one_round(
            session, client, config, have, options, on_status, say
        )
        if replaced is not None and not record.get("bank_replaced"):
            record["bank_replaced"], replaced = replaced, None
        if validation is not None:  # every new bank gets its own thresholds
            site_model = _recalibrate(session, client, have, download, validation, options,
                                      config)
            record["calibration"] = _calibration_record(site_model)
        rounds.append(record)
        if options.max_rounds is not None and len(rounds) >= options.max_rounds:
            break
        nxt = session.join(fingerprint)
        if nxt.config.round <= config.round:
            break  # the server opened no further round for this site
        config = RoundConfig.from_proto(nxt.config)

    assert have is not None and download is not None
    metrics: dict[str, object] = {
        "site_id": session.site_id,
        "server": session.connection.address,
        "feature_fingerprint": fingerprint,
        "backbone": features.backbone,
        "weights": features.weights_provenance(),
        "num_train_images": len(train),
        # the coreset's images and the ones held out to calibrate on (never uploaded)
        "num_fit_images": len(fit_images),
        "num_validation_images": len(validation) if validation is not None else 0,
        "num_training_patches": client.model.num_training_patches,
        "local_coreset_rows": client.get_coreset().shape[0],
        "local_coverage_radius": client.coverage_radius,
        "bank_version": download.version,
        "bank_rows": int(have[1].shape[0]),
        "global_bank_size": config.global_bank_size,
        # the last round's short-bank record (None: the bank has k rows)
        "bank_short": rounds[-1]["bank_short"],
        "upload_rule": ({"coreset_percentage": options.coreset_percentage}
                        if budget is None else {"upload_factor": budget.factor,
                                                "expected_sites": budget.num_sites,
                                                "max_rows_per_site": budget.max_rows,
                                                "rows_per_site": budget.share}),
        "server_coverage_radius": download.server_radius,
        "max_site_coverage_radius": download.max_site_radius,
        "certificate": download.server_radius + download.max_site_radius,
        "codec": _codec_dict(config),
        "rounds": rounds,
        "seconds": {"fit": fit_seconds},
    }
    _save_bank(client, have, download, out, metrics)
    if site_model is None:  # no validation images: score with the bank, undecided
        site_model = SiteModel.from_model(client.model, search="exact")
    else:
        metrics["calibration"] = site_model.calibration.to_dict()  # type: ignore[union-attr]
        metrics["site_model"] = str(out / SITE_MODEL_FILE)
    scored: _Scored | None = None
    if test is not None:
        t0 = time.perf_counter()
        say(f"scoring {len(test)} test image(s) with bank v{download.version}")
        scored = _score(site_model, test, out, options.overlays, progress,
                        report=options.report, labelled=True)
        metrics["test"] = scored.result
        metrics["seconds"]["score"] = time.perf_counter() - t0  # type: ignore[index]
    metrics["seconds"]["total"] = time.perf_counter() - started  # type: ignore[index]
    write_metrics(out / METRICS_FILE, metrics)
    if options.report:
        write_site_report(out / REPORT_FILE, metrics,
                          curves=scored.curves if scored else {},
                          shown=scored.shown if scored else {})
    return metrics


def _codec_dict(config: RoundConfig) -> dict[str, object]:
    """The round's codec as plain JSON (metrics.json, the bank file, the report)."""
    codec = config.codec
    return {"value_type": codec.value_type, "byte_shuffle": codec.byte_shuffle,
            "zstd_level": codec.zstd_level}


def _one_round(
    session: SiteSession,
    client: PatchCoreClient,
    config: RoundConfig,
    held: tuple[int, np.ndarray] | None,
    options: SiteOptions,
    on_status: Callable[[fpb.RoundStatus], None] | None,
    say: Callable[[str], None],
) -> tuple[dict[str, object], BankDownload, tuple[int, np.ndarray]]:
    """Upload this site's rows of ``config.round``, wait for its bank and download it."""
    r = config.round
    num_novel: int | None = None
    if r == 1 or config.full_coreset:  # a site joining late sends its coreset, as in round 1
        rows = client.get_coreset()
    else:
        if held is None or held[0] != config.base_bank_version:
            base = session.download_bank(
                version=config.base_bank_version, have=held, max_rows=config.global_bank_size
            )
            held = (base.version, base.bank)
        upload = client.novel_features(held[1], config.novelty_threshold)
        rows, num_novel = upload.features, upload.num_novel
    # r_i is measured with the server's chunking: int8/int4 quantise per chunk.
    summary, chunks = client.encode_upload(r, rows, config.codec,
                                           max_chunk_bytes=config.max_chunk_bytes)
    say(f"round {r}: uploading {rows.shape[0]} rows in {len(chunks)} chunk(s)")
    result: UploadResult = session.upload(summary, chunks)
    client.record_upload(rows)
    say(f"round {r}: upload complete ({result.bytes_sent} B sent"
        + (f", {result.committed_at_start} chunk(s) already on the server" if
           result.committed_at_start else "") + "); waiting for the round's bank")
    t0 = time.perf_counter()
    status = session.wait_until_ready(r, timeout_s=options.round_timeout_s, on_status=on_status)
    wait_seconds = time.perf_counter() - t0
    # A bank never has more than k rows: a larger header is refused before anything is decoded.
    download = session.download_bank(
        version=status.bank_version, have=held, max_rows=config.global_bank_size
    )
    say(f"round {r}: bank v{download.version} downloaded ({download.bank.shape[0]} rows, "
        f"{'delta' if download.delta else 'full'}, {download.bytes_received} B)")
    short = _bank_short(config.global_bank_size, download.bank.shape[0], status.rows_received)
    if short is not None:
        logger.warning("round %d: %s", r, short["note"])
        say(f"round {r}: {short['note']}")
    held = (download.version, download.bank)
    record: dict[str, object] = {
        "round": r,
        "rows_up": int(rows.shape[0]),
        "num_novel": num_novel,
        "chunks_total": result.chunks_total,
        "chunks_committed_at_start": result.committed_at_start,
        "chunks_sent": result.chunks_sent,
        "extra_chunks": result.extra_chunks,
        "upload_streams": result.attempts,
        "bytes_up": result.bytes_sent,
        # the codec's output (zstd frames + int8/int4 quantisation parameters): what the
        # messages and the wire add framing to
        "payload_bytes_up": sum(
            len(c.features.payload) + len(c.features.quant_scale) + len(c.features.quant_offset)
            for c in chunks
        ),
        "bytes_down": download.bytes_received,
        "bank_version": download.version,
        "bank_delta": download.delta,
        "bank_rows_in_stream": download.rows_in_stream,
        "bank_rows_removed": download.rows_removed,
        "bank_replaced": download.replaced_stale,
        "bank_short": short,
        "seconds_upload": result.seconds,
        "seconds_wait": wait_seconds,
        "seconds_download": download.seconds,
    }
    return record, download, held


def _bank_short(asked: int, rows: int, uploaded: int) -> dict[str, object] | None:
    """metrics.json's record of a bank with fewer rows than the k asked for (None when it has
    k): asked, got, the round's uploaded rows (all sites) and the line that says so."""
    note = short_bank_note(asked, rows, uploaded)
    if note is None:
        return None
    return {"rows_asked": asked, "bank_rows": rows, "rows_uploaded": uploaded, "note": note}


def _save_bank(
    client: PatchCoreClient,
    held: tuple[int, np.ndarray],
    download: BankDownload,
    out: Path,
    metrics: dict[str, object],
) -> Path:
    client.update_global_bank(held[1])
    client.model.coverage_radius = download.server_radius + download.max_site_radius
    return client.model.save(
        out / BANK_FILE,
        extra={
            "bank_version": held[0],
            "federation_id": download.federation_id,
            "round": download.round,
            "server_coverage_radius": download.server_radius,
            "max_site_coverage_radius": download.max_site_radius,
            "pretrained": client.feature_config.pretrained,
            # provenance for `fedclient score`'s report
            "bank_rows": int(held[1].shape[0]),
            "codec": metrics["codec"],
            "feature_fingerprint": metrics["feature_fingerprint"],
            "backbone": metrics["backbone"],
            "weights": metrics["weights"],
        },
    )


def _split(
    train: AnomalyDataset, options: SiteOptions
) -> tuple[AnomalyDataset, AnomalyDataset | None]:
    """(images the coreset is fitted on, held-out validation images or None)."""
    if options.validation_share <= 0:
        return train, None
    if len(train) < 2:
        logger.warning("%d training image(s): none can be held out for calibration; the site "
                       "scores without decisions", len(train))
        return train, None
    fit, held = split_validation(len(train), options.validation_share, options.seed)
    logger.info("holding out %d of %d training images for calibration", held.size, len(train))
    return train.subset(fit), train.subset(held)


def _recalibrate(
    session: SiteSession,
    client: PatchCoreClient,
    held: tuple[int, np.ndarray],
    download: BankDownload,
    validation: AnomalyDataset,
    options: SiteOptions,
    config: RoundConfig,
) -> SiteModel:
    """Calibrate this round's bank on the validation images and (re)write the site model."""
    t0 = time.perf_counter()
    client.update_global_bank(held[1])
    certificate = download.server_radius + download.max_site_radius
    site_model = SiteModel.from_model(
        client.model,
        search=options.knn,
        provenance=provenance_of(
            client.model, bank_version=held[0], round=download.round,
            site_id=session.site_id, server=session.connection.address,
            certificate=certificate, server_coverage_radius=download.server_radius,
            max_site_coverage_radius=download.max_site_radius, codec=_codec_dict(config),
        ),
    )
    calibration = site_model.calibrate(
        validation, target_fpr=options.target_fpr, pixel_target_fpr=options.pixel_target_fpr,
        validation_share=options.validation_share, seed=options.seed,
        batch_size=options.batch_size,
    )
    site_model.save(options.out_dir / SITE_MODEL_FILE)
    logger.info("bank v%d calibrated in %.2f s: %s", held[0], time.perf_counter() - t0,
                calibration.summary())
    return site_model


def _calibration_record(site_model: SiteModel) -> dict[str, object]:
    """What metrics.json keeps of one round's calibration."""
    calibration = site_model.calibration
    assert calibration is not None
    return {"bank_version": site_model.bank_version, "threshold": calibration.threshold,
            "pixel_threshold": calibration.pixel_threshold, "method": calibration.image.method,
            "uncertain": calibration.uncertain, "num_validation": calibration.num_validation,
            "search": site_model.search.method}


@dataclass(frozen=True)
class _Scored:
    """What scoring found: the metrics (for metrics.json), and for the report the curves and
    the overlays it shows."""

    result: dict[str, object]
    curves: dict[str, Curve]
    shown: dict[str, list[Example]]


def _score(
    site_model: SiteModel | PatchCore,
    test: AnomalyDataset,
    out: Path,
    overlays: bool,
    progress: Progress | None,
    *,
    report: bool = True,
    labelled: bool = True,
) -> _Scored:
    """Scores, metrics where labels allow (per category too when there are several), overlays
    of ``test`` with ``site_model``'s bank and search, what the report shows, and with a
    calibrated model each image's decision (decisions.csv / .jsonl, masks/).

    labelled: ``test`` is a test split whose folders name the truth (else: new images, which
    get no "good" label). A bare PatchCore (the Flower ClientApp's) scores with its exact
    search and decides nothing.
    """
    if isinstance(site_model, PatchCore):
        site_model = SiteModel(site_model, search=SearchSpec("exact"))
    model = site_model.model
    predictions, _ = site_model.inferencer().predict(
        _CountingImages(test, "score", progress)  # type: ignore[arg-type]
    )
    transform = model.config.features.transform
    resolution, protocol = evaluation_protocol(transform)
    evaluation = evaluate(predictions, test, transform, resolution=resolution, curves=report)
    result = evaluation.as_dict()
    result["protocol"] = protocol
    if len(test.categories) > 1:
        result["per_category"] = {
            category: part.as_dict()
            for category, part in evaluate_per_category(
                predictions, test, transform, resolution=resolution
            ).items()
        }
    names = [_image_name(test, i) for i in range(len(test))]
    result["image_scores"] = dict(zip(names, predictions.image_scores.tolist(), strict=True))
    anomalous: np.ndarray | None = None
    if site_model.calibration is not None:
        anomalous = _write_decisions(site_model, test, names, predictions, out, labelled,
                                     result)
    if overlays:
        write_overlays(
            out / OVERLAY_DIR, names, predictions.anomaly_maps, transform,
            load_image=test.load_image,
        )
    shown = (examples(test, names, predictions.image_scores, predictions.anomaly_maps,
                      transform, anomalous=anomalous, labelled=labelled,
                      normalise=site_model.calibration.image_normalisation
                      if site_model.calibration else None)
             if report else {})
    return _Scored(result, evaluation.curves, shown)


def _write_decisions(
    site_model: SiteModel,
    test: AnomalyDataset,
    names: list[str],
    predictions: Predictions,
    out: Path,
    labelled: bool,
    result: dict[str, object],
) -> np.ndarray:
    """Decide every image, write decisions.csv / .jsonl and masks/, count the decisions into
    ``result`` (with labels: false-positive and miss rates, overall and per category)."""
    from core.inference import Scored, StageTimes

    calibration = site_model.calibration
    assert calibration is not None
    scored = Scored(predictions.image_scores, predictions.anomaly_maps, predictions.patch_grid,
                    StageTimes())
    decided = decide(
        site_model, names, scored,
        originals=[image_size(sample.image_path) for sample in test],
        labels=[sample.defect for sample in test] if labelled else None,
    )
    with DecisionWriter(out) as writer:
        for decision, mask in decided:
            writer.write(decision, mask)
    anomalous = np.array([d.anomalous for d, _ in decided], dtype=bool)
    result["decisions"] = {
        "anomalous": int(anomalous.sum()), "normal": int((~anomalous).sum()),
        "threshold": calibration.threshold, "pixel_threshold": calibration.pixel_threshold,
        "summary": calibration.summary(), "uncertain": calibration.uncertain,
    }
    if labelled:
        labels = test.labels
        result.update(labelled_rates(anomalous, labels))
        per_category = result.get("per_category")
        if isinstance(per_category, dict):
            categories = np.array([sample.category for sample in test])
            for category, part in per_category.items():
                mine = categories == category
                part.update(labelled_rates(anomalous[mine], labels[mine]))
    return anomalous


def _image_name(dataset: AnomalyDataset, index: int) -> str:
    """category/defect/stem: unique within a dataset, readable as a file name. A plain folder's
    images (new, unlabelled) are named by their path in it, without a "good" they never had."""
    sample = dataset[index]
    root = getattr(dataset, "root", None)
    if isinstance(dataset, ImageFolderDataset) and isinstance(root, Path):
        return sample.image_path.relative_to(root).with_suffix("").as_posix()
    return f"{sample.category}/{sample.defect}/{sample.image_path.stem}"


def score(
    bank_file: Path,
    data: Path,
    out_dir: Path,
    *,
    categories: tuple[str, ...] | None = None,
    weights: str | None = None,
    device: str | None = None,
    overlays: bool = True,
    report: bool = True,
    progress: Progress | None = None,
) -> dict[str, object]:
    """``fedclient score``: score ``data``'s test images (or, for a plain folder, all of its
    images) with a site model file (decisions: decisions.csv / .jsonl, masks/) or a plain bank
    downloaded earlier (scores only); writes metrics.json, overlays and report.html into
    ``out_dir``."""
    extra = PatchCore.read_extra(bank_file)
    train, test = load_site_data(data, categories)  # before the backbone: seconds, not minutes
    images = test if test is not None else train
    site_model = SiteModel.load(bank_file, weights=weights, device=device)
    model = site_model.model
    check_image_sizes([sample.image_path for sample in images], model.config.features.transform)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metrics: dict[str, object] = {
        "bank_file": str(bank_file),
        "bank_version": extra.get("bank_version"),
        "bank_rows": int(model.memory_bank.shape[0]),
        "data": str(data),
        "search": site_model.search.method,
        "weights": model.config.features.weights_provenance(),
    }
    # What the bank file says about where it came from (banks saved by older versions lack
    # some of it; the report shows what is there).
    for key in ("round", "codec", "feature_fingerprint", "backbone", "server_coverage_radius",
                "max_site_coverage_radius"):
        if key in extra:
            metrics[key] = extra[key]
    radii = (extra.get("server_coverage_radius"), extra.get("max_site_coverage_radius"))
    if all(isinstance(r, int | float) for r in radii):
        metrics["certificate"] = float(radii[0]) + float(radii[1])  # type: ignore[arg-type]
    if site_model.calibration is not None:
        metrics["calibration"] = site_model.calibration.to_dict()
    else:
        logger.warning("%s has no calibration: scores only, no decisions (score with the "
                       "site model file `fedclient run` writes, or `fedclient calibrate`)",
                       bank_file)
    scored = _score(site_model, images, out_dir, overlays, progress, report=report,
                    labelled=test is not None)
    metrics["test"] = scored.result
    metrics["seconds"] = {"score": time.perf_counter() - t0}
    write_metrics(out_dir / METRICS_FILE, metrics)
    if report:
        write_site_report(out_dir / REPORT_FILE, metrics, curves=scored.curves,
                          shown=scored.shown)
    return metrics
