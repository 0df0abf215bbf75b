"""Upload size against bank quality: how many rows each site should send in round 1.

The server keeps the k uploaded rows with the largest separations, so the upload size decides
how much choice it has. This benchmark fixes the data, the backbone and the seeds, computes each
site's farthest-first order once (min(n_i, k) picks; a smaller upload is a prefix of it, as in
``fedclient``, whose sites are small enough never to reduce), and selects the bank with the
server's prefix merge (``core.federated.prefix.PrefixMergeSelector``) from uploads sized by

* ``f x k / S`` per site (:class:`core.federated.upload.UploadBudget`, what sites send by
  default; f = ``--factors``),
* ``2 x k x n_i / N`` (the old in-process default, which needs every site's patch count N),
* ``min(n_i, k)``: the upload after which more rows cannot change the bank (the reference).

Columns: rows and bytes uploaded (all sites, fp16 + zstd wire messages), bank rows, the share
of the reference bank's rows the bank holds, the realised radius (largest distance of any
training patch to the bank) and the mean patch distance, and image / pixel AUROC (means of the
categories; the worst category's image AUROC). Settings are those of
``benchmarks.realistic_parity`` (generated, nothing downloaded).

    python -m benchmarks.upload_size             # photos, 3 partitions, 2 seeds
    python -m benchmarks.upload_size --record    # ... and appends the table to RESULTS.md
    python -m benchmarks.upload_size --quick     # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import random_feature_config
from benchmarks.realistic_parity import (
    METRICS,
    PARTITIONS,
    SETTINGS,
    Evaluator,
    Scores,
    _site_patches,
    make_setting,
    partitioners,
)
from benchmarks.report import append_results, markdown_table, peak_rss_mib
from core.codec import DEFAULT_CODEC
from core.coreset import greedy_coreset
from core.federated.prefix import PrefixMergeSelector
from core.federated.upload import UploadBudget
from core.knn import NearestNeighbourIndex
from core.serde import DEFAULT_MAX_CHUNK_BYTES, split_into_chunks, upload_request_to_proto

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.upload_size",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--setting", default="photos", choices=SETTINGS)
    parser.add_argument("--sites", type=int, default=3, help="federated sites")
    parser.add_argument("--num-train", type=int, default=60, help="train images per category")
    parser.add_argument("--num-test", type=int, default=50, help="test images per category")
    parser.add_argument("--image-size", type=int, default=96, help="image side = input, px")
    parser.add_argument("--backbone", default="resnet18", help="timm backbone (random init)")
    parser.add_argument("--neighbors", type=int, default=9, help="image-score reweighting")
    parser.add_argument("--bank-ratio", type=float, default=0.1,
                        help="global bank k, fraction of all training patches")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0],
                        help="upload multipliers f of the per-site rule f x k / S")
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration")
    parser.add_argument("--seeds", type=int, default=2, help="coreset seeds 0..n-1")
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=PARTITIONS)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 6 train + 6 test images, 64 px, 1 seed, IID")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    return parser


def upload_bytes(rows: np.ndarray, site: str) -> int:
    """Serialized UploadFeatures messages of ``rows`` (default codec, 1 MiB chunks), bytes."""
    return sum(upload_request_to_proto(c).ByteSize() for c in split_into_chunks(
        rows, config=DEFAULT_CODEC, site_id=site, round=1,
        max_chunk_bytes=DEFAULT_MAX_CHUNK_BYTES))


def rules(args: argparse.Namespace, bank_size: int, sizes: list[int]) -> dict[str, list[int]]:
    """Rows each site uploads, per rule label."""
    total = sum(sizes)
    out = {f"f x k / S, f = {f:g}": [UploadBudget(bank_size, len(sizes), factor=f).rows(n)
                                     for n in sizes] for f in args.factors}
    out["2 x k x n_i / N (old in-process default)"] = [
        min(n, bank_size, math.ceil(2 * bank_size * n / total)) for n in sizes]
    out["min(n_i, k) (reference)"] = [min(n, bank_size) for n in sizes]
    return out


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if args.quick:
        args.num_train, args.num_test, args.image_size = 6, 6, 64
        args.seeds, args.partitions = 1, ["iid"]
    features = random_feature_config(args.backbone, args.image_size, init_seed=0)
    header = ["partition", "upload rule", "rows up", "MB up", "bank rows",
              "reference rows kept", "realised radius", "mean patch distance",
              *(f"{m} (mean)" for m in METRICS[:2]), "worst image AUROC"]
    table: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-upload-") as tmp:
        setting = make_setting(args.setting, Path(tmp) / args.setting, args)
        evaluator = Evaluator(features, args.neighbors, setting)
        train_features = evaluator.train_features(setting.train)
        all_patches = train_features.reshape(-1, train_features.shape[-1])
        bank_size = math.ceil(args.bank_ratio * all_patches.shape[0])
        for part_name, partitioner in partitioners(args).items():
            sites = _site_patches(train_features, setting, partitioner)
            sizes = [len(s) for s in sites]
            per_rule = rules(args, bank_size, sizes)
            results: dict[str, list[tuple[int, int, int, float, float, float]]] = {}
            scores: dict[str, Scores] = {}
            for seed in range(args.seeds):
                order = [s[greedy_coreset(s, min(len(s), bank_size), seed=seed,
                                          compute_radius=False).indices] for s in sites]
                reference: set[bytes] | None = None
                for label in reversed(per_rule):  # the reference first
                    uploads = [o[:m] for o, m in zip(order, per_rule[label], strict=True)]
                    selector = PrefixMergeSelector(bank_size, capacity=sum(sizes))
                    for i, upload in enumerate(uploads):
                        selector.add(str(i), upload)
                    bank = selector.select().features
                    keys = {row.tobytes() for row in bank}
                    if reference is None:
                        reference = keys
                    distances, _ = NearestNeighbourIndex(bank).search(all_patches, 1)
                    evaluator.score(bank, scores.setdefault(label, Scores()))
                    results.setdefault(label, []).append((
                        sum(len(u) for u in uploads),
                        sum(upload_bytes(u, str(i)) for i, u in enumerate(uploads)),
                        bank.shape[0], len(keys & reference) / len(reference),
                        float(distances.max()), float(distances.mean())))
                logger.info("%s seed %d done", part_name, seed)
            for label in per_rule:
                values = np.array(results[label], dtype=np.float64).mean(axis=0)
                means = [float(np.mean([scores[label].mean(c, m) for c in setting.categories]))
                         for m in METRICS[:2]]
                worst = min(scores[label].mean(c, METRICS[0]) for c in setting.categories)
                table.append([part_name, label, int(values[0]), values[1] / 1e6, int(values[2]),
                              values[3], values[4], values[5], *means, worst])
            logger.info("%s: site patches %s, k = %d", part_name, sizes, bank_size)
    notes = (
        f"Setting {args.setting}: {args.num_train} train + {args.num_test} test images per "
        f"category, {args.image_size} px; {args.backbone} random init (seed 0), layer2+layer3, "
        f"D=1024, {args.neighbors} neighbours; {args.sites} sites; k = {args.bank_ratio:g} of "
        f"all training patches ({bank_size} rows of {all_patches.shape[0]}); partitions "
        f"{args.partitions} (Dirichlet alpha {args.alpha}); means over seeds "
        f"{list(range(args.seeds))}. Server: prefix merge over the uploads. "
        f"{time.perf_counter() - start:.0f} s, peak RSS {peak_rss_mib():.0f} MiB, load "
        f"average at the end {os.getloadavg()[0]:.1f}."
    )
    title = "Upload size: rows each site sends vs the bank" + (" (quick)" if args.quick else "")
    append_results(title, markdown_table(header, table), notes, append=args.record)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
