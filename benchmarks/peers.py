"""Peer comparisons in one run, each a ratio measured side by side.

* ``flower``: the same federation's arrays moved by Flower's own transport (flwr 1.42,
  ``ArrayRecord``s, which flwr ships uncompressed) against ours (fedserver + fedclient sessions,
  the server's codec). The Flower side runs in its OWN virtual environment, flwr and numpy
  only, so it shares no code or transport setting with ours
  (``--flwr-venv``, created on first use with ``pip install flwr==1.42.0 numpy``): its
  deployment engine (flower-superlink, one flower-supernode per site, ``flwr run`` of the app in
  benchmarks/flower_app, which imports only flwr and numpy and moves the .npy arrays ours
  wrote). Bytes: one CountingProxy between the SuperNodes and the SuperLink for Flower, between
  the sites and fedserver for ours (:func:`run_flower_round` says what is and is not counted).
* ``anomalib``: single-site PatchCore (ours) against anomalib 2.7's ``PatchcoreModel`` on the
  same images with the SAME backbone weights (ours is built seeded with random weights,
  pretrained=False; every tensor of its state dict is copied into anomalib's backbone, and the
  copy is checked), both fitting with coreset ratio 0.1 and scoring with 9-neighbour
  reweighting: image and pixel AUROC (the project's evaluation code for both) and end-to-end fit
  time (image loading, features, coreset) in one process, same torch threads, alternating.
  A third row, anomalib's model with OUR embedding in place of its own (its coreset, its
  scoring), separates the embedding's share of any gap from the coreset's and scoring's.
* ``coreset``: coreset selection against anomalib's KCenterGreedy through
  benchmarks.coreset_speed's worker (both sides in one child process, alternating, seeded).

Run: ``python -m benchmarks.peers [--parts flower anomalib coreset] [--record]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.common import random_feature_config
from benchmarks.report import append_results, markdown_table
from core.data import AnomalyDataset, AutoVIDataset
from core.data.photos import PHOTO_CATEGORIES, generate_photo_dataset
from core.evaluation import evaluate
from core.features import FeatureConfig, iterate_batches
from core.patchcore import PatchCore, PatchCoreConfig, Predictions

logger = logging.getLogger(__name__)

__all__ = ["build_parser", "copy_backbone_weights", "main"]

PARTS = ("flower", "anomalib", "coreset")
CORESET_RATIO = 0.1
NEIGHBORS = 9


class WeightCopyError(ValueError):
    """The two backbones' state dicts do not have the same tensors (names and shapes)."""


def copy_backbone_weights(source: nn.Module, target: nn.Module) -> int:
    """Copy every tensor of ``source``'s state dict into ``target``'s, by name; returns how many.

    Both must be the same timm architecture (same names and shapes, buffers included: batch-norm
    running statistics decide eval-mode features). Raises WeightCopyError naming the first
    difference instead of copying part of them.
    """
    src, dst = source.state_dict(), target.state_dict()
    if set(src) != set(dst):
        only_src = sorted(set(src) - set(dst))[:3]
        only_dst = sorted(set(dst) - set(src))[:3]
        raise WeightCopyError(
            f"backbones differ: only in source {only_src}, only in target {only_dst}"
        )
    for name, tensor in src.items():
        if dst[name].shape != tensor.shape or dst[name].dtype != tensor.dtype:
            raise WeightCopyError(
                f"tensor {name}: source {tuple(tensor.shape)} {tensor.dtype}, target "
                f"{tuple(dst[name].shape)} {dst[name].dtype}"
            )
    with torch.no_grad():
        for name, tensor in src.items():
            dst[name].copy_(tensor)
    return len(src)


def anomalib_model(features: FeatureConfig, ours: PatchCore) -> nn.Module:
    """anomalib's PatchcoreModel on ``features``' backbone and layers, 9 neighbours, with ours'
    backbone weights copied in (the copy is checked tensor by tensor)."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=list(features.layers), backbone=features.backbone,
                           pre_trained=False, num_neighbors=NEIGHBORS)
    copied = copy_backbone_weights(ours.extractor.backbone,
                                   model.feature_extractor.feature_extractor)
    logger.info("copied %d backbone tensors into anomalib's %s", copied, features.backbone)
    return model


class _OurEmbedding(nn.Module):
    """Our extractor as an anomalib feature extractor: one "layer" holding our embedding map
    [B, D, h, w], so anomalib's model runs its coreset and scoring on our features."""

    def __init__(self, ours: PatchCore) -> None:
        super().__init__()
        self.extractor = ours.extractor

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features, (h, w) = self.extractor(images)
        b, _, d = features.shape
        return {"ours": features.transpose(1, 2).reshape(b, d, h, w)}


def anomalib_with_our_embedding(features: FeatureConfig, ours: PatchCore) -> nn.Module:
    """anomalib's PatchcoreModel whose embedding is ours (1024-d, the original implementation's
    per-layer 3x3 pooling to 1024 and aggregation to 1024); its coreset and scoring unchanged."""
    model = anomalib_model(features, ours)
    model.feature_extractor = _OurEmbedding(ours)
    model.feature_pooler = nn.Identity()  # our embedding already pooled each 3x3 neighbourhood
    model.layers = ["ours"]
    return model


@dataclass(frozen=True)
class SideResult:
    """One method on one category: fit seconds per repeat and its test metrics."""

    fit_s: tuple[float, ...]
    image_auroc: float | None
    pixel_auroc: float | None
    embedding_dim: int


def _fit_anomalib(model: nn.Module, train: AnomalyDataset, features: FeatureConfig,
                  batch_size: int, seed: int) -> float:
    start = time.perf_counter()
    model.train()  # anomalib stores embeddings in train mode (its extractor stays in eval)
    model.memory_bank = torch.empty(0)
    model.embedding_store.clear()
    for _, images in iterate_batches(train.load_image, range(len(train)), features.transform,
                                     batch_size):
        model(images)
    # KCenterGreedy draws its start from torch's and its projection from numpy's global RNGs.
    torch.manual_seed(seed)
    np.random.seed(seed)  # anomalib reads numpy's legacy global generator
    model.subsample_embedding(CORESET_RATIO)
    return time.perf_counter() - start


def _predict_anomalib(model: nn.Module, test: AnomalyDataset, features: FeatureConfig,
                      batch_size: int) -> Predictions:
    model.eval()
    scores, maps = [], []
    with torch.no_grad():
        for _, images in iterate_batches(test.load_image, range(len(test)), features.transform,
                                         batch_size):
            out = model(images)
            scores.append(out.pred_score.reshape(-1).numpy())
            maps.append(out.anomaly_map[:, 0].numpy())
    grid = (0, 0)  # not used by the evaluation
    return Predictions(np.concatenate(scores).astype(np.float32),
                       np.concatenate(maps).astype(np.float32), grid)


def _metrics(predictions: Predictions, test: AnomalyDataset, features: FeatureConfig
             ) -> tuple[float | None, float | None]:
    result = evaluate(predictions, test, features.transform, resolution="model", with_spro=False)
    return result.image_auroc, result.pixel_auroc


def compare_anomalib(
    train: AnomalyDataset, test: AnomalyDataset, features: FeatureConfig, *, repeats: int,
    batch_size: int = 8, seed: int = 0,
) -> dict[str, SideResult]:
    """Ours, anomalib, and anomalib with our embedding on one category (see module doc)."""
    config = PatchCoreConfig(features=features, coreset_ratio=CORESET_RATIO,
                             num_neighbors=NEIGHBORS, batch_size=batch_size, seed=seed,
                             device="cpu", knn_backend="torch")
    ours = PatchCore(config)
    theirs = anomalib_model(features, ours)
    mixed = anomalib_with_our_embedding(features, ours)
    times: dict[str, list[float]] = {"ours": [], "anomalib": []}
    for _ in range(repeats):  # alternate, so load changes hit both sides alike
        start = time.perf_counter()
        ours.fit(train)
        times["ours"].append(time.perf_counter() - start)
        times["anomalib"].append(_fit_anomalib(theirs, train, features, batch_size, seed))
    mixed_s = _fit_anomalib(mixed, train, features, batch_size, seed)
    results = {
        "ours": SideResult(tuple(times["ours"]), *_metrics(ours.predict(test), test, features),
                           embedding_dim=ours.memory_bank.shape[1]),
        "anomalib": SideResult(
            tuple(times["anomalib"]),
            *_metrics(_predict_anomalib(theirs, test, features, batch_size), test, features),
            embedding_dim=int(theirs.memory_bank.shape[1]),
        ),
        "anomalib + our embedding": SideResult(
            (mixed_s,),
            *_metrics(_predict_anomalib(mixed, test, features, batch_size), test, features),
            embedding_dim=int(mixed.memory_bank.shape[1]),
        ),
    }
    return results


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _spread(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def run_anomalib_part(args: argparse.Namespace, workdir: Path) -> None:
    categories = tuple(args.categories)
    generate_photo_dataset(workdir / "photos", categories, args.num_train, args.num_test,
                           args.image_size)
    train_all = AutoVIDataset(workdir / "photos", split="train")
    test_all = AutoVIDataset(workdir / "photos", split="test")
    features = random_feature_config(args.backbone, args.image_size, init_seed=0)
    rows: list[list[object]] = []
    gaps: list[str] = []
    totals: dict[str, list[float]] = {"ours": [0.0] * args.repeats,
                                      "anomalib": [0.0] * args.repeats}
    for category in categories:
        train = train_all.subset([i for i, s in enumerate(train_all) if s.category == category])
        test = test_all.subset([i for i, s in enumerate(test_all) if s.category == category])
        results = compare_anomalib(train, test, features, repeats=args.repeats)
        for side in ("ours", "anomalib"):
            for r, seconds in enumerate(results[side].fit_s):
                totals[side][r] += seconds
        for name, result in results.items():
            rows.append([category, name, result.embedding_dim, _fmt(result.image_auroc),
                         _fmt(result.pixel_auroc), _spread(result.fit_s)])
        ours, theirs = results["ours"], results["anomalib"]
        for metric in ("image_auroc", "pixel_auroc"):
            a, b = getattr(ours, metric), getattr(theirs, metric)
            if a is not None and b is not None and abs(a - b) > 0.01:
                gaps.append(f"{category} {metric.replace('_', ' ')}: ours {a:.4f} vs anomalib "
                            f"{b:.4f} (anomalib with our embedding: "
                            f"{_fmt(getattr(results['anomalib + our embedding'], metric))})")
    speed = statistics.median(totals["anomalib"]) / statistics.median(totals["ours"])
    notes = (
        f"Photos setting (core.data.photos: {', '.join(categories)}), {args.num_train} train + "
        f"{args.num_test} test images per category, {args.image_size} px, {args.backbone} random "
        "init (seed 0) copied tensor by tensor into anomalib's backbone. Both: coreset ratio "
        f"{CORESET_RATIO}, {NEIGHBORS}-neighbour image-score reweighting, Gaussian sigma 4 maps; "
        "metrics by the project's evaluation (maps at the model input size) for every row. Fit "
        "time: image loading + features + coreset, median (min-max) of "
        f"{args.repeats} alternating runs, one process, torch threads {torch.get_num_threads()}; "
        f"all categories: ours {_spread(totals['ours'])} s, anomalib "
        f"{_spread(totals['anomalib'])} s, anomalib / ours = {speed:.2f}x. "
        "Embeddings: ours follows the original implementation (each layer's 3x3 patches pooled "
        "to 1024, then the layers aggregated to 1024); anomalib concatenates 3x3-averaged "
        "layers. The 'anomalib + our embedding' row is anomalib's model (its KCenterGreedy and "
        "scoring) on our embedding. "
        + ("Gaps > 0.01 (ours vs anomalib): " + "; ".join(gaps) + "." if gaps
           else "No image or pixel AUROC gap > 0.01 between ours and anomalib.")
    )
    append_results(
        "Peers: single-site PatchCore vs anomalib 2.7 PatchcoreModel, same backbone weights",
        markdown_table(["category", "method", "embedding D", "image AUROC", "pixel AUROC",
                        "fit s: median (min-max)"], rows),
        notes, append=args.record,
    )


def run_coreset_part(args: argparse.Namespace) -> None:
    from benchmarks.coreset_speed import DEFAULT_CAP_GIB, Trial, run_worker

    n, dim, k = args.coreset_rows, 1536, args.coreset_rows // 10
    spec: dict[str, object] = {"n": n, "dim": dim, "clusters": 200, "seed": 0}
    trials = [Trial(side, seed) for seed in range(args.repeats) for side in ("anomalib", "ours")]
    outcomes = run_worker(spec, k, trials, {}, cap_gib=DEFAULT_CAP_GIB)
    rows = []
    medians = {}
    for side, label in (("anomalib", "anomalib 2.7 KCenterGreedy"),
                        ("ours", "core.coreset.greedy_coreset (incl. exact radius)")):
        mine = [o for o in outcomes if o.side == side and o.status == "ok"]
        runaways = sum(1 for o in outcomes if o.side == side and o.status != "ok")
        seconds = [o.seconds for o in mine]
        radii = [o.radius for o in mine if o.radius is not None]
        medians[side] = (statistics.median(seconds) if seconds else float("nan"),
                         statistics.median(radii) if radii else float("nan"))
        rows.append([label, mine[0].projection_dim if mine else "-", _spread(seconds) if seconds
                     else "-", f"{medians[side][1]:.4f}", runaways])
    notes = (
        f"clustered_relu({n:,} x {dim}, 200 clusters, seed 0) -> {k:,}; "
        f"{args.repeats} runs per side alternating in one child process "
        "(benchmarks.coreset_speed.run_worker, glibc default allocator, run r seeds both sides "
        f"with r). Speed-up anomalib / ours (medians): "
        f"{medians['anomalib'][0] / medians['ours'][0]:.1f}x; coverage radius ours / anomalib: "
        f"{medians['ours'][1] / medians['anomalib'][1]:.3f}."
    )
    append_results(
        f"Peers: coreset selection vs anomalib KCenterGreedy, {n:,} x {dim} -> {k:,}",
        markdown_table(["method", "proj. dim", "seconds: median (min-max)",
                        "coverage radius (median)", "runaways"], rows),
        notes, append=args.record,
    )


# -- Flower ------------------------------------------------------------------------------------

FLWR_VERSION = "1.42.0"
#: A checkout-local environment (git-ignored) holding flwr and numpy only.
DEFAULT_FLWR_VENV = Path(__file__).resolve().parents[1] / ".venv-flwr-bench"
FLOWER_APP = Path(__file__).resolve().parent / "flower_app"
_APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedbench-flower"
version = "1.0.0"
dependencies = ["flwr=={version}", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedpatchcore"

[tool.flwr.app.components]
serverapp = "flower_app.server_app:app"
clientapp = "flower_app.client_app:app"

[tool.flwr.app.config]
sites = 1
data-dir = ""
out = ""
"""


class FlowerSetupError(RuntimeError):
    """The Flower virtual environment could not be created or Flower did not run the round."""


def ensure_flwr_venv(venv: Path) -> Path:
    """The venv's python with flwr FLWR_VERSION installed; creates the venv when missing
    (``python -m venv`` + ``pip install flwr==FLWR_VERSION numpy`` from the package index).
    Never touches the project's own environment."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import flwr, numpy; print(flwr.__version__)"]
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == FLWR_VERSION:
            return python
    logger.warning("creating the Flower environment %s (flwr==%s, numpy)", venv, FLWR_VERSION)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"flwr=={FLWR_VERSION}", "numpy"],
        capture_output=True, text=True,
    )
    if installed.returncode != 0:
        raise FlowerSetupError(f"pip install flwr=={FLWR_VERSION} into {venv} failed: "
                               f"{installed.stderr.strip().splitlines()[-1:]}")
    found = subprocess.run(probe, capture_output=True, text=True, check=True)
    if found.stdout.strip() != FLWR_VERSION:
        raise FlowerSetupError(f"{venv} has flwr {found.stdout.strip()}, need {FLWR_VERSION}")
    return python


def _free_port() -> int:
    """A port the kernel hands out now (Flower's processes take a port number, not 0)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerSetupError(f"{what} exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise FlowerSetupError(f"{what} did not listen on port {port} within {timeout_s:.0f} s")


@dataclass(frozen=True)
class FlowerRound:
    """One round over Flower: bytes per SuperNode connection through the counting proxy (up:
    SuperNode -> SuperLink), and the ServerApp's timings (seconds)."""

    up: tuple[int, ...]
    down: tuple[int, ...]
    connections: int
    upload_s: float
    download_s: float
    round_s: float
    wall_s: float


def run_flower_round(python: Path, data: Path, sites: int, workdir: Path,
                     timeout_s: float = 900.0) -> FlowerRound:
    """SuperLink + ``sites`` SuperNodes (flwr's deployment engine, insecure, loopback) and one
    ``flwr run`` of benchmarks/flower_app on ``data`` (site-<i>.npy, bank.npy). The SuperNodes
    reach the SuperLink through a CountingProxy, so every byte of the Fleet API (all requests,
    HTTP framing, heartbeats) is counted; the ServerApp and the CLI talk to the SuperLink
    directly (they are the server side)."""
    from benchmarks.netcount import CountingProxy

    bin_dir = python.parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(workdir / "flwr-home"), "PYTHONPATH": ""}
    link_port = _free_port()
    (workdir / "flwr-home").mkdir(parents=True, exist_ok=True)
    (workdir / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link_port}"'
        "\ninsecure = true\n"
    )
    app = workdir / "app"
    shutil.copytree(FLOWER_APP, app / "flower_app",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (app / "pyproject.toml").write_text(_APP_TOML.format(version=FLWR_VERSION))
    out = workdir / "flower-result.json"
    processes: list[subprocess.Popen[bytes]] = []
    logs = []
    proxy: CountingProxy | None = None

    def start(command: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed below)
        logs.append(log)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=workdir)
        processes.append(process)
        return process

    try:
        link = start([str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                      "--port", str(link_port)], "superlink")
        _wait_port(link_port, link, "flower-superlink", 120)
        proxy = CountingProxy(("127.0.0.1", link_port), drain_s=0.0)
        for site in range(sites):
            node_port = _free_port()
            start([str(bin_dir / "flower-supernode"), "--insecure", "--superlink",
                   f"127.0.0.1:{proxy.port}", "--host", "127.0.0.1", "--port", str(node_port),
                   "--node-config", f"partition-id={site}"], f"supernode-{site}")
        begin = time.perf_counter()
        run = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app), "bench", "--stream", "--run-config",
             f'sites={sites} data-dir="{data}" out="{out}"'],
            env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout_s,
        )
        (workdir / "flwr-run.log").write_text(run.stdout + run.stderr)
        deadline = time.monotonic() + timeout_s
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        wall = time.perf_counter() - begin
        if not out.exists():
            raise FlowerSetupError(
                f"the Flower run wrote no result (flwr run exit {run.returncode}); logs in "
                f"{workdir}: {(run.stdout + run.stderr).strip()[-500:]}"
            )
        time.sleep(1.0)  # the last acknowledgements and heartbeats settle
        result = json.loads(out.read_text())
    finally:
        if proxy is not None:
            proxy.close()
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    assert proxy is not None
    if len(result["bank_rows"]) != sites or len(set(result["bank_rows"])) != 1:
        raise FlowerSetupError(f"sites got different banks over Flower: {result['bank_rows']}")
    counts = proxy.per_connection()
    return FlowerRound(tuple(up for up, _ in counts), tuple(down for _, down in counts),
                       len(counts), result["upload_s"],
                       result["download_s"], result["round_s"], wall)


def run_flower_part(args: argparse.Namespace, workdir: Path) -> None:
    from benchmarks.scale import RunResult, run_round

    python = ensure_flwr_venv(args.flwr_venv)
    sites, bank, codecs = args.flower_sites, args.flower_bank, list(args.flower_codecs)
    ours_runs: dict[str, list[RunResult]] = {codec: [] for codec in codecs}
    flower_runs = []
    for repeat in range(args.repeats):  # alternate, so load changes hit both sides alike
        data = workdir / f"flower-data-{repeat}"
        for codec in codecs:
            run_dir = workdir / f"ours-{codec}-{repeat}"
            run_dir.mkdir()
            ours_runs[codec].append(run_round(
                sites, bank, run_dir, proxy=True, codec=codec,
                keep_arrays=data if codec == codecs[0] else None,
            ))
        flower_dir = workdir / f"flower-{repeat}"
        flower_dir.mkdir()
        flower_runs.append(run_flower_round(python, data, sites, flower_dir))
        logger.warning("repeat %d: ours (%s) round %.2f s, Flower round %.2f s", repeat + 1,
                       codecs[0], ours_runs[codecs[0]][-1].round_s,
                       flower_runs[-1].round_s)
    first = ours_runs[codecs[0]][0]
    rows_per_site = first.rows_per_site
    raw_up = rows_per_site * 1024 * 4 * sites
    raw_down = bank * 1024 * 4 * sites
    f_up = statistics.median([sum(r.up) for r in flower_runs])
    f_down = statistics.median([sum(r.down) for r in flower_runs])
    f_s = statistics.median([r.round_s for r in flower_runs])

    def row(label: str, up: float, down: float, seconds: Sequence[float]) -> list[object]:
        return [label, f"{up / 2**20:.2f}", f"{up / raw_up:.3f}", f"{down / 2**20:.2f}",
                f"{down / raw_down:.3f}", f"{(up + down) / 2**20:.2f}",
                f"{(f_up + f_down) / (up + down):.2f}x", _spread(seconds)]

    rows = [row(f"Flower {FLWR_VERSION} deployment engine, ArrayRecord (float32)", f_up, f_down,
                [r.round_s for r in flower_runs])]
    verdicts = []
    for codec in codecs:
        runs = ours_runs[codec]
        up = statistics.median([sum(r.proxy_up) for r in runs])
        down = statistics.median([sum(r.proxy_down) for r in runs])
        seconds = [r.round_s for r in runs]
        rows.append(row(f"ours: fedserver + SiteSession, codec {codec}", up, down, seconds))
        ratio = (f_up + f_down) / (up + down)
        verdicts.append(
            f"{codec}: up {f_up / up:.2f}x, down {f_down / down:.2f}x, both {ratio:.2f}x fewer "
            f"bytes (target >= 5x: {'met' if ratio >= 5 else 'MISSED'}), Flower's round time "
            f"{f_s / statistics.median(seconds):.1f}x ours"
        )
    notes = (
        f"{sites} sites, each uploading {rows_per_site:,} rows of D = 1024 "
        f"(raw fp32 {raw_up / sites / 2**20:.2f} MiB per site); global bank {bank:,} rows "
        f"downloaded by every site (raw {raw_down / sites / 2**20:.2f} MiB). Both sides move the "
        "same arrays (ours writes them to .npy for Flower: each site's rows and the bank our "
        f"server selected with {codecs[0]}) and both are counted by the same CountingProxy (TCP "
        "payload both ways, every request, framing and heartbeat): ours between the "
        "SiteSessions and fedserver (it agrees with the kernel's per-connection counters), "
        "Flower between the SuperNodes and the SuperLink (its Fleet API; the ServerApp and the "
        "flwr CLI talk to the SuperLink directly and are not counted: they are server-side). "
        "Times: ours from all sites starting to upload to the last bank decoded; Flower the "
        "ServerApp's send_and_receive of the upload plus that of the bank (it includes "
        "Flower's pull intervals and ClientApp process starts), both through the proxy; "
        f"median (min-max) of {args.repeats} alternating runs. Flower runs in its own virtual "
        f"environment ({args.flwr_venv}; flwr {FLWR_VERSION} and numpy only). "
        "Flower / ours per codec: " + "; ".join(verdicts) + "."
    )
    append_results(
        f"Peers: Flower's transport vs ours, {sites} sites, bank {bank:,}",
        markdown_table(["transport", "up MiB (all sites)", "up / raw fp32", "down MiB (all sites)",
                        "down / raw fp32", "total MiB", "Flower bytes / these",
                        "round s: median (min-max)"], rows),
        notes, append=args.record,
    )

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="which comparisons (default all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (>= 1)")
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    anomalib = parser.add_argument_group("anomalib")
    anomalib.add_argument("--backbone", default="wide_resnet50_2",
                          help="timm backbone, random init (anomalib's default architecture)")
    anomalib.add_argument("--categories", nargs="+", default=list(PHOTO_CATEGORIES),
                          choices=PHOTO_CATEGORIES, help="photo categories")
    anomalib.add_argument("--num-train", type=int, default=30, help="train images per category")
    anomalib.add_argument("--num-test", type=int, default=40, help="test images per category")
    anomalib.add_argument("--image-size", type=int, default=96, help="image side = input, px")
    flower = parser.add_argument_group("flower")
    flower.add_argument("--flwr-venv", type=Path, default=DEFAULT_FLWR_VENV,
                        help=f"Flower's own virtual environment (created with flwr=={FLWR_VERSION} "
                        "and numpy when missing)")
    flower.add_argument("--flower-sites", type=int, default=4, help="sites (SuperNodes)")
    flower.add_argument("--flower-bank", type=int, default=4000,
                        help="global bank rows; each site uploads 2 x bank / sites rows")
    flower.add_argument("--flower-codecs", nargs="+", default=["fp16", "int8", "int4"],
                        choices=["fp16", "bf16", "int8", "int4", "lossless"],
                        help="server codecs ours runs with (Flower ships float32 as is); the "
                        "first one selects the bank both sides move")
    coreset = parser.add_argument_group("coreset")
    coreset.add_argument("--coreset-rows", type=int, default=10_000,
                         help="rows of D = 1536 selected down to a tenth (default 10,000)")
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.num_train < 1 or args.num_test < 2:
        parser.error("--num-train must be >= 1 and --num-test >= 2 (good and defective images)")
    if args.image_size < 32:
        parser.error(f"--image-size must be >= 32 px, got {args.image_size}")
    if args.flower_sites < 1 or args.flower_bank < 1:
        parser.error("--flower-sites and --flower-bank must be >= 1")
    if args.coreset_rows < 100:
        parser.error(f"--coreset-rows must be >= 100, got {args.coreset_rows}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's progress bars, per selection
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-peers-") as tmp:
        if "flower" in args.parts:
            run_flower_part(args, Path(tmp))
        if "anomalib" in args.parts:
            run_anomalib_part(args, Path(tmp))
        if "coreset" in args.parts:
            run_coreset_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
