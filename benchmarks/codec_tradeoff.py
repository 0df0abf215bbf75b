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
  bank instead of the fp32 one, and the largest relative change of an image score.

Targets: default codec (fp16) <= 0.42 of raw with |Δ image AUROC| < 0.001; int8 <= 0.22 with
<= 0.002; int4 (stretch) <= 0.12 with <= 0.005.

    .venv/bin/python -m benchmarks.codec_tradeoff                       # both settings
    .venv/bin/python -m benchmarks.codec_tradeoff --settings resnet18   # the small one only
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
from core.data import SYNTHETIC_CATEGORIES
from core.evaluation import evaluate
from core.federated import CommunicationProtocol
from core.federated.communication import parse_upload
from core.messages import FeatureChunk
from core.patchcore import PatchCore, PatchCoreConfig
from core.serde import MAX_CHUNK_BYTES_LIMIT, assemble_chunks, split_into_chunks

logger = logging.getLogger(__name__)

#: preset -> (max ratio to raw fp32, max |Δ image AUROC|), from the issue.
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
        # The parity benchmark's backbone at 128 px: 100 train images x 16x16 patches.
        "resnet18": FeatureSetting(
            "resnet18", "resnet18", 128, None,
            SyntheticSetting(SYNTHETIC_CATEGORIES, 20, 12, 128, seed),
        ),
        # The default PatchCore pipeline (WRN-50-2, resize 256, crop 224, 28x28 patches) on a
        # few images: CPU forward passes of WRN-50 cost about 0.3 s per image here.
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
    parser.add_argument("--settings", nargs="+", default=["resnet18", "wide_resnet50_2"],
                        choices=list(feature_settings(0)), help="feature settings to run")
    parser.add_argument("--bank-ratio", type=float, default=0.1,
                        help="bank (the upload) as a fraction of the training patches")
    parser.add_argument("--repeats", type=int, default=5, help="timing repetitions (median)")
    parser.add_argument("--seed", type=int, default=0, help="data, backbone and coreset seed")
    parser.add_argument("--no-append", action="store_true",
                        help="print the tables but do not append them to RESULTS.md")
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
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-codec-") as tmp:
        train, test = generate_setting(Path(tmp) / "data", setting.data)
        start = time.perf_counter()
        model = PatchCore(
            PatchCoreConfig(features=features, coreset_ratio=args.bank_ratio, seed=args.seed)
        ).fit(train)
        fit_seconds = time.perf_counter() - start
        cache = FeatureCache.extract(model, test)
        verify_cached_scoring(model, cache, test)
    bank = model.memory_bank.copy()
    rows, dim = bank.shape
    raw_bytes = rows * dim * 4
    raw_mb = raw_bytes / 1e6
    transform = features.transform
    baseline_predictions = predict_cached(model, cache)
    baseline = evaluate(baseline_predictions, test, transform)
    base_img, base_pix, base_pro, _ = metric_row(baseline)
    base_scores = baseline_predictions.image_scores

    header = ["preset", "value type", "bytes up", "ratio to fp32", "target", "max abs err",
              "encode MB/s", "decode MB/s", "Δ img AUROC", "Δ pix AUROC", "Δ AU-PRO",
              "max rel Δ img score", "met"]
    table_rows: list[list[object]] = []
    all_met = True
    for name, codec in CODEC_PRESETS.items():
        cost, decoded = wire_round_trip(bank, codec)
        ratio = cost / raw_bytes
        error = float(np.abs(decoded - bank).max())
        encode_s, decode_s = codec_speed(bank, codec, args.repeats)
        model.set_memory_bank(decoded)
        predictions = predict_cached(model, cache)
        result = evaluate(predictions, test, transform)
        img, pix, pro, _ = metric_row(result)
        d_img, d_pix, d_pro = img - base_img, pix - base_pix, pro - base_pro  # type: ignore[operator]
        rel_score = float(
            np.max(np.abs(predictions.image_scores - base_scores) / np.abs(base_scores))
        )
        target = TARGETS.get(name)
        if target is None:
            target_text, met_text = "-", "-"
        else:
            met = ratio <= target[0] and abs(d_img) <= target[1]
            all_met &= met
            target_text = f"<= {target[0]}, |Δ img| <= {target[1]}"
            met_text = "yes" if met else "NO"
        label = f"{name} (default)" if codec == DEFAULT_CODEC else name
        table_rows.append([
            label, codec.value_type, cost, ratio, target_text, error, raw_mb / encode_s,
            raw_mb / decode_s, f"{d_img:+.4f}", f"{d_pix:+.4f}", f"{d_pro:+.4f}", rel_score,
            met_text,
        ])
    model.set_memory_bank(bank)
    notes = (
        f"Setting {setting.name}: {setting.describe()}; bank {rows} x {dim} "
        f"({args.bank_ratio:g} of {model.num_training_patches} training patches, "
        f"{raw_bytes / 2**20:.2f} MiB fp32), max |x| {float(np.abs(bank).max()):.4g}, "
        f"{float((bank == 0).mean()):.1%} exact zeros. fp32-bank metrics on {len(test)} pooled "
        f"test images: image AUROC {base_img:.4f}, pixel AUROC {base_pix:.4f}, AU-PRO "
        f"{base_pro:.4f}. Fit {fit_seconds:.0f} s; setting total "
        f"{time.perf_counter() - start_all:.0f} s; peak RSS {peak_rss_mib():.0f} MiB. Targets "
        f"{'all met' if all_met else 'NOT all met'}."
    )
    return markdown_table(header, table_rows), notes, all_met


def run(args: argparse.Namespace) -> bool:
    settings = feature_settings(args.seed)
    all_met = True
    for name in args.settings:
        table, notes, met = run_setting(settings[name], args)
        all_met &= met
        title = f"Codec trade-off on PatchCore banks: {name}"
        if args.no_append:
            print(f"\n## {title}\n\n{table}\n\n{notes}")
        else:
            append_results(title, table, notes)
    return all_met


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
