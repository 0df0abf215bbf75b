"""Round 2 with real new data (issue 21, item 3): bytes up and down against a full re-upload
and re-download, on the real system.

Per seed, ``python3 dev.py demo``'s federation (one fedserver process, one fedclient process
per site and round, 4 sites, 128 px, resnet18 random weights, D=1024): round 1 as always; then
the washer site's folder gets ``--variant-images`` defect-free images of a new product variant
(the generator's "anodised" finish) and every site runs ``fedclient run`` again with its
``--out`` folder. Measured, all on real processes and the real wire (the sites' counts of the
serialized gRPC messages, fedclient metrics.json):

* per site: rows and bytes it uploaded in round 2, and bytes it downloaded (a delta);
* full re-upload: the variant site's whole coreset of all its images now (round 1's images and
  the variant's), i.e. what it would send if it refitted: a fresh one-site federation on its
  folder as it is after the variant arrived, round 1's bytes up;
* full re-download: the round-2 bank downloaded whole (``have`` none) from the running server
  by a site session, bytes received;
* the variant's test images (good and defective, generated apart from its training images)
  scored with the variant site's calibrated model before (bank v1) and after (bank v2) round 2:
  median score of the good ones, their false-positive rate at the site's threshold, image
  AUROC. If the bank now covers the variant, the good images' scores drop.

Target (issue 21): >= 5x fewer bytes both ways than the full re-upload and re-download.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import append_results, markdown_table
from core.data import SYNTHETIC_VARIANTS, generate_synthetic_dataset
from fedclient import demo
from fedclient.session import ConnectionConfig, RetryPolicy, SiteSession

TARGET = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.new_data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="dataset / federation seeds, one run each (default 0 1 2)")
    parser.add_argument("--variant-images", type=int, default=4,
                        help="variant images added to the washer site's 20 (default 4; 15 %% "
                        "of them are held out for calibration like any training image)")
    parser.add_argument("--variant", choices=SYNTHETIC_VARIANTS, default="anodised",
                        help="the variant's finish (default anodised: strong; bronze: mild)")
    parser.add_argument("--variant-test", type=int, default=12,
                        help="variant test images scored before and after (half good)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    return parser


def _score(model: Path, data: Path, out: Path) -> dict[str, object]:
    """``fedclient score`` of ``data``'s test images with ``model``; its metrics['test']."""
    subprocess.run([sys.executable, "-m", "fedclient", "score", "--bank", str(model), "--data",
                    str(data), "--out", str(out), "--no-overlays"],
                   check=True, capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return metrics["test"]  # type: ignore[no-any-return]


def _good_median(test: dict[str, object]) -> float:
    scores = test["image_scores"]
    assert isinstance(scores, dict)
    return statistics.median(v for k, v in scores.items() if k.split("/")[1] == "good")


def _full_upload(folder: Path, category: str, work: Path, args: argparse.Namespace,
                 bank_size: int, seed: int) -> int:
    """Bytes up of the variant site's whole coreset of its current folder: round 1 of a fresh
    one-site federation (same extractor, codec, coreset share and seed as the demo's)."""
    config = demo.write_server_config(
        work / "fed", ["site"], global_bank_size=bank_size, rounds=1,
        extractor={"backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False,
                   "pretrain_embed_dim": 1024, "target_embed_dim": 1024, "patch_size": 3,
                   "resize": args.image_size, "crop": 0, "init_seed": 0},
    )
    server = demo.ServerProcess(config, work / "fedserver.log")
    try:
        site = demo.start_site(
            server.address, "site", work / "fed" / "site-tokens" / "site.token", folder,
            work / "out", categories=[category],
            extra_args=["--coreset-percentage", "0.25", "--seed", str(seed),
                        "--backbone", "resnet18", "--no-pretrained", "--no-overlays"],
        )
        if site.process.wait(600) != 0:
            raise RuntimeError(f"the full re-upload site failed: {site.log_path}")
    finally:
        server.stop()
    metrics = json.loads((work / "out" / "metrics.json").read_text(encoding="utf-8"))
    return int(metrics["rounds"][0]["bytes_up"])


def _one_seed(seed: int, args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    demo_args = demo.build_parser().parse_args(
        ["--image-size", str(args.image_size), "--rounds", "2", "--seed", str(seed),
         "--variant-images", str(args.variant_images), "--variant", args.variant,
         "--reports", str(tmp / "reports")]
    )
    root = generate_synthetic_dataset(tmp / "data", image_size=args.image_size, seed=seed,
                                      layout="autovi")
    variant_test = generate_synthetic_dataset(
        tmp / "variant-test", categories=("washer",), num_train=1, num_test=args.variant_test,
        image_size=args.image_size, seed=seed, layout="autovi", variant=args.variant,
    )
    work = tmp / "work"
    site = "site-4"  # the demo's washer site (categories sorted: mesh, screw, stripes, washer)
    kept: dict[str, object] = {}

    def between(number: int, server: demo.ServerProcess) -> None:
        if number == 2:  # bank v1, calibrated: the site model before the variant arrives
            kept["before"] = Path(shutil.copy2(work / f"out-{site}" / "site-model.safetensors",
                                               tmp / "site-model-v1.safetensors"))
            return
        token = (work / "fed" / "site-tokens" / f"{site}.token").read_text().strip()
        with SiteSession(ConnectionConfig(server.address, token=token), site,
                         retry=RetryPolicy(max_attempts=3), rng=random.Random(seed)) as session:
            kept["full_down"] = session.download_bank(version=0, have=None).bytes_received

    metrics = demo._run_on(root, work, demo_args, between_rounds=between)
    if not metrics[site].get("num_new_images"):
        raise RuntimeError(f"{site} read no new images in round 2: it is not the variant site")
    bank_size = max(1, round(demo_args.bank_ratio * 80 * (args.image_size // 8) ** 2))
    full_up = _full_upload(work / f"data-{site}", "washer", tmp / "full", args, bank_size,
                           seed)
    before = _score(kept["before"], variant_test, tmp / "score-v1")  # type: ignore[arg-type]
    after = _score(work / f"out-{site}" / "site-model.safetensors", variant_test,
                   tmp / "score-v2")
    return {"metrics": metrics, "full_up": full_up, "full_down": kept["full_down"],
            "before": before, "after": after, "variant_site": site}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load = Path("/proc/loadavg").read_text().split()[0]
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="fedpatchcore-new-data-") as tmp:
            runs.append((seed, _one_seed(seed, args, Path(tmp))))
    rows = []
    up_ratios, down_ratios = [], []
    for seed, run in runs:
        metrics = run["metrics"]
        assert isinstance(metrics, dict)
        variant_site = run["variant_site"]
        for site, m in metrics.items():
            r2 = m["rounds"][1]
            up_full = run["full_up"] if site == variant_site else m["rounds"][0]["bytes_up"]
            up_ratio = up_full / r2["bytes_up"]
            down_ratio = run["full_down"] / r2["bytes_down"]
            if site == variant_site:
                up_ratios.append(up_ratio)
                down_ratios.append(down_ratio)
            rows.append([seed, site + (" (variant)" if site == variant_site else ""),
                         m.get("num_new_images") or 0, r2["rows_up"], r2["num_novel"],
                         r2["bytes_up"], up_full, f"{up_ratio:.1f}", r2["bytes_down"],
                         run["full_down"], f"{down_ratio:.1f}",
                         f"{m['rounds'][0]['bank_version']}->{r2['bank_version']}"])
    header = ["seed", "site", "new images read", "rows up", "patches beyond r_i", "bytes up",
              "full re-upload", "x fewer up", "bytes down (delta)", "full re-download",
              "x fewer down", "bank"]
    quality = []
    for seed, run in runs:
        before, after = run["before"], run["after"]
        assert isinstance(before, dict) and isinstance(after, dict)
        quality.append([seed, f"{_good_median(before):.3f}", f"{_good_median(after):.3f}",
                        f"{before['false_positive_rate']:.2f}",
                        f"{after['false_positive_rate']:.2f}",
                        f"{before['image_auroc']:.3f}", f"{after['image_auroc']:.3f}"])
    quality_header = ["seed", "good variant images: median score, bank v1",
                      "median score, bank v2", "false-positive rate v1", "false-positive rate v2",
                      "image AUROC v1", "image AUROC v2"]

    def summary(values: list[float]) -> str:
        return (f"median {statistics.median(values):.1f}x (min {min(values):.1f}, "
                f"max {max(values):.1f})")

    met_up = min(up_ratios) >= TARGET
    met_down = min(down_ratios) >= TARGET
    notes = (
        f"{len(runs)} seed(s); load (1 min) at start {load}. The variant site (washer) gets "
        f"{args.variant_images} images of the {args.variant} variant added to its 20 in round 2; "
        "the other sites' folders are unchanged. Full re-upload: for the variant site, round 1 of "
        "a fresh one-site federation on its folder after the variant arrived (its whole coreset of "
        "all its images); for the others, their round-1 upload (same images). Full re-download: "
        "the round-2 bank downloaded whole by a site session. Bytes are the serialized gRPC "
        "messages as fedclient counts them (fp16 + zstd level 1, 1 MiB chunks).\n\n"
        f"Variant site, bytes up: {summary(up_ratios)} fewer than a full re-upload: target "
        f">= {TARGET:.0f}x {'met' if met_up else 'MISSED'}. Bytes down: {summary(down_ratios)} "
        f"fewer than a full re-download: target >= {TARGET:.0f}x "
        f"{'met' if met_down else 'MISSED'}.\n\nThe variant's test images ("
        f"{args.variant_test}, half good), scored by the variant site's calibrated model with "
        "bank v1 (before round 2) and v2 (after):\n\n" + markdown_table(quality_header, quality)
    )
    append_results(
        f"New data in round 2: one site brings {args.variant_images} images of a new variant "
        f"({args.variant}; real processes)", markdown_table(header, rows), notes,
        append=args.record,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
