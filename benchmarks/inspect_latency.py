"""Inspection speed: per-image latency and throughput against anomalib 2.7's TorchInferencer.

What is measured (issue 20): one image at a time (batch 1: read the PNG, decode, transform,
backbone + embedding, nearest-neighbour search, anomaly map, normalisation, decision, mask) and
batches of ``--batch`` images, for wide_resnet50_2 at 224 px (resize 256, centre crop 224) with
random weights, against banks of ``--banks`` rows (default 16,000 and 100,000), on the CPU
with ``--threads`` torch threads for every side, in one process.

Sides, measured alternately run by run (ABC, then BCA, ...), so load on a shared machine hits
them alike:

* ``anomalib``: anomalib 2.7's ``TorchInferencer`` on its exported ``Patchcore`` (its
  pre-processor, PatchcoreModel with 9 neighbours, post-processor), the backbone weights copied
  from ours tensor by tensor (benchmarks.peers.copy_backbone_weights), ``predict(path)``;
  its bank: rows of its own 1,536-d embedding of the same training images (its exact search
  costs the same whatever the rows hold);
* ``ours ivf``: ``core.inference.Inferencer`` through a ``core.sitemodel.SiteModel`` with the
  IVF search (the default on a CPU from 4,096 rows), calibrated, deciding and thresholding the
  mask (no file written); its bank: a farthest-first coreset of our 1,024-d embedding of the
  training images;
* ``ours exact``: the same with the exact search (core.knn, torch backend: on this machine
  faiss-cpu 1.15's flat search took 4.3 s for 784 x 100k x 1024 against torch's 1.05 s).

Reported per side: latency per image at batch 1 (p50 / p99 over every image of every run),
throughput (images/s at batch 1 and at ``--batch``: median, min-max over runs), and for ours
the split per image at batch 1: load (read + decode + transform), extraction (backbone +
embedding), kNN, maps (upsampling + gaussian) and the kNN's share of the image's time; for
anomalib the same split from timers wrapped around its feature extractor, nearest-neighbour
search and anomaly-map generator. The IVF row also gives the largest relative difference of its
image scores from the exact search's on the benchmark images.

Run: ``python -m benchmarks.inspect_latency [--record]`` (a few minutes on 2 cores; needs the
``bench`` extra for anomalib, else ``--no-anomalib``). ``--quick`` runs every path on a small
backbone and tiny banks in seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import append_results, markdown_table
from core.coreset import greedy_coreset
from core.data import MVTecDataset, generate_synthetic_dataset
from core.data.imageio import read_rgb
from core.features import FeatureConfig, iterate_batches
from core.inference import StageTimes
from core.patchcore import PatchCore, PatchCoreConfig
from core.preprocess import ImageTransform
from core.sitemodel import SiteModel
from fedclient.inspect import decide

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "main"]

#: Latency stages of ours (core.inference.StageTimes) and of the anomalib timers.
STAGES = ("load", "extract", "knn", "maps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inspect_latency",
        description="Per-image latency (p50/p99) and throughput of fedclient's inspection "
        "path against anomalib 2.7's TorchInferencer, same weights, bank size and threads.",
    )
    parser.add_argument("--banks", type=int, nargs="+", default=[16_000, 100_000],
                        help="bank sizes in rows (default 16000 100000)")
    parser.add_argument("--images", type=int, default=8, help="distinct test images (default 8)")
    parser.add_argument("--runs", type=int, default=3,
                        help="repetitions of every measurement (default 3)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the batched "
                        "throughput (default 8)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads for every side (default: 2, or fewer cores)")
    parser.add_argument("--no-anomalib", action="store_true", help="skip anomalib")
    parser.add_argument("--no-exact", action="store_true", help="skip ours with exact search")
    parser.add_argument("--quick", action="store_true",
                        help="resnet18 at 64 px, banks of 500 and 1,500 rows, 4 images, 1 run, "
                        "1 thread: seconds")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    return parser


@dataclass
class Measured:
    """One side on one bank: per-image latencies (s) at batch 1 over all runs, throughput per
    run at batch 1 and batched, and per-stage seconds per image at batch 1 (one value per run).
    """

    latencies: list[float] = field(default_factory=list)
    single_ips: list[float] = field(default_factory=list)
    batch_ips: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})


class _Timers:
    """Wall-clock seconds accumulated by wrapped callables (anomalib's stages)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def wrap(self, stage: str, function: Callable[..., object]) -> Callable[..., object]:
        def timed(*args: object, **kwargs: object) -> object:
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, dict.fromkeys(STAGES, 0.0)
        return out


# --- the sides ---------------------------------------------------------------------------------


class OursSide:
    """fedclient's inspection path on one bank (a calibrated SiteModel, no file written)."""

    def __init__(self, site_model: SiteModel) -> None:
        self.site_model = site_model
        self.inferencer = site_model.inferencer()
        self.times = StageTimes()

    def one(self, path: Path) -> float:
        t0 = time.perf_counter()
        image = read_rgb(path)
        read = StageTimes(load=time.perf_counter() - t0)
        scored = self.inferencer.score_arrays([image])
        decide(self.site_model, [path.stem], scored, originals=[image.shape[:2]])
        self.times = self.times + read + scored.times
        return float(scored.image_scores[0])

    def batch(self, paths: Sequence[Path]) -> None:
        images = [read_rgb(p) for p in paths]
        scored = self.inferencer.score_arrays(images)
        decide(self.site_model, [p.stem for p in paths], scored,
               originals=[i.shape[:2] for i in images])

    def take_stages(self) -> dict[str, float]:
        out, self.times = self.times.as_dict(), StageTimes()
        return {s: out[s] for s in STAGES}


class AnomalibSide:
    """anomalib 2.7's TorchInferencer on an exported Patchcore holding ``bank``."""

    def __init__(self, ours: PatchCore, bank: torch.Tensor, workdir: Path) -> None:
        from anomalib.deploy import TorchInferencer
        from anomalib.models import Patchcore

        from benchmarks.peers import copy_backbone_weights

        features = ours.config.features
        module = Patchcore(backbone=features.backbone, layers=list(features.layers),
                           pre_trained=False, evaluator=False, visualizer=False)
        copy_backbone_weights(ours.extractor.backbone,
                              module.model.feature_extractor.feature_extractor)
        module.model.memory_bank = bank
        module.eval()
        exported = module.to_torch(workdir / f"anomalib-{bank.shape[0]}")
        os.environ["TRUST_REMOTE_CODE"] = "1"  # our own file, written just above
        self.inferencer = TorchInferencer(path=exported, device="cpu")
        model = self.inferencer.model.model
        self.timers = _Timers()
        extractor = model.feature_extractor
        extractor.forward = self.timers.wrap("extract", extractor.forward)
        model.nearest_neighbors = self.timers.wrap("knn", model.nearest_neighbors)
        generator = model.anomaly_map_generator
        generator.forward = self.timers.wrap("maps", generator.forward)

    @torch.inference_mode()
    def one(self, path: Path) -> float:
        t0 = time.perf_counter()
        from anomalib.data.utils import read_image

        image = read_image(path, as_tensor=True)
        self.timers.seconds["load"] += time.perf_counter() - t0
        return float(self.inferencer.predict(image).pred_score.reshape(-1)[0])

    @torch.inference_mode()
    def batch(self, paths: Sequence[Path]) -> None:
        from anomalib.data.utils import read_image

        self.inferencer.predict(torch.stack([read_image(p, as_tensor=True) for p in paths]))

    def take_stages(self) -> dict[str, float]:
        return self.timers.take()


def anomalib_embeddings(ours: PatchCore, images: MVTecDataset, batch_size: int) -> torch.Tensor:
    """[N * h * w, 1536] anomalib's PatchCore embedding of ``images`` (its pooling and layer
    concatenation on our backbone's weights)."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from benchmarks.peers import copy_backbone_weights

    features = ours.config.features
    model = PatchcoreModel(layers=list(features.layers), backbone=features.backbone,
                           pre_trained=False).eval()
    copy_backbone_weights(ours.extractor.backbone, model.feature_extractor.feature_extractor)
    out = []
    with torch.inference_mode():
        for _, pixels in iterate_batches(images.load_image, range(len(images)),
                                         features.transform, batch_size):
            maps = model.feature_extractor(pixels)
            pooled = {k: model.feature_pooler(v) for k, v in maps.items()}
            out.append(model.reshape_embedding(model.generate_embedding(pooled)))
    return torch.cat(out)


# --- the run -----------------------------------------------------------------------------------


def _measure(side: OursSide | AnomalibSide, paths: Sequence[Path], batch: int,
             into: Measured) -> None:
    side.take_stages()
    t_all = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        side.one(path)
        into.latencies.append(time.perf_counter() - t0)
    into.single_ips.append(len(paths) / (time.perf_counter() - t_all))
    stages = side.take_stages()
    for stage in STAGES:
        into.stages[stage].append(stages[stage] / len(paths))
    t0 = time.perf_counter()
    for lo in range(0, len(paths), batch):
        side.batch(paths[lo : lo + batch])
    into.batch_ips.append(len(paths) / (time.perf_counter() - t0))


def _patch_errors(ours: PatchCore, site_model: SiteModel, paths: Sequence[Path]
                  ) -> tuple[float, float]:
    """(99th percentile, largest) relative excess of the IVF patch distances over the exact
    ones, over every patch of the benchmark images."""
    assert site_model.ivf is not None
    transform = ours.config.features.transform
    excess = []
    with torch.inference_mode():
        for path in paths:
            features, _ = ours.extractor(transform.image(read_rgb(path))[None])
            flat = features.reshape(-1, features.shape[-1])
            exact = ours._index.search(flat, 1)[0][:, 0]  # type: ignore[union-attr]
            approx = site_model.ivf.search(flat, site_model.search.nprobe)
            excess.append((approx - exact) / np.maximum(exact, 1e-3 * float(np.median(exact))))
    values = np.concatenate(excess)
    return float(np.quantile(values, 0.99)), float(values.max())


def _spread(values: Sequence[float], digits: int = 2) -> str:
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-"
            f"{max(values):.{digits}f})")


def _p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q * len(ordered))) - 1))]


def run(args: argparse.Namespace, workdir: Path) -> tuple[str, str]:
    if args.quick:
        features = FeatureConfig("resnet18", pretrained=False, pretrain_embed_dim=256,
                                 target_embed_dim=256, transform=ImageTransform(72, 64))
        banks, size = [500, 1500], 72
        args.images, args.runs, args.batch = min(args.images, 4), 1, min(args.batch, 2)
        # one thread: on a loaded 2-core machine two OpenMP threads per process spin at
        # barriers (resnet18 at 64 px took 870 ms an image instead of 10 ms)
        args.threads = 1
    else:
        features = FeatureConfig("wide_resnet50_2", pretrained=False)  # resize 256, crop 224
        banks, size = sorted(args.banks), 256
    torch.set_num_threads(args.threads)
    ours = PatchCore(PatchCoreConfig(features=features, knn_backend="torch", batch_size=8))
    grid_rows = (features.transform.crop // 8) ** 2 if features.transform.crop else 784
    train_count = int(np.ceil(1.25 * max(banks) / grid_rows)) + 1
    root = workdir / "data"
    generate_synthetic_dataset(root, categories=("washer",), num_train=train_count,
                               num_test=max(1, args.images // 4), image_size=size, seed=0,
                               layout="mvtec")
    train = MVTecDataset(root, split="train")
    t0 = time.perf_counter()
    rows = torch.cat([f.reshape(-1, f.shape[-1]) for _, f, _ in ours.iter_features(train)])
    logger.info("extracted %d training patches in %.1f s", rows.shape[0], time.perf_counter() - t0)
    test_dir = workdir / "test"
    test_dir.mkdir()
    # new images, none of them in the bank: the generator's test split (good and defective)
    # and good images of another seed
    fresh = generate_synthetic_dataset(workdir / "fresh", categories=("washer",),
                                       num_train=args.images + 12, num_test=0, image_size=size,
                                       seed=1, layout="mvtec")
    fresh_good = sorted((fresh / "washer" / "train" / "good").glob("*.png"))
    sources = sorted((root / "washer" / "test").rglob("*.png")) + fresh_good[12:]
    paths = []
    for i, source in enumerate(sources[: args.images]):
        paths.append(test_dir / f"{i:03d}.png")
        paths[-1].write_bytes(source.read_bytes())
    anomalib_rows = None
    if not args.no_anomalib:
        t0 = time.perf_counter()
        anomalib_rows = anomalib_embeddings(ours, train, 8)
        logger.info("anomalib embedding: %s in %.1f s", tuple(anomalib_rows.shape),
                    time.perf_counter() - t0)
    calibration_images = MVTecDataset(fresh, split="train").subset(range(12))
    table_rows: list[list[object]] = []
    notes: list[str] = []
    for k in banks:
        t0 = time.perf_counter()
        selection = greedy_coreset(rows.numpy(), k, compute_radius=False, seed=0)
        bank = rows.numpy()[selection.indices]
        logger.info("bank of %d rows (coreset) in %.1f s", k, time.perf_counter() - t0)
        ours.set_memory_bank(bank)
        sides: dict[str, OursSide | AnomalibSide] = {}
        t0 = time.perf_counter()
        ivf = SiteModel.from_model(ours, search="ivf")
        build_s = time.perf_counter() - t0
        ivf.calibrate(calibration_images, target_fpr=0.1)
        sides["ours ivf"] = OursSide(ivf)
        if not args.no_exact:
            exact = SiteModel.from_model(ours, search="exact")
            exact.calibrate(calibration_images, target_fpr=0.1)
            sides["ours exact"] = OursSide(exact)
        if anomalib_rows is not None:
            pick = torch.randperm(anomalib_rows.shape[0],
                                  generator=torch.Generator().manual_seed(0))[:k]
            sides["anomalib"] = AnomalibSide(ours, anomalib_rows[pick].contiguous(), workdir)
        for side in sides.values():  # warm up: first passes build kernels
            side.one(paths[0])
            side.batch(paths[: args.batch])
        measured = {name: Measured() for name in sides}
        names = list(sides)
        for r in range(args.runs):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                _measure(sides[name], paths, args.batch, measured[name])
        if "ours exact" in sides:
            ivf_scores = np.array([sides["ours ivf"].one(p) for p in paths])
            exact_scores = np.array([sides["ours exact"].one(p) for p in paths])
            rel = float(np.max(np.abs(ivf_scores - exact_scores) / exact_scores))
            patch = _patch_errors(ours, ivf, paths)
            notes.append(f"{k:,} rows: IVF ({ivf.ivf.cells} cells, nprobe "  # type: ignore[union-attr]
                         f"{ivf.search.nprobe}, built in {build_s:.1f} s): image scores differ "
                         f"from the exact search's by at most {rel:.2e} (relative) on the "
                         f"{len(paths)} benchmark images; patch distances by {patch[0]:.2e} "
                         f"(99th percentile) and {patch[1]:.2e} (largest)")
        for name in names:
            m = measured[name]
            stage_ms = {s: 1000 * statistics.median(v) for s, v in m.stages.items()}
            p50 = 1000 * statistics.median(m.latencies)
            dim = (anomalib_rows.shape[1] if name == "anomalib" and anomalib_rows is not None
                   else features.target_embed_dim)
            table_rows.append([
                f"{k:,}", name, dim, f"{p50:.0f}", f"{1000 * _p(m.latencies, 0.99):.0f}",
                _spread(m.single_ips), _spread(m.batch_ips),
                *(f"{stage_ms[s]:.0f}" for s in STAGES),
                f"{100 * stage_ms['knn'] / p50:.0f} %",
            ])
        a = measured.get("anomalib")
        if a is not None:
            ratio = statistics.median(a.latencies) / statistics.median(
                measured["ours ivf"].latencies)
            notes.append(f"{k:,} rows: batch-1 latency p50, anomalib / ours ivf = {ratio:.2f}x")
    header = ["bank rows", "side", "D", "p50 ms", "p99 ms", "img/s batch 1",
              f"img/s batch {args.batch}", "load ms", "extract ms", "kNN ms", "maps ms",
              "kNN share"]
    title = (f"Inspection latency: {features.backbone} random weights, "
             f"{features.transform.crop or features.transform.resize} px, {args.threads} "
             f"threads, {len(paths)} images x {args.runs} runs" + (" (quick)" if args.quick
                                                                   else ""))
    notes.append(
        "p50/p99: per-image latency at batch 1 over every image of every run (read + decode + "
        "transform + backbone + embedding + kNN + map + normalisation + decision + mask; "
        f"with {len(paths) * args.runs} samples p99 is close to the maximum). img/s: median "
        "(min-max) over runs. Stage columns: median over runs of the mean per image at batch 1; "
        "kNN share = kNN ms / p50 ms. anomalib: TorchInferencer.predict on its exported "
        "Patchcore (9 neighbours, its pre- and post-processor), stages timed by wrappers around "
        "its feature extractor, nearest_neighbors and anomaly-map generator (its 'extract' "
        "excludes pooling/concatenation). Sides alternate run by run; the machine is shared, "
        "so absolute figures move with its load and the ratios in one run are what compare."
    )
    return title, markdown_table(header, table_rows) + "\n\n" + "\n".join(
        f"* {n}" for n in notes)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="inspect-latency-") as tmp:
        title, table = run(args, Path(tmp))
    append_results(title, table, append=args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
