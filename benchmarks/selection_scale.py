"""Server selection at federation scale (issue 16): ingest work, tail, memory, certificate, quality.

Case ``scale`` (the issue's workload): the in-process GlobalBankAggregator (the handler the
daemon runs) receives 4 sites x floor(2k / 4) rows of D = 1024 (the clustered rows of
benchmarks.server_selection.site_features), as the daemon gets them: fp16 chunks of 1 MiB
(core.serde.split_into_chunks), summaries first, then the sites' chunks round-robin. Per bank
size k it reports

* add: seconds spent in PrefixMergeSelector.add over the whole upload (the ranking work that
  the lead's background worker does as chunks are journaled), and rows per second;
* finish: finish_round after the last chunk (select: the last partial blocks, the ranking,
  the certificate) = the tail when the worker keeps pace with the upload;
* tail at 250 MB/s: the tail if the rows arrived at the ingest target (250 MB/s of raw fp32)
  and the worker processed them at the measured add rate: max(0, add - upload) + finish;
* peak RSS during feed + selection (VmHWM, reset before the feed; it includes the benchmark's
  encoded chunks, listed apart);
* r_S as reported (exact or bound), the O(N) chain bound, the rows given full checks, and
  (up to ``--quality-upto``) the brute-force exact r_S of the bank, plus the same for the
  bank of the *exact* ranking (every separation by brute force, as the selector computed them
  before issue 16) and the share of kept rows the two banks have in common;
* bank rows per site, and the log-log slope of each time over the bank sizes.

``--workload noise`` replaces the clusters by N(0, 1) rows (the certificate's worst case).

Case ``real``: the same comparison on real-ish features: the generated dataset
(core.data.synthetic, one category per site) through a random-init resnet18 (layer2 + layer3,
D = 1024), each site uploading its local farthest-first coreset in pick order (as sites do), and
once more in random order.

    python -m benchmarks.selection_scale                       # k = 10k, 30k, 100k + real
    python -m benchmarks.selection_scale --device cuda --banks 10000 100000 --quality-upto 0
    python -m benchmarks.selection_scale --quick               # seconds (a test runs it)
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.report import append_results, markdown_table
from benchmarks.server_selection import site_features, site_messages
from core.codec import decode_matrix
from core.coreset import coverage_radius, greedy_coreset
from core.federated.aggregator import GlobalBankAggregator
from core.federated.prefix import PrefixMergeSelector, PrefixSelection, prefix_separations
from core.messages import FeatureChunk, SiteSummary

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "main", "run_real", "run_scale"]

#: The issue's ingest target: raw fp32 bytes per second across sites.
INGEST_BYTES_PER_S = 250e6


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is this phase's."""
    Path("/proc/self/clear_refs").write_text("5")


def _exact_ranking(streams: list[np.ndarray], k: int) -> np.ndarray:
    """Canonical positions (sites in order, rows in upload order) of the k rows of largest
    exact separation: the selection as it was before issue 16 (brute force per site)."""
    separations = np.concatenate([prefix_separations(s)[0] for s in streams])
    return np.sort(np.argsort(-separations, kind="stable")[:k])


def _quality(streams: list[np.ndarray], chosen: PrefixSelection, k: int) -> dict[str, float]:
    """Brute-force exact r_S of the bank and of the exact ranking's bank, and kept rows in
    common (rows are matched by value: the streams hold no duplicates here)."""
    union = np.concatenate(streams)
    keep = _exact_ranking(streams, k)
    reference = union[keep]
    ours = {row.tobytes() for row in chosen.features}
    common = sum(row.tobytes() in ours for row in reference)
    return {
        "exact_rs": coverage_radius(union, chosen.features),
        "ranking_rs": coverage_radius(union, reference),
        "overlap": common / max(1, keep.size),
    }


def _timed(function: Callable[..., None], into: list[float]) -> Callable[..., None]:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        function(*args, **kwargs)
        into.append(time.perf_counter() - start)
    return wrapper


def noise_features(site: int, rows: int, dim: int) -> np.ndarray:
    """[rows, dim] float32 N(0, 1) rows, seeded per site: no structure at all, every distance
    alike (the certificate's worst case: chain bounds and projected guesses settle few rows)."""
    return np.random.default_rng(2000 + site).standard_normal((rows, dim), dtype=np.float32)


def run_scale(k: int, *, sites: int, dim: int, device: str, quality: bool,
              workload: str = "clustered") -> dict[str, Any]:
    """One round of the scale workload through the in-process aggregator (module doc)."""
    rows = (2 * k) // sites
    make = site_features if workload == "clustered" else noise_features
    uploads: list[list[SiteSummary | FeatureChunk]] = [
        site_messages(f"site-{i}", make(i, rows, dim)) for i in range(sites)
    ]
    aggregator = GlobalBankAggregator(k, seed=0, device=device)
    selector = aggregator._prefix
    assert selector is not None, "the scale case measures the prefix merge"
    add_seconds: list[float] = []
    selector.add = _timed(selector.add, add_seconds)  # type: ignore[method-assign]
    held_kib = _status_kib("VmRSS")
    _reset_peak_rss()
    aggregator.begin_round(1)
    for messages in uploads:
        summary = messages[0]
        assert isinstance(summary, SiteSummary)
        aggregator.receive_summary(summary)
    start = time.perf_counter()
    longest = max(len(m) for m in uploads)
    for position in range(1, longest):
        for messages in uploads:
            if position < len(messages):
                chunk = messages[position]
                assert isinstance(chunk, FeatureChunk)
                aggregator.receive_chunk(chunk)
    fed = time.perf_counter()
    outcome = aggregator.finish_round()
    if device == "cuda":
        torch.cuda.synchronize()
    finished = time.perf_counter()
    peak_kib = _status_kib("VmHWM")
    selection = _last_selection(selector, outcome.bank, outcome.server_radius)
    result: dict[str, Any] = {
        "k": k, "rows": rows * sites, "add_s": sum(add_seconds), "feed_s": fed - start,
        "finish_s": finished - fed, "peak_mib": peak_kib / 1024, "held_mib": held_kib / 1024,
        "radius": outcome.server_radius, "exact": selection.radius_exact,
        "chain": selection.chain_radius, "checks": selection.exact_checks,
        "kept": selection.rows_kept,
    }
    upload_s = rows * sites * dim * 4 / INGEST_BYTES_PER_S
    result["tail_at_target_s"] = max(0.0, result["add_s"] - upload_s) + result["finish_s"]
    if quality:
        decoded = []
        for messages in uploads:
            parts = [decode_matrix(m.features, max_decoded_bytes=1 << 24)
                     for m in messages[1:] if isinstance(m, FeatureChunk)]
            decoded.append(np.concatenate(parts))
        result.update(_quality(decoded, selection, k))
    return result


def _last_selection(selector: PrefixMergeSelector, bank: np.ndarray,
                    radius: float) -> PrefixSelection:
    """The PrefixSelection behind the aggregator's last outcome (kept on the selector)."""
    selection = selector.last_selection
    assert selection is not None and selection.features is bank
    assert selection.radius_bound == radius
    return selection


def _slope(ks: list[int], values: list[float]) -> str:
    if len(ks) < 2 or min(values) <= 0:
        return "n/a"
    x, y = np.log(np.array(ks, dtype=float)), np.log(np.array(values))
    return f"{np.polyfit(x, y, 1)[0]:.2f}"


def scale_table(results: list[dict[str, Any]], device: str) -> str:
    rows = []
    for r in results:
        quality = (
            f"{r['exact_rs']:.4f} | {r['ranking_rs']:.4f} | {100 * r['overlap']:.1f} %"
            if "exact_rs" in r else "not run | not run | not run"
        )
        rows.append([
            f"{r['k']:,}", device, f"{r['rows']:,}", f"{r['add_s']:.2f}",
            f"{r['rows'] / r['add_s']:,.0f}", f"{r['finish_s']:.2f}",
            f"{r['tail_at_target_s']:.2f}", f"{r['peak_mib']:,.0f} ({r['held_mib']:,.0f})",
            f"{r['radius']:.4f} ({'exact' if r['exact'] else 'bound'})",
            f"{r['chain']:.4f}", str(r["checks"]), *quality.split(" | "),
            " / ".join(str(v) for v in r["kept"].values()),
        ])
    ks = [r["k"] for r in results]
    rows.append([
        "log-log slope", "", "", _slope(ks, [r["add_s"] for r in results]), "",
        _slope(ks, [r["finish_s"] for r in results]),
        _slope(ks, [r["tail_at_target_s"] for r in results]), "", "", "", "", "", "", "", "",
    ])
    return markdown_table(
        ["k", "device", "rows uploaded", "add total (s)", "add rows/s", "finish = tail (s)",
         "tail at 250 MB/s (s)", "peak RSS MiB (held by the benchmark)", "r_S reported",
         "chain bound", "full checks", "exact r_S (brute force)",
         "exact r_S of the exact ranking", "kept rows shared with it", "bank rows per site"],
        rows,
    )


def real_features(root: Path, categories: tuple[str, ...], images: int,
                  image_size: int) -> list[np.ndarray]:
    """[patches, 1024] float32 training patch features per category (random resnet18)."""
    from benchmarks.common import random_feature_config
    from core.data import AutoVIDataset, generate_synthetic_dataset
    from core.patchcore import PatchCore, PatchCoreConfig

    generate_synthetic_dataset(root, categories=categories, num_train=images, num_test=1,
                               image_size=image_size, layout="autovi")
    train = AutoVIDataset(root, split="train")
    model = PatchCore(PatchCoreConfig(features=random_feature_config("resnet18", image_size)))
    owner = np.array([s.category for s in train.samples])
    out = []
    for category in categories:
        subset = train.subset(np.flatnonzero(owner == category))
        features = torch.cat([f for _, f, _ in model.iter_features(subset)]).numpy()
        out.append(features.reshape(-1, features.shape[-1]).astype(np.float32))
    return out


def run_real(features: list[np.ndarray], local_ratio: float, order: str,
             device: str) -> dict[str, Any]:
    """Sites upload ceil(local_ratio x patches) rows (farthest-first pick order, or a random
    sample in random order); k = half of all uploaded rows."""
    streams = []
    for i, patches in enumerate(features):
        m = math.ceil(local_ratio * len(patches))
        if order == "farthest-first":
            picks = greedy_coreset(patches, m, compute_radius=False).indices
        else:
            picks = np.random.default_rng(i).permutation(len(patches))[:m]
        streams.append(patches[picks].astype(np.float16).astype(np.float32))  # the fp16 wire
    total = sum(len(s) for s in streams)
    k = total // 2
    selector = PrefixMergeSelector(k, capacity=total, device=device)
    start = time.perf_counter()
    for lo in range(0, max(len(s) for s in streams), 512):
        for i, stream in enumerate(streams):
            if lo < len(stream):
                selector.add(f"site-{i}", stream[lo : lo + 512])
    fed = time.perf_counter()
    chosen = selector.select()
    finished = time.perf_counter()
    return {"order": order, "rows": total, "k": k, "add_s": fed - start,
            "finish_s": finished - fed, "radius": chosen.radius_bound,
            "exact": chosen.radius_exact, "chain": chosen.chain_radius,
            "checks": chosen.exact_checks, "kept": chosen.rows_kept,
            **_quality(streams, chosen, k)}


def real_table(results: list[dict[str, Any]], device: str) -> str:
    return markdown_table(
        ["upload order", "device", "rows uploaded -> k", "add (s)", "select (s)",
         "r_S reported", "chain bound", "exact r_S (brute force)",
         "exact r_S of the exact ranking", "kept rows shared with it", "bank rows per site"],
        [[r["order"], device, f"{r['rows']:,} -> {r['k']:,}", f"{r['add_s']:.2f}",
          f"{r['finish_s']:.2f}", f"{r['radius']:.4f} ({'exact' if r['exact'] else 'bound'})",
          f"{r['chain']:.4f}", f"{r['exact_rs']:.4f}", f"{r['ranking_rs']:.4f}",
          f"{100 * r['overlap']:.1f} %", " / ".join(str(v) for v in r["kept"].values())]
         for r in results],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--case", choices=("scale", "real", "all"), default="all")
    parser.add_argument("--banks", type=int, nargs="+", default=[10_000, 30_000, 100_000],
                        help="bank sizes k of the scale case")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--workload", choices=("clustered", "noise"), default="clustered",
                        help="scale case rows: site_features' clusters (the issue's), or pure "
                        "N(0, 1) noise (the certificate's worst case)")
    parser.add_argument("--quality-upto", type=int, default=30_000,
                        help="brute-force exact r_S and exact ranking up to this k (quadratic)")
    parser.add_argument("--images", type=int, default=80, help="real case: images per site")
    parser.add_argument("--image-size", type=int, default=128, help="real case: px")
    parser.add_argument("--local-ratio", type=float, default=0.5,
                        help="real case: share of its patches a site uploads")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the selection runs (auto: CUDA when available)")
    parser.add_argument("--quick", action="store_true",
                        help="k = 1,000 and 2,000 at D = 256, a tiny real case (seconds)")
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else (
        args.device
    )
    dim = 256 if args.quick else 1024
    banks = [1000, 2000] if args.quick else args.banks
    if args.case in ("scale", "all"):
        results = []
        for k in banks:
            results.append(run_scale(k, sites=args.sites, dim=dim, device=device,
                                     quality=k <= args.quality_upto, workload=args.workload))
            logger.warning("scale k=%d: %s", k, results[-1])
        append_results(
            f"Server selection at scale{' (quick)' if args.quick else ''}: {args.sites} sites x "
            f"2k/{args.sites} {args.workload} rows x {dim} -> k (prefix merge, in process)",
            scale_table(results, device),
            "Add: seconds inside PrefixMergeSelector.add over the upload (chunks of 1 MiB fp16 "
            "fed round-robin); finish: finish_round after the last chunk. Tail at 250 MB/s: "
            "max(0, add - upload at 250 MB/s raw fp32) + finish, i.e. the worker's backlog "
            "when the last chunk is acknowledged plus the selection. r_S reported is the exact "
            "maximum when marked exact (the chain bound refined), else a bound. The exact "
            "ranking is the pre-issue-16 selection (brute-force separations).",
            append=args.record,
        )
    if args.case in ("real", "all"):
        images, size = (6, 64) if args.quick else (args.images, args.image_size)
        with tempfile.TemporaryDirectory(prefix="selection-scale-") as tmp:
            features = real_features(Path(tmp) / "data", ("mesh", "screw", "stripes", "washer"),
                                     images, size)
        results = [run_real(features, args.local_ratio, order, device)
                   for order in ("farthest-first", "random")]
        append_results(
            f"Server selection quality on resnet18 features{' (quick)' if args.quick else ''}:"
            f" 4 sites (one generated category each, {images} images of {size} px), "
            f"{args.local_ratio:g} of the patches uploaded",
            real_table(results, device),
            "Approximate ranking (this selector) against the exact ranking (brute-force "
            "separations) on the same uploads; k = half of the uploaded rows. Exact r_S by brute "
            "force over every uploaded row.",
            append=args.record,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
