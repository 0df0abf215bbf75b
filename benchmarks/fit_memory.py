"""Peak memory (RSS) of fitting PatchCore on 1,000 images at 224 px, default settings.

The full training feature matrix would be 1,000 x 784 x 1024 float32 = 3.2 GB; ``fit`` streams
it through the incremental selector instead, so the peak is the selector's buffer (2 k rows,
k = 10 % of the patches) plus the backbone. Target: at most 2 GiB for 1,000 images (missed in
every run before the release select stopped copying the bank out of the buffer: 2,125-2,434
MiB), and a peak that stays flat from 1,000 to 3,000 images where the buffer is capped
(``PatchCoreConfig.buffer_rows``). The RSS right after importing torch is printed separately
(this CUDA build of torch alone maps several hundred MB).

Each image count runs in its own child process, so every peak is that fit's own.

Run: ``python -m benchmarks.fit_memory [--images 1000 3000] [--record]`` (about 500 s per 1,000
images on 2 idle cores: WRN-50 forward passes dominate). ``--quick``: 6 images, resnet18, 64 px
(seconds; the smoke test runs it). Prints the table; appends it to RESULTS.md only with
``--record``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import append_results, markdown_table, peak_rss_mib
from core.data import MVTecDataset, generate_synthetic_dataset
from core.features import FeatureConfig
from core.patchcore import PatchCore, PatchCoreConfig
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

#: Peak RSS target of a 1,000-image fit, MiB.
TARGET_MIB = 2048


def _measure(
    images: int, coreset_ratio: float, coreset_size: int | None, backbone: str, size: int
) -> dict[str, float]:
    """Fit once in this process; returns the figures of one table row."""
    after_import = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        categories = ("washer", "screw", "mesh", "stripes", "fabric")
        per_category = -(-images // len(categories))
        root = generate_synthetic_dataset(Path(tmp) / "data", categories=categories,
                                          num_train=per_category, num_test=0, image_size=size)
        dataset = MVTecDataset(root, split="train").subset(range(images))
        config = PatchCoreConfig(
            features=FeatureConfig(backbone, pretrained=False,
                                   transform=ImageTransform(size, None)),
            coreset_ratio=coreset_ratio,
            coreset_size=coreset_size,
        )
        model = PatchCore(config)
        _ = model.extractor  # build the backbone before measuring the fit itself
        before_fit = peak_rss_mib()
        start = time.perf_counter()
        model.fit(dataset)
        seconds = time.perf_counter() - start
        peak = peak_rss_mib()
    patches = model.num_training_patches
    return {
        "images": images,
        "patches": patches,
        "bank_rows": model.memory_bank.shape[0],
        "buffer_rows": config.buffer_rows or 0,
        "full_matrix_mib": patches * config.features.target_embed_dim * 4 / 2**20,
        "after_import": after_import,
        "before_fit": before_fit,
        "peak": peak,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000],
                        help="image counts, each fitted in its own child process")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--coreset-size", type=int, default=None,
                        help="fixed bank rows (overrides the ratio): with a 10 %% bank the bank "
                        "itself grows with the images, so flatness is shown at a fixed bank")
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--size", type=int, default=224, help="image side, px")
    parser.add_argument("--quick", action="store_true",
                        help="6 images, resnet18, 64 px: every path in seconds")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.quick:
        args.images, args.backbone, args.size = [6], "resnet18", 64
    if any(n < 1 for n in args.images):
        parser.error("--images must be >= 1")
    if args.child:
        print(json.dumps(_measure(args.images[0], args.coreset_ratio, args.coreset_size,
                                  args.backbone, args.size)))
        return 0
    rows: list[list[object]] = []
    for images in args.images:
        command = [sys.executable, "-m", "benchmarks.fit_memory", "--child", "--images",
                   str(images), "--coreset-ratio", str(args.coreset_ratio), "--backbone",
                   args.backbone, "--size", str(args.size)]
        if args.coreset_size is not None:
            command += ["--coreset-size", str(args.coreset_size)]
        done = subprocess.run(command, check=True, capture_output=True, text=True,
                              env=dict(os.environ),
                              cwd=Path(__file__).resolve().parent.parent)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        verdict = "-"
        if (images == 1000 and args.backbone == "wide_resnet50_2" and args.size == 224
                and args.coreset_size is None):
            verdict = "yes" if r["peak"] <= TARGET_MIB else "NO"
        rows.append([r["images"], r["patches"], r["bank_rows"], round(r["full_matrix_mib"]),
                     round(r["after_import"]), round(r["before_fit"]), round(r["peak"]),
                     round(r["seconds"], 1), verdict])
        logger.info("%d images: peak RSS %.0f MiB", images, r["peak"])
    table = markdown_table(
        ["images", "patches", "bank rows", "full feature matrix (MiB)", "RSS after import (MiB)",
         "RSS with backbone (MiB)", "peak RSS of fit (MiB)", "fit seconds",
         f"<= {TARGET_MIB} MiB (1,000 images)"],
        rows,
    )
    append_results(
        f"Fit memory: {', '.join(str(n) for n in args.images)} images at {args.size} px, "
        f"{args.backbone}, "
        + (f"bank {args.coreset_size} rows" if args.coreset_size else
           f"coreset {args.coreset_ratio:g}"),
        table,
        "Peak RSS is each child process's maximum (ru_maxrss); target <= 2048 MiB at 1,000 "
        "images, flat beyond where the buffer is capped.",
        append=args.record,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
