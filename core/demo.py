"""The federation simulated in one process: ``python3 dev.py demo --in-process``.

(``python3 dev.py demo`` runs the same job on the real system: fedclient.demo.)

1. Generates the synthetic inspection dataset (AutoVI layout: several part categories with
   scratches, spots and missing pieces, exact per-defect masks).
2. Splits the normal training images across factory sites, one part category per site, as
   federated sites would hold them; images never leave their site.
3. Federated PatchCore: each site extracts patch features and selects a local coreset; the
   coresets travel as compressed wire messages (fp16 + zstd); the server selects the global bank
   incrementally and sends it back; a second round uploads only patches the bank covers badly.
4. Every site scores the test images with the global bank; prints image AUROC, pixel AUROC,
   AU-PRO and AU-sPRO next to a centralised PatchCore (all images in one place, same bank size),
   the bytes each round moved and the coverage certificate.

Runs on CPU in about 15 seconds with a small random-weight backbone (no network needed); pass
``--backbone wide_resnet50_2 --pretrained`` (or ``--weights FILE``) for real ImageNet features.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from core.data import (
    AutoVIDataset,
    CategoryPartitioner,
    DatasetError,
    generate_synthetic_dataset,
)
from core.evaluation import EvaluationResult, evaluate
from core.features import FeatureConfig, WeightsUnavailableError
from core.federated import FederatedPatchCore
from core.patchcore import PatchCore, PatchCoreConfig
from core.preprocess import ImageTransform
from core.progress import set_progress

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 dev.py demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="your dataset folder (AutoVI layout); it must exist. Default: a synthetic dataset "
        "generated in a temporary folder",
    )
    parser.add_argument(
        "--generate",
        action="store_true",
        help="generate the synthetic dataset in --data (which must be missing or empty) and "
        "keep it there",
    )
    parser.add_argument("--backbone", default="resnet18", help="timm backbone (default resnet18)")
    parser.add_argument(
        "--pretrained",
        action="store_true",
        help="load pretrained weights through timm (needs network or cache)",
    )
    parser.add_argument("--weights", default=None, help="local backbone weights file")
    parser.add_argument("--image-size", type=int, default=128, help="image side in px")
    parser.add_argument(
        "--coreset-percentage",
        type=float,
        default=0.25,
        help="each site's local coreset, fraction of its patches",
    )
    parser.add_argument(
        "--bank-ratio",
        type=float,
        default=0.1,
        help="global bank size as a fraction of all training patches",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="what the steps log to stderr (default INFO: each fit, round and selection)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they show only when stderr is a terminal anyway)",
    )
    return parser


@contextlib.contextmanager
def demo_dataset(
    data: Path | None, *, generate: bool, image_size: int, seed: int
) -> Iterator[Path]:
    """Yield the dataset folder the demo runs on; shared by this demo and the system demo.

    Synthetic data is generated only where asked: in a temporary folder (removed afterwards)
    without ``data``, in ``data`` with ``generate``. A ``data`` folder that is missing or empty
    is an error (DatasetError naming it): a typo must not turn into made-up metrics.
    """
    if data is not None and not generate:
        root = Path(data)
        if not root.is_dir() or not any(root.iterdir()):
            state = "does not exist" if not root.exists() else "is empty or not a folder"
            raise DatasetError(
                f"--data {root} {state}. Give an existing AutoVI-layout folder, or add "
                "--generate to write the synthetic demo dataset there, or omit --data"
            )
        logger.info("using the dataset in %s", root)
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-demo-") as tmp:
        root = Path(data) if data is not None else Path(tmp) / "data"
        if data is not None and root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise DatasetError(
                f"--generate: {root} is not an empty folder; drop --generate to use the data "
                "there, or name a new folder"
            )
        logger.info("generating the synthetic demo dataset in %s", root)
        generate_synthetic_dataset(root, image_size=image_size, seed=seed, layout="autovi")
        yield root


def run(args: argparse.Namespace) -> dict[str, EvaluationResult]:
    """Run the demo on :func:`demo_dataset`'s folder."""
    with demo_dataset(
        args.data, generate=args.generate, image_size=args.image_size, seed=args.seed
    ) as root:
        return _run_on(root, args)


def _run_on(root: Path, args: argparse.Namespace) -> dict[str, EvaluationResult]:
    features = FeatureConfig(
        backbone=args.backbone,
        pretrained=args.pretrained,
        weights=args.weights,
        transform=ImageTransform(resize=args.image_size, crop=None),
    )
    train = AutoVIDataset(root, split="train")
    test = AutoVIDataset(root, split="test")
    sites = CategoryPartitioner(num_clients=len(train.categories)).partition(train)

    # Patches per image follow from the backbone's first-layer stride (8 for ResNet layer2).
    grid = args.image_size // 8
    bank_size = max(1, round(args.bank_ratio * len(train) * grid * grid))

    start = time.perf_counter()
    central = PatchCore(
        PatchCoreConfig(features=features, coreset_size=bank_size, seed=args.seed)
    ).fit(train)
    central_result = evaluate(central.predict(test), test, features.transform)
    central_seconds = time.perf_counter() - start

    start = time.perf_counter()
    federated = FederatedPatchCore(
        num_clients=len(sites),
        backbone=features,
        global_bank_size=bank_size,
        coreset_percentage=args.coreset_percentage,
        seed=args.seed,
    )
    federated.setup_clients(sites)
    federated.train(num_rounds=args.rounds)
    federated_result = evaluate(federated.predict(test), test, features.transform)
    federated_seconds = time.perf_counter() - start

    _print_report(
        args,
        sites,
        federated,
        central_result,
        federated_result,
        central_seconds,
        federated_seconds,
        bank_size,
        features,
    )
    return {"centralised": central_result, "federated": federated_result}


def _print_report(
    args: argparse.Namespace,
    sites: list,  # type: ignore[type-arg]
    federated: FederatedPatchCore,
    central: EvaluationResult,
    fed: EvaluationResult,
    central_seconds: float,
    federated_seconds: float,
    bank_size: int,
    features: FeatureConfig,
) -> None:
    weights = "pretrained" if (args.pretrained or args.weights) else "RANDOM weights"
    print(
        f"\nFedPatchCore demo: {len(sites)} sites, {args.backbone} ({weights}), "
        f"{args.image_size} px, D={features.target_embed_dim}, global bank "
        f"{federated.global_bank.shape[0]} rows (asked for {bank_size})"
    )
    for client in federated.clients:
        categories = ",".join(client.dataset.categories)  # type: ignore[attr-defined]
        print(
            f"  site {client.site_id}: {client.data_size:3d} images of {categories:<10} "
            f"local coreset {client.get_coreset().shape[0]:5d} rows, r_i = "
            f"{client.coverage_radius:.3f}"
        )

    print("\nCommunication (serialized wire messages, fp16 + zstd):")
    print(
        f"  {'round':>5} {'rows up':>8} {'bytes up':>10} {'raw fp32':>10} {'ratio':>6} "
        f"{'bytes down':>11} {'certificate':>11}"
    )
    dim = features.target_embed_dim
    for report in federated.reports:
        rows = sum(report.rows_up.values())
        raw = rows * dim * 4
        ratio = f"{report.total_bytes_up / raw:.3f}" if raw else "-"
        print(
            f"  {report.round:>5} {rows:>8} {report.total_bytes_up:>10} {raw:>10} {ratio:>6} "
            f"{report.total_bytes_down:>11} {report.certificate:>11.3f}"
        )
    last = federated.reports[-1]
    print(
        f"  certificate = max_i r_i ({last.max_site_radius:.3f}) + r_S "
        f"({last.server_radius:.3f}): every training patch of every site lies within it "
        "of the global bank"
    )

    print("\nScores on the whole test set:")
    header = (
        f"  {'model':<12} {'img AUROC':>9} {'pix AUROC':>9} {'AU-PRO':>7} "
        f"{'AU-sPRO@0.3':>11} {'seconds':>8}"
    )
    print(header)
    for name, result, seconds in (
        ("centralised", central, central_seconds),
        ("federated", fed, federated_seconds),
    ):
        spro = result.au_spro.get(0.3)
        print(
            f"  {name:<12} {_fmt(result.image_auroc, 9)} {_fmt(result.pixel_auroc, 9)} "
            f"{_fmt(result.au_pro, 7)} {_fmt(spro, 11)} {seconds:>8.1f}"
        )


def _fmt(value: float | None, width: int) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'n/a':>{width}}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generate and args.data is None:
        parser.error("--generate needs --data DIR (without --data the demo uses a temp folder)")
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs CPU probing at INFO
    if args.no_progress:
        set_progress(False)
    try:
        with logging_redirect_tqdm():  # log lines print above the bars instead of through them
            run(args)
    except WeightsUnavailableError as exc:
        print(f"demo: error: {exc.problem}. Run the demo without --pretrained (random weights, "
              f"no network needed), or give --weights FILE (a local state dict of "
              f"{exc.backbone})", file=sys.stderr)
        return 2
    except DatasetError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
