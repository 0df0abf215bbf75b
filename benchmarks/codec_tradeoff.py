"""Wire codecs on real PatchCore banks: size, error, speed, and what they do to the metrics.

For each feature setting (``--settings``; random-init backbones, no network) a PatchCore is
fitted on a generated dataset and its bank [K, D=1024] is what gets sent. For every preset of
``core.codec.CODEC_PRESETS`` the table gives

* ratio: exact serialized upload bytes (``CommunicationProtocol.compute_communication_cost``,
  1 MiB payload chunks, no summary message) / raw fp32 bytes (K x D x 4);
* max abs error of the bank after the wire round trip (messages parsed and decoded the way the
  server does), and the largest |value| of the bank for scale;
* encode / decode throughput in MB/s of raw fp32 (10^6 bytes; median of ``--repeats``,
  single-threaded numpy + zstd);
* Δ image AUROC / Δ pixel AUROC / Δ AU-PRO when the same test set is scored with the decoded
  bank instead of the fp32 one, and the largest relative change of an image score and of an
  anomaly-map value (|Δ| / |fp32 value|, over every pixel of every test image).

Why the default setting is the 64 px one with 60 test images per category: on the WRN-50
setting the image AUROC is 1.000 on 24 images, so "no image-AUROC change" there could not fail.
At 64 px the pixel AUROC (~0.97) and AU-PRO (~0.89) are far from saturation, and the relative
score and map changes are reported for every codec, so a codec that moves scores shows it.

Targets: default codec (fp16) <= 0.42 of raw, int8 <= 0.22, int4 (stretch) <= 0.12, each with
|Δ image AUROC|, |Δ pixel AUROC| and |Δ AU-PRO| all <= 0.001 / 0.002 / 0.005 respectively.

    .venv/bin/python -m benchmarks.codec_tradeoff                 # 64 px setting, print only
    .venv/bin/python -m benchmarks.codec_tradeoff --record        # ... and append to RESULTS.md
    .venv/bin/python -m benchmarks.codec_tradeoff --settings wide_resnet50_2   # saturated one
    .venv/bin/python -m benchmarks.codec_tradeoff --quick         # every path, seconds
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import (
    FeatureCache,
    SyntheticSetting,
    generate_setting,
    metric_row,
    predict_cached,
    random_feature_config,
    verify_cached_scoring,
)
from benchmarks.report import append_results, markdown_table, peak_rss_mib
from core.codec import CODEC_PRESETS, DEFAULT_CODEC, CodecConfig, decode_matrix
from core.data import SYNTHETIC_CATEGORIES, AnomalyDataset
from core.evaluation import evaluate
from core.federated import CommunicationProtocol
from core.federated.communication import parse_upload
from core.messages import FeatureChunk
from core.patchcore import PatchCore, PatchCoreConfig
from core.serde import MAX_CHUNK_BYTES_LIMIT, assemble_chunks, split_into_chunks

logger = logging.getLogger(__name__)

#: preset -> (max ratio to raw fp32, max |Δ| of image AUROC, pixel AUROC and AU-PRO).
TARGETS: dict[str, tuple[float, float]] = {
    "fp16": (0.42, 0.001),
    "int8": (0.22, 0.002),
    "int4": (0.12, 0.005),
}


@dataclass(frozen=True)
class FeatureSetting:
    """A backbone, its input geometry and the data it is fitted on.

    resize / crop: ImageTransform of the model input (px); data: what is generated.
    """

    name: str
    backbone: str
    resize: int
    crop: int | None
    data: SyntheticSetting

    def describe(self) -> str:
        crop = f", crop {self.crop}" if self.crop else ""
        return f"{self.backbone} random init, resize {self.resize}{crop}; {self.data.describe()}"


def feature_settings(seed: int) -> dict[str, FeatureSetting]:
    return {
        # The federated-parity setting (64 px, 200 train images x 8x8 patches) with 60 test
        # images per category (300): pixel AUROC and AU-PRO are far from saturation here.
        "resnet18": FeatureSetting(
            "resnet18", "resnet18", 64, None,
            SyntheticSetting(SYNTHETIC_CATEGORIES, 40, 60, 64, seed),
        ),
        # Every path in seconds (the smoke test): 2 categories, 6 train + 4 test images.
        "quick": FeatureSetting(
            "quick", "resnet18", 64, None,
            SyntheticSetting(SYNTHETIC_CATEGORIES[:2], 6, 4, 64, seed),
        ),
        # The default PatchCore pipeline (WRN-50-2, resize 256, crop 224, 28x28 patches) on a
        # few images: CPU forward passes of WRN-50 cost about 0.3 s per image here. Its image
        # AUROC is 1.000 on these 24 test images: saturated, kept for the byte ratios.
        "wide_resnet50_2": FeatureSetting(
            "wide_resnet50_2", "wide_resnet50_2", 256, 224,
            SyntheticSetting(("mesh", "screw", "washer"), 8, 8, 256, seed),
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.codec_tradeoff",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--settings", nargs="+", default=["resnet18"],
                        choices=list(feature_settings(0)), help="feature settings to run")
    parser.add_argument("--bank-ratio", type=float, default=0.1,
                        help="bank (the upload) as a fraction of the training patches")
    parser.add_argument("--repeats", type=int, default=5, help="timing repetitions (median)")
    parser.add_argument("--seed", type=int, default=0, help="data, backbone and coreset seed")
    parser.add_argument("--no-pq", action="store_true",
                        help="skip the product-quantisation experiment (needs faiss)")
    parser.add_argument("--record", action="store_true",
                        help="append the tables to RESULTS.md (default: print only)")
    parser.add_argument("--quick", action="store_true",
                        help="the 'quick' setting, one timing repeat, no PQ (seconds)")
    return parser


def _median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wire_round_trip(bank: np.ndarray, codec: CodecConfig) -> tuple[int, np.ndarray]:
    """(exact upload bytes, bank as the server decodes it) for ``bank`` [K, D] under ``codec``."""
    cost = CommunicationProtocol.compute_communication_cost(bank, codec=codec)
    messages = CommunicationProtocol.send_to_server(0, bank, codec=codec)
    if sum(len(m) for m in messages) != cost:
        raise AssertionError("compute_communication_cost disagrees with send_to_server")
    chunks = [c for c in parse_upload(messages) if isinstance(c, FeatureChunk)]
    return cost, assemble_chunks(chunks, max_rows=bank.shape[0], expected_cols=bank.shape[1])


def codec_speed(bank: np.ndarray, codec: CodecConfig, repeats: int) -> tuple[float, float]:
    """Median seconds to encode ``bank`` into chunks (value type, shuffle, zstd, checksum) and
    to decode those chunks back."""
    chunks = list(split_into_chunks(bank, config=codec, site_id="0", round=1))

    def encode() -> object:
        return list(split_into_chunks(bank, config=codec, site_id="0", round=1))

    def decode() -> object:
        return [
            decode_matrix(c.features, max_decoded_bytes=MAX_CHUNK_BYTES_LIMIT) for c in chunks
        ]

    return _median_seconds(encode, repeats), _median_seconds(decode, repeats)


def run_setting(setting: FeatureSetting, args: argparse.Namespace) -> tuple[str, str, bool]:
    """Fit, then measure every preset; returns (table, notes, targets met)."""
    start_all = time.perf_counter()
    features = random_feature_config(
        setting.backbone, setting.resize, setting.crop, init_seed=args.seed
    )
    # Evaluation reads the ground truth from disk: keep the data until the end.
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-codec-") as tmp:
        train, test = generate_setting(Path(tmp) / "data", setting.data)
        start = time.perf_counter()
        model = PatchCore(
            PatchCoreConfig(features=features, coreset_ratio=args.bank_ratio, seed=args.seed)
        ).fit(train)
        fit_seconds = time.perf_counter() - start
        cache = FeatureCache.extract(model, test)
        verify_cached_scoring(model, cache, test)
        table, notes, met = measure_presets(model, cache, test, args)
    summary, _, rest = notes.partition("\n\n")
    notes = (
        f"Setting {setting.name}: {setting.describe()}; {summary} Fit {fit_seconds:.0f} s; "
        f"setting total {time.perf_counter() - start_all:.0f} s; peak RSS "
        f"{peak_rss_mib():.0f} MiB." + (f"\n\n{rest}" if rest else "")
    )
    return table, notes, met


@dataclass(frozen=True)
class Baseline:
    """The fp32 bank's results on the test set: metrics [img, pix, AU-PRO], image scores [N]
    and anomaly maps [N, H, W]."""

    metrics: tuple[float, float, float]
    image_scores: np.ndarray
    anomaly_maps: np.ndarray


def _max_relative_change(values: np.ndarray, reference: np.ndarray) -> float:
    """max |values - reference| / |reference| (reference values of 0 count as 1e-12)."""
    return float(np.max(np.abs(values - reference) / np.maximum(np.abs(reference), 1e-12)))


def score_change(
    model: PatchCore, cache: FeatureCache, test: AnomalyDataset, bank: np.ndarray,
    baseline: Baseline,
) -> tuple[float, float, float, float, float]:
    """Score ``test`` with ``bank`` instead of the fp32 bank: (Δ img AUROC, Δ pix AUROC,
    Δ AU-PRO, largest relative change of an image score, largest relative change of an
    anomaly-map value). Leaves ``bank`` in ``model``."""
    model.set_memory_bank(bank)
    predictions = predict_cached(model, cache)
    # model resolution: the full setting crops (resize 256, crop 224), as the PatchCore paper
    result = evaluate(predictions, test, model.config.features.transform, resolution="model")
    img, pix, pro, _ = metric_row(result)
    base_img, base_pix, base_pro = baseline.metrics
    rel_score = _max_relative_change(predictions.image_scores, baseline.image_scores)
    rel_map = _max_relative_change(predictions.anomaly_maps, baseline.anomaly_maps)
    return (float(img) - base_img, float(pix) - base_pix,  # type: ignore[arg-type]
            float(pro) - base_pro, rel_score, rel_map)  # type: ignore[arg-type]


def measure_presets(
    model: PatchCore, cache: FeatureCache, test: AnomalyDataset, args: argparse.Namespace
) -> tuple[str, str, bool]:
    """Every preset (and PQ unless --no-pq) on ``model``'s bank; (table, notes, targets met)."""
    bank = model.memory_bank.copy()
    rows, dim = bank.shape
    raw_bytes = rows * dim * 4
    raw_mb = raw_bytes / 1e6
    predictions = predict_cached(model, cache)
    img, pix, pro, _ = metric_row(
        evaluate(predictions, test, model.config.features.transform, resolution="model")
    )
    baseline = Baseline((float(img), float(pix), float(pro)),  # type: ignore[arg-type]
                        predictions.image_scores, predictions.anomaly_maps)

    header = ["preset", "value type", "bytes up", "ratio to fp32", "target", "max abs err",
              "encode MB/s", "decode MB/s", "Δ img AUROC", "Δ pix AUROC", "Δ AU-PRO",
              "max rel Δ img score", "max rel Δ map value", "met"]
    table_rows: list[list[object]] = []
    all_met = True
    for name, codec in CODEC_PRESETS.items():
        cost, decoded = wire_round_trip(bank, codec)
        ratio = cost / raw_bytes
        error = float(np.abs(decoded - bank).max())
        encode_s, decode_s = codec_speed(bank, codec, args.repeats)
        d_img, d_pix, d_pro, rel_score, rel_map = score_change(
            model, cache, test, decoded, baseline
        )
        target = TARGETS.get(name)
        if target is None:
            target_text, met_text = "-", "-"
        else:
            met = ratio <= target[0] and max(abs(d_img), abs(d_pix), abs(d_pro)) <= target[1]
            all_met &= met
            target_text = f"<= {target[0]}, |Δ img, pix, PRO| <= {target[1]}"
            met_text = "yes" if met else "NO"
        label = f"{name} (default)" if codec == DEFAULT_CODEC else name
        table_rows.append([
            label, codec.value_type, cost, ratio, target_text, error, raw_mb / encode_s,
            raw_mb / decode_s, f"{d_img:+.5f}", f"{d_pix:+.5f}", f"{d_pro:+.5f}", rel_score,
            rel_map, met_text,
        ])
    base_img, base_pix, base_pro = baseline.metrics
    notes = (
        f"bank {rows} x {dim} "
        f"({args.bank_ratio:g} of {model.num_training_patches} training patches, "
        f"{raw_bytes / 2**20:.2f} MiB fp32), max |x| {float(np.abs(bank).max()):.4g}, "
        f"{float((bank == 0).mean()):.1%} exact zeros. fp32-bank metrics on {len(test)} pooled "
        f"test images: image AUROC {base_img:.4f}, pixel AUROC {base_pix:.4f}, AU-PRO "
        f"{base_pro:.4f}. Targets {'all met' if all_met else 'NOT all met'}."
    )
    if not args.no_pq:
        notes += "\n\n" + product_quantisation(model, cache, test, bank, baseline, args.seed)
    model.set_memory_bank(bank)
    return markdown_table(header, table_rows), notes, all_met


#: (subquantisers M, bits per code) of the product-quantisation experiment; D / M dims each.
PQ_CONFIGS: tuple[tuple[int, int], ...] = ((64, 8), (128, 8), (128, 6), (256, 6))
#: A deployment-size upload, for the projected ratio (the codebook is amortised over it).
PQ_PROJECTED_ROWS = 20_000


def product_quantisation(
    model: PatchCore, cache: FeatureCache, test: AnomalyDataset, bank: np.ndarray,
    baseline: Baseline, seed: int,
) -> str:
    """Experiment, not a wire codec: faiss product quantisation trained on the upload itself.

    The site would send the codebook (fp16, M x 2^bits x D/M values) and the packed codes
    (rows x ceil(M x bits / 8) bytes); bytes are counted analytically (no framing, no zstd).
    The decoded bank uses the fp16-rounded codebook, as a receiver would.
    """
    import faiss  # optional dependency of core.knn; only this experiment needs it directly

    rows, dim = bank.shape
    header = ["PQ M x bits", "bytes (codes + fp16 codebook)", "ratio to fp32",
              f"ratio at {PQ_PROJECTED_ROWS} rows", "max abs err", "train + encode s",
              "Δ img AUROC", "Δ pix AUROC", "Δ AU-PRO", "max rel Δ img score",
              "max rel Δ map value"]
    table_rows: list[list[object]] = []
    for m, bits in PQ_CONFIGS:
        if dim % m:
            continue
        start = time.perf_counter()
        pq = faiss.ProductQuantizer(dim, m, bits)
        pq.cp.seed = seed
        pq.train(np.ascontiguousarray(bank))
        codes = pq.compute_codes(np.ascontiguousarray(bank))
        seconds = time.perf_counter() - start
        centroids = faiss.vector_to_array(pq.centroids).astype(np.float16)
        faiss.copy_array_to_vector(centroids.astype(np.float32), pq.centroids)
        # faiss's Python wrapper replaces the SWIG signature its stubs describe.
        decoded = np.asarray(pq.decode(codes))  # type: ignore[call-arg, func-returns-value]
        size = codes.nbytes + centroids.nbytes
        projected = (PQ_PROJECTED_ROWS * pq.code_size + centroids.nbytes) / (
            PQ_PROJECTED_ROWS * dim * 4
        )
        d_img, d_pix, d_pro, rel, rel_map = score_change(model, cache, test, decoded, baseline)
        table_rows.append([
            f"{m} x {bits}", size, size / (rows * dim * 4), projected,
            float(np.abs(decoded - bank).max()), seconds, f"{d_img:+.5f}", f"{d_pix:+.5f}",
            f"{d_pro:+.5f}", rel, rel_map,
        ])
    return (
        "Product quantisation (experiment, not a wire codec; faiss PQ trained on the upload "
        "itself, codebook sent as fp16, bytes counted analytically without framing or zstd):"
        "\n\n" + markdown_table(header, table_rows)
    )


def run(args: argparse.Namespace) -> bool:
    settings = feature_settings(args.seed)
    if args.quick:
        args.settings, args.repeats, args.no_pq = ["quick"], 1, True
    all_met = True
    for name in args.settings:
        table, notes, met = run_setting(settings[name], args)
        all_met &= met
        title = f"Codec trade-off on PatchCore banks: {name}"
        append_results(title, table, notes, append=args.record)
    return all_met


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
