"""The main job end to end on a generated dataset: ``python3 dev.py demo``.

Generates the synthetic inspection dataset (several part categories with scratches, spots and
missing pieces), fits a PatchCore per category on its normal images, scores the test images and
prints image AUROC, pixel AUROC, AU-PRO and AU-sPRO per category. Runs on CPU in about a minute
with a small random-weight backbone (no network); pass ``--backbone wide_resnet50_2
--pretrained`` on a machine that can load ImageNet weights.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from core.data import AutoVIDataset, generate_synthetic_dataset
from core.evaluation import evaluate
from core.features import FeatureConfig
from core.patchcore import PatchCore, PatchCoreConfig
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder (AutoVI layout); generated there if missing/empty "
                             "(default: a temporary folder)")
    parser.add_argument("--backbone", default="resnet18", help="timm backbone (default resnet18)")
    parser.add_argument("--pretrained", action="store_true",
                        help="load pretrained weights through timm (needs network or cache)")
    parser.add_argument("--weights", default=None, help="local backbone weights file")
    parser.add_argument("--image-size", type=int, default=128, help="generated image side, px")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    tmp = None
    root = args.data
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedpatchcore-demo-")
        root = Path(tmp.name) / "data"
    if not root.exists() or not any(root.iterdir()):
        start = time.perf_counter()
        generate_synthetic_dataset(root, image_size=args.image_size, seed=args.seed, layout="autovi")
        logger.info("generated dataset in %s (%.1f s)", root, time.perf_counter() - start)
    features = FeatureConfig(
        backbone=args.backbone,
        pretrained=args.pretrained,
        weights=args.weights,
        transform=ImageTransform(resize=args.image_size, crop=None),
    )
    results: dict[str, dict[str, object]] = {}
    for category in AutoVIDataset(root, split="train").categories:
        train = AutoVIDataset(root, objects=[category], split="train")
        test = AutoVIDataset(root, objects=[category], split="test")
        start = time.perf_counter()
        model = PatchCore(
            PatchCoreConfig(features=features, coreset_ratio=args.coreset_ratio, seed=args.seed)
        ).fit(train)
        predictions = model.predict(test)
        metrics = evaluate(predictions, test, features.transform).as_dict()
        metrics["seconds"] = time.perf_counter() - start
        metrics["bank_rows"] = model.memory_bank.shape[0]
        results[category] = metrics
    print(f"\nSingle-site PatchCore ({args.backbone}, pretrained={args.pretrained or bool(args.weights)})")
    header = f"{'category':<12} {'img AUROC':>9} {'pix AUROC':>9} {'AU-PRO':>7} {'sPRO@0.3':>8} {'bank':>6} {'s':>5}"
    print(header)
    print("-" * len(header))
    for category, m in results.items():
        print(
            f"{category:<12} {_fmt(m['image_auroc'])} {_fmt(m['pixel_auroc'])} "
            f"{_fmt(m['au_pro'], 7)} {_fmt(m.get('au_spro@0.3'), 8)} {m['bank_rows']:>6} "
            f"{m['seconds']:>5.1f}"
        )
    if tmp is not None:
        tmp.cleanup()
    return results


def _fmt(value: object, width: int = 9) -> str:
    return f"{value:>{width}.3f}" if isinstance(value, float) else f"{'n/a':>{width}}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
