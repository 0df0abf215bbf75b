"""Coreset selection speed and quality against anomalib 2.7's KCenterGreedy, compared fairly.

Why it is built this way: anomalib's KCenterGreedy allocates a fresh [N, d] tensor per pick, so
its speed depends on glibc's allocator far more than ours does, and under glibc's default
(adaptive mmap threshold) it can run away in memory. So every comparison runs

* under each allocator setting of :data:`ALLOCATORS` (glibc default, ``MALLOC_ARENA_MAX=2``,
  ``MALLOC_MMAP_THRESHOLD_=131072``), each in its own child process that runs BOTH sides,
  alternating anomalib and ours run by run;
* with the child's address space capped (``RLIMIT_AS``, :data:`DEFAULT_CAP_GIB` GiB above what
  the imports map): a runaway fails fast with an allocation error and is counted as a runaway,
  never silently dropped;
* with anomalib seeded as well as we are: its start point comes from torch's global generator
  and its sparse projection from numpy's, so run ``r`` seeds both with ``r`` (we pass ``seed=r``);
* ``--runs`` (default 3) times; tables give median, min-max and every side's projection dim.

Cases:
  A. 20,000 x 1536 -> 2,000 (anomalib's PatchCore embedding size) on real PatchCore embeddings
     (random-init WRN-50 layer2 + upsampled layer3 on generated images, as anomalib builds them)
     and on i.i.d. Gaussian rows (no structure: the worst case for pruning). Quality: the exact
     coverage radius (max distance of any row to the selection, original space) of every run.
  B. 156,800 x 1024 -> 15,680 (one 200-image category at 224 px) on seeded clustered ReLU rows
     (:func:`clustered_relu`): ours ``--runs`` times, and anomalib ONCE (``--large-anomalib``; it
     takes about 25 minutes), each side in its own child so its peak RSS is its own.

  C. ``--gpu-large``: 1,000,000 x 1024 -> 100,000 on ``--device`` (default cuda), ours only:
     the issue's GPU target (<= 15 s). Selection time only (the exact radius runs on the CPU
     and at this size would take longer than the selection); clustered ReLU rows again.

Prints the tables; appends them to RESULTS.md only with ``--record``. ``--quick`` runs every
path on tiny inputs in seconds (the smoke test runs it).

Run: ``python -m benchmarks.coreset_speed [--record] [--large-anomalib]`` (needs the ``bench``
extra for anomalib; without it the anomalib columns say "not installed").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from benchmarks.report import append_results, markdown_table, peak_rss_mib
from core.coreset import coverage_radius, fit_projection, greedy_coreset
from core.data import MVTecDataset, generate_synthetic_dataset
from core.features import FeatureConfig, PatchFeatureExtractor, iterate_batches
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

#: Allocator settings (name, extra environment of the child process).
ALLOCATORS: tuple[tuple[str, dict[str, str]], ...] = (
    ("glibc default", {}),
    ("MALLOC_ARENA_MAX=2", {"MALLOC_ARENA_MAX": "2"}),
    ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"}),
)
#: Address space a worker may map beyond what it maps after its imports and input, GiB. anomalib
#: needs about 1 GiB at 20,000 x 1536; runaways reached 14-24 GB.
DEFAULT_CAP_GIB = 6.0
#: Our projection (greedy_coreset's default; "auto" resolves per input, see fit_projection).
OURS_PROJECTION = "auto"


def clustered_relu(n: int, dim: int, *, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """[n, dim] float32 ReLU(center + 0.5 * noise): ``clusters`` N(0, 1) centers, rows drawn
    uniformly among them. Non-negative, sparse-ish (about 35 % zeros) and clustered like CNN
    patch features of one category; generated, so any machine reproduces it from the seed."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    out = rng.standard_normal((n, dim), dtype=np.float32)
    out *= 0.5
    out += centers[labels]
    np.maximum(out, 0.0, out=out)
    return out


def _dataset(root: Path, images: int) -> MVTecDataset:
    categories = ("washer", "screw", "mesh", "stripes", "fabric")
    per_category = -(-images // len(categories))
    generate_synthetic_dataset(
        root, categories=categories, num_train=per_category, num_test=0, image_size=224, seed=0
    )
    return MVTecDataset(root, split="train")


def anomalib_style_embeddings(dataset: MVTecDataset, rows: int, size: int = 224) -> np.ndarray:
    """[rows, 1536]: layer2 (512) + upsampled layer3 (1024) after 3x3 average pooling, as
    anomalib's PatchcoreModel builds its embedding (random-init WRN-50)."""
    config = FeatureConfig(
        backbone="wide_resnet50_2", pretrained=False, transform=ImageTransform(size, None)
    )
    backbone = PatchFeatureExtractor(config).backbone
    out: list[np.ndarray] = []
    total = 0
    with torch.no_grad():
        for _, images in iterate_batches(
            dataset.load_image, range(len(dataset)), config.transform, 8
        ):
            l2, l3 = backbone(images)
            l2 = F.avg_pool2d(l2, 3, 1, 1)
            l3 = F.interpolate(F.avg_pool2d(l3, 3, 1, 1), size=l2.shape[-2:], mode="bilinear")
            emb = torch.cat([l2, l3], 1).permute(0, 2, 3, 1).reshape(-1, 1536)
            out.append(emb.numpy())
            total += emb.shape[0]
            if total >= rows:
                break
    if total < rows:
        raise ValueError(f"{len(dataset)} images give {total} rows, fewer than {rows}")
    return np.concatenate(out)[:rows]


# -- the worker: runs trials of both sides in one process -------------------------------------


@dataclass(frozen=True)
class Trial:
    """One timed selection. side: "anomalib" or "ours"; seed seeds everything random in it."""

    side: str
    seed: int


@dataclass(frozen=True)
class Outcome:
    """What a trial measured. seconds: selection wall time (ours includes its exact radius);
    radius: exact coverage radius, original space (None for a runaway); status: "ok", or
    "runaway: <error>" when it hit the address-space cap; projection_dim: the dimension the
    side compared distances in; peak_rss_mib: the worker's peak RSS after this trial."""

    side: str
    seed: int
    seconds: float
    radius: float | None
    status: str
    projection_dim: int
    peak_rss_mib: float
    projection: str = ""


def _vm_size_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _load_input(spec: dict[str, object]) -> np.ndarray:
    if "npy" in spec:
        return np.load(str(spec["npy"]))
    n, dim, clusters, seed = (int(spec[key]) for key in ("n", "dim", "clusters", "seed"))  # type: ignore[call-overload]
    return clustered_relu(n, dim, clusters=clusters, seed=seed)


def _run_anomalib(x: np.ndarray, k: int, seed: int) -> tuple[float, np.ndarray, int]:
    from anomalib.models.components.sampling import KCenterGreedy

    # anomalib draws its start point from torch's global generator and its sparse projection
    # from numpy's global generator: seed both, or runs are not repeatable.
    torch.manual_seed(seed)
    np.random.seed(seed)  # anomalib reads numpy's legacy global generator
    start = time.perf_counter()
    sampler = KCenterGreedy(embedding=torch.from_numpy(x), sampling_ratio=k / x.shape[0])
    indices = np.asarray(sampler.select_coreset_idxs(), dtype=np.int64)
    seconds = time.perf_counter() - start
    dim = int(sampler.features.shape[1])
    del sampler
    return seconds, indices, dim


def _worker(spec_path: str) -> None:
    """Run the trials of a spec JSON, write the outcomes JSON (see :func:`run_worker`)."""
    spec = json.loads(Path(spec_path).read_text())
    x = _load_input(spec["input"])
    k = int(spec["k"])
    if any(t["side"] == "anomalib" for t in spec["trials"]):
        import anomalib.models.components.sampling  # noqa: F401 - map its libraries before the cap
    # Warm-up, untimed: one small selection per side, so neither side's first timed run pays
    # for lazy imports and first-call setup.
    warm = x[: min(x.shape[0], 1000)]
    if any(t["side"] == "anomalib" for t in spec["trials"]):
        _run_anomalib(warm, max(1, warm.shape[0] // 10), 0)
    greedy_coreset(warm, max(1, warm.shape[0] // 10), seed=0)
    ours_dim = min(int(spec["ours_dim"]), x.shape[1])  # >= D: no projection, D itself
    kind = str(spec.get("ours_projection", OURS_PROJECTION))
    cap = _vm_size_bytes() + int(float(spec["cap_gib"]) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    logger.info("address space capped at %.2f GiB (mapped after imports and input: %.2f GiB)",
                cap / 2**30, (cap - float(spec["cap_gib"]) * 2**30) / 2**30)
    outcomes: list[Outcome] = []
    for raw in spec["trials"]:
        trial = Trial(**raw)
        try:
            if trial.side == "anomalib":
                seconds, indices, dim = _run_anomalib(x, k, trial.seed)
                radius = coverage_radius(x, x[indices])
                projection = "sparse random"
            else:
                start = time.perf_counter()
                result = greedy_coreset(x, k, seed=trial.seed, projection_dim=ours_dim,
                                        projection=kind)
                seconds = time.perf_counter() - start
                assert result.radius is not None
                radius, dim = result.radius, ours_dim
                fitted = fit_projection(x, ours_dim, trial.seed, kind)  # untimed: which kind
                projection = "none" if fitted is None else fitted.kind
            status = "ok"
        except (MemoryError, RuntimeError) as error:  # torch raises RuntimeError on OOM
            if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
                raise
            seconds, radius, dim, projection = float("nan"), None, -1, ""
            status = f"runaway: {type(error).__name__}"
            logger.warning("%s seed %d hit the address-space cap: %s", trial.side, trial.seed,
                           str(error).splitlines()[0][:200])
        outcomes.append(Outcome(trial.side, trial.seed, seconds, radius, status, dim,
                                peak_rss_mib(), projection))
        logger.info("%s", outcomes[-1])
    Path(spec["out"]).write_text(json.dumps([asdict(o) for o in outcomes]))


def run_worker(
    input_spec: dict[str, object],
    k: int,
    trials: Sequence[Trial],
    env: dict[str, str],
    *,
    cap_gib: float,
    nice: int = 0,
    ours_dim: int = 128,
    ours_projection: str = OURS_PROJECTION,
) -> list[Outcome]:
    """Run ``trials`` in one child process with ``env`` added; returns their outcomes."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec = {
            "input": input_spec,
            "k": k,
            "trials": [asdict(t) for t in trials],
            "out": str(out_path),
            "cap_gib": cap_gib,
            "ours_dim": ours_dim,
            "ours_projection": ours_projection,
        }
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, "-m", "benchmarks.coreset_speed", "--worker", str(spec_path)]
        if nice:
            command = ["nice", "-n", str(nice), *command]
        subprocess.run(
            command,
            check=True,
            env={**os.environ, **env, "TQDM_DISABLE": "1"},
            cwd=Path(__file__).resolve().parent.parent,
        )
        return [Outcome(**o) for o in json.loads(out_path.read_text())]


def _ours_projection(outcomes: Sequence[Outcome]) -> str:
    """Our projection in a table cell: the dim and the kind(s) it resolved to, e.g. "128 pca"."""
    ok = [o for o in outcomes if o.status == "ok"]
    kinds = ",".join(sorted({o.projection for o in ok})) or "-"
    return f"{ok[0].projection_dim} {kinds}" if ok else "-"


def _anomalib_installed() -> bool:
    try:
        import anomalib  # noqa: F401
    except ImportError:
        return False
    return True


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def matrix_rows(
    name: str, input_spec: dict[str, object], k: int, runs: int, cap_gib: float,
    with_anomalib: bool, ours_dim: int = 128, *,
    ours_projection: str = OURS_PROJECTION,
    allocators: Sequence[tuple[str, dict[str, str]]] = ALLOCATORS,
) -> tuple[list[list[object]], dict[str, list[Outcome]]]:
    """Case A for one input: each allocator setting, both sides in one child per setting."""
    rows: list[list[object]] = []
    by_setting: dict[str, list[Outcome]] = {}
    for setting, env in allocators:
        trials: list[Trial] = []
        for seed in range(runs):
            if with_anomalib:
                trials.append(Trial("anomalib", seed))
            trials.append(Trial("ours", seed))
        outcomes = run_worker(input_spec, k, trials, env, cap_gib=cap_gib, ours_dim=ours_dim,
                              ours_projection=ours_projection)
        by_setting[setting] = outcomes
        anomalib = [o for o in outcomes if o.side == "anomalib"]
        ours = [o for o in outcomes if o.side == "ours"]
        a_ok = [o for o in anomalib if o.status == "ok"]
        a_sec = [o.seconds for o in a_ok]
        o_sec = [o.seconds for o in ours]
        a_rad = [o.radius for o in a_ok if o.radius is not None]
        o_rad = [o.radius for o in ours if o.radius is not None]
        if with_anomalib:
            speedup = (
                f"{statistics.median(a_sec) / statistics.median(o_sec):.1f}x"
                if a_sec else "-"
            )
            a_cells: list[object] = [
                _spread(a_sec),
                f"{len(anomalib) - len(a_ok)} of {len(anomalib)}",
                _spread(a_rad),
                ",".join(sorted({str(o.projection_dim) for o in a_ok})) or "-",
            ]
            ratio = (
                f"{statistics.median(o_rad) / statistics.median(a_rad):.3f}" if a_rad else "-"
            )
        else:
            speedup, ratio = "-", "-"
            a_cells = ["not run", "-", "-", "-"]
        rows.append([name, setting, *a_cells, _spread(o_sec), _spread(o_rad),
                     _ours_projection(ours), speedup, ratio])
    return rows, by_setting


MATRIX_HEADER = [
    "input", "allocator", "anomalib s: median (min-max)", "anomalib runaways",
    "anomalib radius", "anomalib proj. dim", "ours s (incl. exact radius)", "ours radius",
    "ours projection", "speed-up (medians)", "radius ours / anomalib (medians)",
]


def large_rows(
    input_spec: dict[str, object], k: int, runs: int, cap_gib: float, anomalib: bool,
    ours_dim: int = 128, *,
    ours_projection: str = OURS_PROJECTION,
) -> list[list[object]]:
    """Case B: ours (``runs`` times, one child) and anomalib (once, own child): seconds, radius,
    peak RSS of each side's process."""
    rows: list[list[object]] = []
    ours = run_worker(input_spec, k, [Trial("ours", s) for s in range(runs)], {}, cap_gib=cap_gib,
                      ours_dim=ours_dim, ours_projection=ours_projection)
    ours_sec = [o.seconds for o in ours]
    ours_rad = [o.radius for o in ours if o.radius is not None]
    a_outcome: Outcome | None = None
    if anomalib:
        a_outcome = run_worker(input_spec, k, [Trial("anomalib", 0)], {}, cap_gib=cap_gib,
                               nice=10)[0]
    if a_outcome is not None:
        rows.append(["anomalib 2.7 KCenterGreedy (1 run)",
                     f"{a_outcome.projection_dim} {a_outcome.projection}",
                     f"{a_outcome.seconds:.4g}" if a_outcome.status == "ok" else a_outcome.status,
                     a_outcome.radius if a_outcome.radius is not None else "-",
                     round(a_outcome.peak_rss_mib), "1.0x"])
    speedup = (
        f"{a_outcome.seconds / statistics.median(ours_sec):.0f}x"
        if a_outcome is not None and a_outcome.status == "ok" else "-"
    )
    rows.append([f"greedy_coreset ({runs} runs, incl. exact radius)", _ours_projection(ours),
                 _spread(ours_sec), _spread(ours_rad), round(max(o.peak_rss_mib for o in ours)),
                 speedup])
    return rows


def gpu_large_rows(n: int, dim: int, k: int, runs: int, device: str) -> list[list[object]]:
    """Case C: greedy_coreset on ``device``, ``runs`` seeds, selection only; in this process
    after an untimed warm-up (CUDA context, kernels)."""
    x = clustered_relu(n, dim, clusters=200, seed=0)
    greedy_coreset(x[: min(n, 20_000)], min(k, 2_000), seed=0, device=device,
                   compute_radius=False)
    seconds: list[float] = []
    for seed in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = greedy_coreset(x, k, seed=seed, device=device, compute_radius=False)
        seconds.append(time.perf_counter() - start)
        assert np.unique(result.indices).size == k
        logger.info("seed %d: %.2f s on %s", seed, seconds[-1], device)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return [[f"greedy_coreset ({runs} runs, selection only)", name, _spread(seconds),
             round(peak_rss_mib())]]


GPU_HEADER = ["method", "device", "seconds: median (min-max)", "peak RSS of the process (MiB)"]

LARGE_HEADER = ["method", "projection", "seconds: median (min-max)", "coverage radius",
                "peak RSS of its process (MiB)", "speed-up vs anomalib"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny Gaussian and clustered inputs, one run (seconds)")
    parser.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
    parser.add_argument("--runs", type=int, default=3, help="runs per side and setting (>= 1)")
    parser.add_argument("--skip-large", action="store_true", help="only case A")
    parser.add_argument("--skip-matrix", action="store_true", help="only case B")
    parser.add_argument("--large-anomalib", action="store_true",
                        help="also run anomalib once at 156,800 x 1024 (about 25 minutes)")
    parser.add_argument("--no-anomalib", action="store_true", help="ours only")
    parser.add_argument("--ours-dim", type=int, default=128,
                        help="greedy_coreset's projection_dim (its default: 128)")
    parser.add_argument("--ours-projection", default=OURS_PROJECTION,
                        choices=["auto", "pca", "pca_jl", "gaussian"],
                        help="greedy_coreset's projection (its default: auto)")
    parser.add_argument("--allocators", nargs="+", default=[name for name, _ in ALLOCATORS],
                        choices=[name for name, _ in ALLOCATORS], metavar="SETTING",
                        help="allocator settings of case A (default: all three)")
    parser.add_argument("--cap-gib", type=float, default=DEFAULT_CAP_GIB,
                        help="address space a worker may add after its imports, GiB")
    parser.add_argument("--gpu-large", action="store_true",
                        help="only case C: 1,000,000 x 1024 -> 100,000 on --device")
    parser.add_argument("--device", default="cuda", help="device of case C (default: cuda)")
    parser.add_argument("--worker", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.worker:
        _worker(args.worker)
        return 0
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    with_anomalib = not args.no_anomalib and _anomalib_installed()
    if not with_anomalib and not args.no_anomalib:
        logger.warning("anomalib is not installed (pip install '.[bench]'): ours only")
    runs = 1 if args.quick else args.runs
    if args.gpu_large:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error("--gpu-large runs on CUDA: torch sees no CUDA device (--device cpu "
                         "runs the same case on the CPU)")
        c_n, c_dim, c_k = (20_000, 64, 2_000) if args.quick else (1_000_000, 1_024, 100_000)
        append_results(
            f"Coreset speed on {args.device}: {c_n:,} x {c_dim} -> {c_k:,} (clustered ReLU)",
            markdown_table(GPU_HEADER, gpu_large_rows(c_n, c_dim, c_k, runs, args.device)),
            "greedy_coreset(device=...), default projection (fitted and applied on the CPU), "
            "compute_radius=False: selection time only. Target on a GPU: <= 15 s.",
            append=args.record,
        )
        return 0
    if args.quick:
        a_rows, a_k, images, size = 600, 60, 0, 64
        b_n, b_dim, b_k = 4_000, 64, 400
    else:
        a_rows, a_k, images, size = 20_000, 2_000, 30, 224
        b_n, b_dim, b_k = 156_800, 1_024, 15_680
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_matrix:
            inputs: list[tuple[str, Path]] = []
            if not args.quick:  # the quick mode skips the WRN-50 extraction
                dataset = _dataset(Path(tmp) / "data", images)
                real_path = Path(tmp) / "real.npy"
                np.save(real_path, anomalib_style_embeddings(dataset, a_rows, size))
                inputs.append(("PatchCore embeddings", real_path))
            gauss_path = Path(tmp) / "gauss.npy"
            gauss = np.random.default_rng(0).standard_normal((a_rows, 1536), dtype=np.float32)
            np.save(gauss_path, gauss)
            del gauss
            inputs.append(("Gaussian", gauss_path))
            rows: list[list[object]] = []
            for name, path in inputs:
                rows += matrix_rows(
                    name, {"npy": str(path)}, a_k, runs, args.cap_gib, with_anomalib,
                    args.ours_dim, ours_projection=args.ours_projection,
                    allocators=[a for a in ALLOCATORS if a[0] in args.allocators],
                )[0]
            append_results(
                f"Coreset speed, allocator matrix: {a_rows:,} x 1536 -> {a_k:,} vs anomalib "
                "KCenterGreedy",
                markdown_table(MATRIX_HEADER, rows),
                f"{runs} runs per side and setting; run r seeds torch and numpy (anomalib) and "
                "greedy_coreset(seed=r). Both sides run in the same child process per setting, "
                "alternating. Address space capped at the imports plus "
                f"{args.cap_gib:g} GiB (a runaway fails fast and is counted). Radius: exact "
                "coverage radius in the original space. Ours is timed with its exact radius.",
                append=args.record,
            )
        if not args.skip_large:
            spec: dict[str, object] = {"n": b_n, "dim": b_dim, "clusters": 200, "seed": 0}
            table = large_rows(spec, b_k, runs, args.cap_gib,
                               with_anomalib and (args.large_anomalib or args.quick),
                               args.ours_dim, ours_projection=args.ours_projection)
            append_results(
                f"Coreset speed: {b_n:,} x {b_dim} -> {b_k:,} (clustered ReLU, like one "
                "200-image category)",
                markdown_table(LARGE_HEADER, table),
                "Input: clustered_relu(seed 0, 200 clusters). Each side in its own child process "
                "(glibc default allocator), so the peak RSS is its own (it includes the input, "
                f"{b_n * b_dim * 4 / 2**20:.0f} MiB, and the imports). anomalib runs once at this "
                "size, only with --large-anomalib (about 25 minutes on 2 idle cores).",
                append=args.record,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
