"""Peak memory (RSS) of fitting PatchCore on 1,000 images at 224 px, default settings.

The full training feature matrix would be 1,000 x 784 x 1024 float32 = 3.2 GB; ``fit`` streams
it through the incremental selector instead, so the peak is the buffer (2k rows) plus the
backbone. Target: at most 2 GiB. The RSS right after importing torch is printed separately
(this CUDA build of torch alone maps several hundred MB).

Run: ``python -m benchmarks.fit_memory`` (about 10 minutes on 2 cores: WRN-50 forward passes
dominate). ``--images`` and ``--coreset-ratio`` change the workload.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.report import append_results, markdown_table, peak_rss_mib
from core.data import MVTecDataset, generate_synthetic_dataset
from core.features import FeatureConfig
from core.patchcore import PatchCore, PatchCoreConfig
from core.preprocess import ImageTransform


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    after_import = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        categories = ("washer", "screw", "mesh", "stripes", "fabric")
        per_category = -(-args.images // len(categories))
        root = generate_synthetic_dataset(Path(tmp) / "data", categories=categories,
                                          num_train=per_category, num_test=0, image_size=224)
        dataset = MVTecDataset(root, split="train").subset(range(args.images))
        config = PatchCoreConfig(
            features=FeatureConfig(args.backbone, pretrained=False,
                                   transform=ImageTransform(224, None)),
            coreset_ratio=args.coreset_ratio,
        )
        model = PatchCore(config)
        _ = model.extractor  # build the backbone before measuring the fit itself
        before_fit = peak_rss_mib()
        start = time.perf_counter()
        model.fit(dataset)
        seconds = time.perf_counter() - start
        peak = peak_rss_mib()
    patches = model.num_training_patches
    full_matrix_mib = patches * config.features.target_embed_dim * 4 / 2**20
    table = markdown_table(
        ["images", "patches", "bank rows", "full feature matrix (MiB)", "RSS after import (MiB)",
         "RSS with backbone (MiB)", "peak RSS of fit (MiB)", "fit seconds"],
        [[args.images, patches, model.memory_bank.shape[0], round(full_matrix_mib),
          round(after_import), round(before_fit), round(peak), round(seconds, 1)]],
    )
    append_results(
        f"Fit memory: {args.images} images at 224 px, {args.backbone}, coreset "
        f"{args.coreset_ratio:g}",
        table,
        "Peak RSS is the process maximum (ru_maxrss); target <= 2048 MiB.",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
