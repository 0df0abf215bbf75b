"""Federated vs centralised vs local-only PatchCore on a generated dataset, per partition.

For IID, category and Dirichlet(alpha) partitions of the training images over ``--sites``
sites, this fits

* **local-only**: each site its own PatchCore on its own images (bank ratio ``--bank-ratio``),
  each evaluated on the whole test set; the table gives the mean over sites and the worst site
  per column;
* **centralised**: one PatchCore on all training images with a bank of
  K = ceil(bank_ratio x all training patches) rows (partition-independent, fitted once);
* **federated**: ``FederatedPatchCore`` with global bank size K, local coresets of
  ``--local-ratio`` of each site's patches, default codec, "coreset" and "random" strategies,
  one round; plus a second round of the coreset strategy on one partition (``--rounds-on``).

Every method is scored on the same whole test set (all categories pooled, so image AUROC also
tests whether scores are comparable across categories). The realised coverage radius of a bank
is the largest distance of any training patch of any site to it (exact kNN over all training
patches, one streaming pass). Targets: federated coreset within 0.005 image and pixel AUROC of
centralised on every partition, realised radius <= 1.25 x centralised.

Test-set features are extracted once and scored against every bank (all banks come from the
same frozen, seeded backbone); the shortcut is checked against ``PatchCore.predict`` first.

    .venv/bin/python -m benchmarks.federated_parity            # full run (~10 min, 2 cores)
    .venv/bin/python -m benchmarks.federated_parity --quick    # smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import (
    FeatureCache,
    SyntheticSetting,
    evaluate_cached,
    generate_setting,
    metric_row,
    random_feature_config,
    realised_radii,
    verify_cached_scoring,
)
from benchmarks.report import append_results, markdown_table, peak_rss_mib
from core.codec import DEFAULT_CODEC
from core.data import (
    SYNTHETIC_CATEGORIES,
    AnomalyDataset,
    CategoryPartitioner,
    DirichletPartitioner,
    IIDPartitioner,
    Partitioner,
)
from core.evaluation import EvaluationResult
from core.features import FeatureConfig
from core.federated import FederatedPatchCore, RoundReport
from core.patchcore import PatchCore, PatchCoreConfig

logger = logging.getLogger(__name__)

IMAGE_TARGET = 0.005  # |federated - centralised| image AUROC
PIXEL_TARGET = 0.005  # |federated - centralised| pixel AUROC
RADIUS_TARGET = 1.25  # realised radius, federated / centralised


@dataclass
class MethodResult:
    """One fitted method on one partition.

    metrics: evaluation on the whole test set. banks: name -> [k, D] bank(s) whose realised
    radius is measured (several for local-only). report: round report of a federated round.
    seconds: wall time of fitting (all sites) in s.
    """

    partition: str
    method: str
    bank_rows: int
    metrics: list[EvaluationResult]
    banks: dict[str, np.ndarray]
    seconds: float
    report: RoundReport | None = None
    radii: dict[str, float] = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.federated_parity",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sites", type=int, default=5, help="number of federated sites")
    parser.add_argument("--categories", nargs="+", default=list(SYNTHETIC_CATEGORIES),
                        choices=SYNTHETIC_CATEGORIES, help="synthetic categories")
    parser.add_argument("--num-train", type=int, default=40, help="train images per category")
    parser.add_argument("--num-test", type=int, default=24, help="test images per category")
    parser.add_argument("--image-size", type=int, default=64,
                        help="generated image side = model input side, px (no crop)")
    parser.add_argument("--backbone", default="resnet18", help="timm backbone (random init)")
    parser.add_argument("--bank-ratio", type=float, default=0.1,
                        help="centralised and local-only bank, fraction of training patches; "
                             "the federated global bank has the centralised size")
    parser.add_argument("--local-ratio", type=float, default=0.25,
                        help="federated local coreset (upload), fraction of a site's patches")
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration")
    parser.add_argument("--rounds-on", default="dirichlet",
                        choices=["iid", "category", "dirichlet", "none"],
                        help="partition whose federated coreset run gets a second round")
    parser.add_argument("--seed", type=int, default=0,
                        help="data, partition, backbone-init and coreset seed")
    parser.add_argument("--quick", action="store_true",
                        help="small smoke run: 10 train + 8 test images per category")
    parser.add_argument("--record", action="store_true",
                        help="append the tables to benchmarks/RESULTS.md (default: print only)")
    return parser


def partitioners(args: argparse.Namespace) -> dict[str, Partitioner]:
    return {
        "iid": IIDPartitioner(args.sites, seed=args.seed),
        "category": CategoryPartitioner(args.sites),
        "dirichlet": DirichletPartitioner(args.sites, alpha=args.alpha, seed=args.seed),
    }


def fit_local_only(
    name: str,
    parts: list[AnomalyDataset],
    features: FeatureConfig,
    args: argparse.Namespace,
    cache: FeatureCache,
    test: AnomalyDataset,
) -> MethodResult:
    """Each site fits on its own images and is scored on the whole test set."""
    start = time.perf_counter()
    metrics, banks, seconds = [], {}, 0.0
    for i, part in enumerate(parts):
        fit_start = time.perf_counter()
        model = PatchCore(
            PatchCoreConfig(features=features, coreset_ratio=args.bank_ratio, seed=args.seed)
        ).fit(part)
        seconds += time.perf_counter() - fit_start
        metrics.append(evaluate_cached(model, cache, test))
        banks[f"{name}/local/{i}"] = model.memory_bank
    logger.info("%s local-only: %.1f s", name, time.perf_counter() - start)
    rows = round(float(np.mean([b.shape[0] for b in banks.values()])))
    return MethodResult(name, "local-only", rows, metrics, banks, seconds)


def fit_federated(
    name: str,
    parts: list[AnomalyDataset],
    features: FeatureConfig,
    strategy: str,
    bank_size: int,
    args: argparse.Namespace,
    cache: FeatureCache,
    test: AnomalyDataset,
) -> tuple[MethodResult, FederatedPatchCore]:
    """One federated round; returns the result and the federation (for more rounds)."""
    fed = FederatedPatchCore(
        num_clients=len(parts),
        backbone=features,
        global_bank_size=bank_size,
        coreset_percentage=args.local_ratio,
        aggregation_strategy=strategy,  # type: ignore[arg-type]
        codec=DEFAULT_CODEC,
        seed=args.seed,
    )
    fed.setup_clients(parts)
    start = time.perf_counter()
    fed.train(1)
    seconds = time.perf_counter() - start
    result = MethodResult(
        name,
        f"federated {strategy}",
        fed.global_bank.shape[0],
        [evaluate_cached(fed.global_model, cache, test)],
        {f"{name}/fed-{strategy}/r1": fed.global_bank.copy()},
        seconds,
        fed.reports[-1],
    )
    return result, fed


def next_round(
    fed: FederatedPatchCore, name: str, cache: FeatureCache, test: AnomalyDataset
) -> MethodResult:
    """Train one more round of ``fed`` and evaluate its new bank."""
    start = time.perf_counter()
    fed.train(1)
    seconds = time.perf_counter() - start
    report = fed.reports[-1]
    return MethodResult(
        name,
        f"federated coreset, {report.round} rounds",
        fed.global_bank.shape[0],
        [evaluate_cached(fed.global_model, cache, test)],
        {f"{name}/fed-coreset/r{report.round}": fed.global_bank.copy()},
        seconds,
        report,
    )


def _radius(result: MethodResult) -> tuple[float, float]:
    """(mean, max) realised radius over the method's banks."""
    values = list(result.radii.values())
    return float(np.mean(values)), float(np.max(values))


def _fmt_cert(value: float) -> object:
    return "inf (none)" if not math.isfinite(value) else value


def main_table(
    central: MethodResult, results: list[MethodResult], central_radius: float
) -> str:
    header = [
        "partition", "method", "bank rows", "img AUROC", "pix AUROC", "AU-PRO", "AU-sPRO@0.3",
        "rows up r1", "up B r1", "down B r1", "certificate", "realised radius",
        "radius / central", "fit s",
    ]
    rows: list[list[object]] = []
    for result in [central, *results]:
        per_site = [metric_row(m) for m in result.metrics]
        _, radius_max = _radius(result)
        if result.method == "local-only":
            mean = [float(np.mean([r[j] for r in per_site])) for j in range(4)]
            worst = [float(np.min([r[j] for r in per_site])) for j in range(4)]
            radius_mean, _ = _radius(result)
            common = [result.partition]
            rows.append([*common, "local-only, mean of sites", result.bank_rows, *mean,
                         0, 0, 0, "n/a", radius_mean, radius_mean / central_radius,
                         result.seconds])
            rows.append([*common, "local-only, worst site per column", result.bank_rows, *worst,
                         0, 0, 0, "n/a", radius_max, radius_max / central_radius,
                         result.seconds])
            continue
        report = result.report
        if report is None:  # centralised
            transfer: list[object] = [0, 0, 0, "n/a"]
        else:
            transfer = [sum(report.rows_up.values()), report.total_bytes_up,
                        report.total_bytes_down, _fmt_cert(report.certificate)]
        rows.append([result.partition, result.method, result.bank_rows, *per_site[0],
                     *transfer, radius_max, radius_max / central_radius, result.seconds])
    return markdown_table(header, rows)


def parity_table(
    central: MethodResult, results: list[MethodResult], central_radius: float
) -> tuple[str, bool]:
    """Deltas of the federated runs against centralised; True if coreset meets all targets."""
    c_img, c_pix, c_pro, _ = metric_row(central.metrics[0])
    header = ["partition", "method", "Δ img AUROC", "Δ pix AUROC", "Δ AU-PRO",
              "radius ratio", f"|Δ img| <= {IMAGE_TARGET}", f"|Δ pix| <= {PIXEL_TARGET}",
              f"ratio <= {RADIUS_TARGET}"]
    rows: list[list[object]] = []
    all_met = True
    for result in results:
        if not result.method.startswith("federated"):
            continue
        img, pix, pro, _ = metric_row(result.metrics[0])
        d_img, d_pix, d_pro = img - c_img, pix - c_pix, pro - c_pro  # type: ignore[operator]
        ratio = _radius(result)[1] / central_radius
        # The slack absorbs float rounding of AUROC differences that equal the target exactly.
        met = (abs(d_img) <= IMAGE_TARGET + 1e-9, abs(d_pix) <= PIXEL_TARGET + 1e-9,
               ratio <= RADIUS_TARGET)
        if result.method == "federated coreset":
            all_met &= all(met)
        rows.append([result.partition, result.method, f"{d_img:+.4f}", f"{d_pix:+.4f}",
                     f"{d_pro:+.4f}", ratio, *("yes" if m else "NO" for m in met)])
    return markdown_table(header, rows), all_met


def rounds_table(first: MethodResult, second: MethodResult) -> str:
    header = ["partition", "round", "rows up", "up B", "down B", "novel patches",
              "bank rows", "certificate", "training radius before round", "realised radius",
              "img AUROC", "pix AUROC"]
    rows: list[list[object]] = []
    for result in (first, second):
        report = result.report
        assert report is not None
        img, pix, _, _ = metric_row(result.metrics[0])
        rows.append([
            result.partition, report.round, sum(report.rows_up.values()), report.total_bytes_up,
            report.total_bytes_down,
            sum(report.num_novel.values()) if report.num_novel else "n/a",
            report.bank_rows, _fmt_cert(report.certificate),
            report.training_radius if report.training_radius is not None else "n/a",
            _radius(result)[1], img, pix,
        ])
    return markdown_table(header, rows)


def run(args: argparse.Namespace) -> bool:
    """Run the benchmark; returns True when the federated coreset met every target."""
    total_start = time.perf_counter()
    if args.quick:
        args.num_train, args.num_test = 10, 8
    setting = SyntheticSetting(tuple(args.categories), args.num_train, args.num_test,
                               args.image_size, args.seed)
    features = random_feature_config(args.backbone, args.image_size, init_seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-parity-") as tmp:
        train, test = generate_setting(Path(tmp) / "data", setting)

        start = time.perf_counter()
        central_model = PatchCore(
            PatchCoreConfig(features=features, coreset_ratio=args.bank_ratio, seed=args.seed)
        ).fit(train)
        central_seconds = time.perf_counter() - start
        bank_size = central_model.memory_bank.shape[0]
        cache = FeatureCache.extract(central_model, test)
        verify_cached_scoring(central_model, cache, test)
        central = MethodResult(
            "all", "centralised", bank_size, [evaluate_cached(central_model, cache, test)],
            {"central": central_model.memory_bank}, central_seconds,
        )
        logger.info("centralised: bank %d rows of %d patches, %.1f s", bank_size,
                    central_model.num_training_patches, central_seconds)

        results: list[MethodResult] = []
        rounds: tuple[MethodResult, MethodResult] | None = None
        site_sizes: dict[str, list[int]] = {}
        for name, partitioner in partitioners(args).items():
            parts = partitioner.partition(train)
            site_sizes[name] = [len(p) for p in parts]
            results.append(fit_local_only(name, parts, features, args, cache, test))
            for strategy in ("coreset", "random"):
                result, fed = fit_federated(
                    name, parts, features, strategy, bank_size, args, cache, test
                )
                results.append(result)
                logger.info("%s federated %s: %.1f s", name, strategy, result.seconds)
                if strategy == "coreset" and name == args.rounds_on:
                    rounds = (result, next_round(fed, name, cache, test))

        banks = dict(central.banks)
        everything = [*results, *(rounds[1:] if rounds else ())]
        for result in everything:
            banks.update(result.banks)
        start = time.perf_counter()
        radii = realised_radii(central_model, train, banks)
        logger.info("realised radii of %d banks: %.1f s", len(banks), time.perf_counter() - start)
        for result in [central, *everything]:
            result.radii = {k: radii[k] for k in result.banks}
        central_radius = radii["central"]

    table = main_table(central, [*results, *(rounds[1:] if rounds else ())], central_radius)
    parity, all_met = parity_table(central, results, central_radius)
    seconds = time.perf_counter() - total_start
    c_img = central.metrics[0].image_auroc
    pairs = int(central.metrics[0].num_anomalous) * (len(test) - central.metrics[0].num_anomalous)
    if c_img is not None and c_img >= 1.0:
        saturated = "saturated: image AUROC parity is trivially true"
    elif c_img is not None and c_img >= 0.99:
        saturated = (f"near saturation: {round((1 - c_img) * pairs)} of {pairs} good/defect "
                     "pairs misordered; the pixel metrics are not saturated")
    else:
        saturated = "not saturated"
    local_rows = {n: [math.ceil(args.local_ratio * s * cache.grid[0] * cache.grid[1])
                      for s in sizes] for n, sizes in site_sizes.items()}
    notes = "\n".join([
        f"Setting: synthetic AutoVI layout, {setting.describe()}; {len(train)} train / "
        f"{len(test)} test images; backbone {args.backbone} random init (seed {args.seed}), "
        f"layer2+layer3, D={features.target_embed_dim}, input {args.image_size} px, patch grid "
        f"{cache.grid[0]}x{cache.grid[1]}; {central_model.num_training_patches} training "
        f"patches; bank K = {bank_size} rows ({args.bank_ratio:g} of the patches) for "
        f"centralised and federated; local-only sites keep {args.bank_ratio:g} of their own "
        f"patches. Centralised image AUROC on the pooled test set: {c_img:.4f} "
        f"({saturated}).",
        f"Federated: {args.sites} sites, local coreset {args.local_ratio:g} of each site's "
        f"patches (rows sent per site: {local_rows}), i.e. {args.local_ratio / args.bank_ratio:.2g}"
        f" x the global bank in total; codec {DEFAULT_CODEC.value_type} + "
        f"shuffle + zstd {DEFAULT_CODEC.zstd_level}. Images per site: {site_sizes}. "
        "Bytes are exact serialized messages summed over all sites (down = bank x sites). "
        "Certificate = max_i r_i + r_S (random sampling certifies nothing). Realised radius = "
        "max over every training patch of every site of the distance to the bank (local-only: "
        "each site's bank against all sites' patches, mean / worst over sites).",
        f"Federated coreset met all targets (|Δ img|, |Δ pix| <= 0.005, radius ratio <= "
        f"{RADIUS_TARGET}) on every partition: {'yes' if all_met else 'NO'}. Wall time "
        f"{seconds:.0f} s, peak RSS {peak_rss_mib():.0f} MiB.",
        "",
        "Parity of the federated runs against centralised:",
        "",
        parity,
    ])
    if rounds is not None:
        notes += "\n\nTwo rounds of the federated coreset strategy:\n\n" + rounds_table(*rounds)
    title = "Federated parity: local-only vs centralised vs federated" + (
        " (quick)" if args.quick else ""
    )
    append_results(title, table, notes, append=args.record)
    return all_met


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
