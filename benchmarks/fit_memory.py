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
import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.report import append_results, markdown_table, peak_rss_mib
from core.coreset import IncrementalCoreset
from core.data import MVTecDataset, generate_synthetic_dataset
from core.features import FeatureConfig
from core.knn import NearestNeighbourIndex
from core.patchcore import PatchCore, PatchCoreConfig
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

#: Peak RSS target of a 1,000-image fit, MiB.
TARGET_MIB = 2048


#: Phases of a fit, by the method that runs them (everything else in ``fit`` is "extract").
PHASES: tuple[tuple[str, type, str], ...] = (
    ("reduce", IncrementalCoreset, "_reduce"),
    ("select", IncrementalCoreset, "select"),
    ("knn index", NearestNeighbourIndex, "__init__"),
)


def _rss_mib() -> float:
    """Current resident set size of this process, MiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


class PhaseSampler:
    """Samples VmRSS every ``interval`` seconds in a thread and keeps the largest sample of
    each phase; :meth:`phase` marks what the fit is doing. Why: ru_maxrss gives one number for
    the whole fit, not where it was reached. A sample can miss a peak shorter than the interval,
    so the phase maxima are lower bounds of the true peaks (ru_maxrss stays the reported peak)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.current = "before fit"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        rss = _rss_mib()
        if rss > self.peaks.get(self.current, 0.0):
            self.peaks[self.current] = rss

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.current = self.current, name
        self.sample()
        try:
            yield
        finally:
            self.sample()
            self.current = previous

    @contextlib.contextmanager
    def running(self) -> Iterator[PhaseSampler]:
        """Sample while the block runs, with the methods of :data:`PHASES` marking phases."""
        originals: list[tuple[type, str, Callable[..., Any]]] = []
        for name, owner, attribute in PHASES:
            method = getattr(owner, attribute)
            originals.append((owner, attribute, method))
            setattr(owner, attribute, self._marked(name, method))
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            for owner, attribute, method in originals:
                setattr(owner, attribute, method)

    def _marked(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return method(*args, **kwargs)

        return wrapper


def _measure(
    images: int, coreset_ratio: float, coreset_size: int | None, backbone: str, size: int
) -> dict[str, Any]:
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
        with PhaseSampler().running() as sampler, sampler.phase("extract"):
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
        "phase_peaks": {k: v for k, v in sampler.peaks.items() if k != "before fit"},
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
        phases = r["phase_peaks"]
        at_peak = max(phases, key=phases.get)
        rows.append([r["images"], r["patches"], r["bank_rows"], round(r["full_matrix_mib"]),
                     round(r["after_import"]), round(r["before_fit"]), round(r["peak"]),
                     ", ".join(f"{name} {round(mib):,}" for name, mib in phases.items()),
                     at_peak, round(r["seconds"], 1), verdict])
        logger.info("%d images: peak RSS %.0f MiB", images, r["peak"])
    table = markdown_table(
        ["images", "patches", "bank rows", "full feature matrix (MiB)", "RSS after import (MiB)",
         "RSS with backbone (MiB)", "peak RSS of fit (MiB)",
         "largest sampled RSS by phase (MiB)", "phase at the peak", "fit seconds",
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
        "images, flat beyond where the buffer is capped. Phases: VmRSS sampled every 10 ms; "
        "extract = backbone forward passes and buffering, reduce = the selector's merge-reduce, "
        "select = the final selection and its radius, knn index = building the bank's index.",
        append=args.record,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
