"""The demo on the real system: ``python3 dev.py demo``.

1. Generates the synthetic inspection dataset (AutoVI layout, one part category per site).
2. ``fedserver init-config`` writes the server's config, hashed tokens and one token per site;
   the config pins the feature extractor, so every site computes the same features.
3. Starts one ``fedserver serve`` process on 127.0.0.1, port 0 (the kernel picks a free port
   and the server logs which: no probing for a free port, no race), and one ``fedclient run``
   process per site. Each site fits its local coreset, joins, streams its chunks, waits for the
   global bank, downloads it (round 2: only the change), scores its own test images and writes
   metrics.json, overlays and the bank into its output folder.
4. Round 2 is what a federation sees months later: one site's folder (the washer plant's) gets
   ``--variant-images`` images of a new product variant (the generator's "anodised" finish,
   defect-free), and every site runs ``fedclient run`` again with its ``--out`` folder. The
   variant site reads only its new images and uploads the rows that cover them; the others read
   none and upload nothing; every site downloads only the bank's change (fedclient.sitestate,
   core.federated.newdata). Each round is one ``fedclient run`` per site (``--max-rounds 1``).
5. Prints per-site metrics, bytes on the wire per round and direction (the serialized gRPC
   messages each site sent and received), round 2's rows and bytes per site against a full
   upload and download, and timings; then stops the server with SIGTERM.
6. Copies the HTML reports into ``--reports`` (default ``demo-reports/``): each site's
   ``report.html`` as ``site-N.html`` and the server's ``round-N.html`` / ``.json``; the demo
   prints where they are.

``--in-process`` runs the in-process simulation of ``core.demo`` instead (the spec's API, with a
centralised PatchCore beside it). The process helpers here (:class:`ServerProcess`,
:func:`start_site`) are what the end-to-end tests use too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.data import (
    SYNTHETIC_CATEGORIES,
    SYNTHETIC_VARIANTS,
    AutoVIDataset,
    DatasetError,
    generate_synthetic_dataset,
)
from core.demo import demo_dataset
from core.features import WeightsUnavailableError

logger = logging.getLogger(__name__)

__all__ = ["ServerProcess", "main", "start_site", "write_server_config"]

_PORT_LINE = re.compile(r"fedserver listening on port (\d+)")


class ServerProcess:
    """A ``fedserver serve`` child process bound to 127.0.0.1:0.

    The port is read from the server's own log line ("fedserver listening on port N"), which it
    writes after binding; stderr is copied to ``log_path`` by a thread (so the pipe never fills).
    """

    def __init__(
        self,
        config: Path,
        log_path: Path,
        *,
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        command = [sys.executable, "-m", "fedserver", "serve", "--config", str(config),
                   "--bind", "127.0.0.1:0", *extra_args]
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=self._log, text=True,
            env=env if env is not None else os.environ.copy(),
        )
        self._port: int | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        if not self._ready.wait(start_timeout_s) or self._port is None:
            self.stop()
            raise RuntimeError(
                f"fedserver did not report its port within {start_timeout_s:.0f} s "
                f"(exit code {self.process.poll()}); see {log_path}"
            )

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._log.write(line)
            self._log.flush()
            match = _PORT_LINE.search(line)
            if match and self._port is None:
                self._port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # the process ended; the waiter sees no port

    @property
    def port(self) -> int:
        assert self._port is not None
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (the server drains), wait; SIGKILL if it does not exit in ``timeout_s``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup (what a crash looks like)."""
        self.process.kill()
        self.process.wait()
        self._reader.join(5)
        self._log.close()


def write_server_config(
    directory: Path,
    sites: Sequence[str],
    *,
    global_bank_size: int,
    extractor: dict[str, object] | None,
    rounds: int = 1,
    codec: str = "fp16",
    max_chunk_bytes: int = 1 << 20,
    seed: int = 0,
    fsync: bool = True,
    expected_sites: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
) -> Path:
    """``fedserver init-config`` (tokens for ``sites``), then pin the round settings and the
    extractor in its server.toml (None: not pinned; ``expected_sites``: the sites a round waits
    for; default all). Returns the config path; site tokens are in
    ``directory/site-tokens/<site>.token``."""
    subprocess.run(
        [sys.executable, "-m", "fedserver", "init-config", "--sites", ",".join(sites),
         "--dir", str(directory), "--global-bank-size", str(global_bank_size)],
        check=True, capture_output=True, text=True,
        env=env if env is not None else os.environ.copy(),
    )
    config = directory / "server.toml"
    text = config.read_text(encoding="utf-8")
    for key, value in (("rounds", rounds), ("codec", f'"{codec}"'),
                       ("max_chunk_bytes", max_chunk_bytes), ("seed", seed),
                       ("device", '"cpu"'), ("fsync", "true" if fsync else "false")):
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if count != 1:
            raise RuntimeError(f"fedserver init-config wrote no '{key} = ' line to {config}")
    if expected_sites is not None:
        listed = ", ".join(json.dumps(site) for site in expected_sites)
        text, count = re.subn(r"(?m)^expected_sites = .*$", f"expected_sites = [{listed}]", text)
        if count != 1:
            raise RuntimeError(f"no 'expected_sites = ' line in {config}")
    lines = []
    if extractor is not None:
        lines = ["", "[server.extractor]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in extractor.items()]
    config.write_text(text + "\n".join(lines) + "\n", encoding="utf-8")
    return config


@dataclass(frozen=True)
class SiteProcess:
    """A running ``fedclient run`` and where it writes."""

    site_id: str
    process: subprocess.Popen[str]
    out_dir: Path
    log_path: Path


def start_site(
    address: str,
    site_id: str,
    token_file: Path,
    data: Path,
    out_dir: Path,
    *,
    categories: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    command_prefix: Sequence[str] = (),
) -> SiteProcess:
    """Start ``fedclient run`` for one site; its log goes to ``out_dir``.log.
    ``command_prefix``: run it under another command (benchmarks: ``ip netns exec NS``)."""
    log_path = out_dir.with_suffix(".log")
    command = [*command_prefix, sys.executable, "-m", "fedclient", "run", "--server", address,
               "--site-id", site_id, "--token-file", str(token_file), "--data", str(data), "--out",
               str(out_dir), "-v", *extra_args]
    if categories:
        command += ["--categories", *categories]
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, text=True,
            env=env if env is not None else os.environ.copy(),
        )
    return SiteProcess(site_id, process, out_dir, log_path)


def _client_env(num_sites: int) -> dict[str, str]:
    """Share the cores between the site processes instead of oversubscribing them."""
    env = os.environ.copy()
    threads = max(1, (os.cpu_count() or 1) // num_sites)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    return env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 dev.py demo", description=__doc__.split("\n\n")[0],
        epilog="Other arguments (with --in-process) go to the in-process demo.",
    )
    parser.add_argument("--in-process", action="store_true",
                        help="run the in-process simulation (core.demo) instead of processes")
    parser.add_argument("--data", type=Path, default=None,
                        help="your dataset folder (AutoVI layout), one site per object folder; "
                        "it must exist. Default: a synthetic dataset in a temporary folder")
    parser.add_argument("--generate", action="store_true",
                        help="generate the synthetic dataset in --data (which must be missing or "
                        "empty) and keep it there")
    parser.add_argument("--backbone", default="resnet18", help="timm backbone (default resnet18)")
    parser.add_argument("--pretrained", action="store_true",
                        help="pretrained weights through timm (needs network or cache)")
    parser.add_argument("--weights", default=None,
                        help="local backbone weights file every site loads (implies pretrained)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in px")
    parser.add_argument("--coreset-percentage", type=float, default=0.25,
                        help="each site's local coreset, fraction of its patches")
    parser.add_argument("--bank-ratio", type=float, default=0.1,
                        help="global bank size as a fraction of all training patches")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds; each is one fedclient run per site (default 2)")
    parser.add_argument("--variant-images", type=int, default=4,
                        help="images of a new product variant added to one site's folder "
                        "before round 2 (default 4; 0: round 2 brings no new data)")
    parser.add_argument("--variant", choices=SYNTHETIC_VARIANTS, default="anodised",
                        help="the variant's finish (default anodised: a strong change; bronze: "
                        "a mild one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the server state, site outputs and logs in this folder")
    parser.add_argument("--reports", type=Path, default=Path("demo-reports"),
                        help="copy the sites' and the server's HTML reports here (default "
                        "demo-reports/; replaced on each run)")
    return parser


def _check_weights(args: argparse.Namespace) -> None:
    """Before any process starts: the weights every site will load can be had (one line, not
    one traceback per site, when they cannot)."""
    from core.features import FeatureConfig, check_weights
    from core.preprocess import ImageTransform

    check_weights(FeatureConfig(
        args.backbone, pretrained=bool(args.pretrained or args.weights), weights=args.weights,
        transform=ImageTransform(resize=args.image_size, crop=None),
    ))


def run(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    _check_weights(args)
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-system-demo-") as tmp:
        work = args.keep if args.keep is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with demo_dataset(
            args.data, generate=args.generate, image_size=args.image_size, seed=args.seed
        ) as root:
            return _run_on(root, work, args)


def _run_on(
    root: Path,
    work: Path,
    args: argparse.Namespace,
    *,
    on_server: Callable[[ServerProcess], None] | None = None,
    between_rounds: Callable[[int, ServerProcess], None] | None = None,
) -> dict[str, dict[str, object]]:
    """Run the federation on ``root``'s objects (one site each) in ``work``; ``on_server`` is
    called once the server's port is known (benchmarks attach their byte counters there),
    ``between_rounds(n, server)`` before round n >= 2 starts (once round n-1's site processes
    ended; before the variant is added) and with n = rounds + 1 after the last round, while the
    server still runs (benchmarks keep a round's site model, download a bank)."""
    started = time.perf_counter()
    train = AutoVIDataset(root, split="train")
    categories = list(train.categories)
    sites = [f"site-{i + 1}" for i in range(len(categories))]
    grid = args.image_size // 8  # ResNet layer2 stride
    bank_size = max(1, round(args.bank_ratio * len(train) * grid * grid))
    extractor: dict[str, object] | None = {
        "backbone": args.backbone, "layers": ["layer2", "layer3"], "pretrained": args.pretrained,
        "pretrain_embed_dim": 1024, "target_embed_dim": 1024, "patch_size": 3,
        "resize": args.image_size, "crop": 0, "init_seed": 0,
    }
    # Each site names the pinned backbone and its weights too: a site checks its weights before
    # it contacts the server (fedclient.site.prepare_site).
    site_features = ["--coreset-percentage", str(args.coreset_percentage), "--seed", str(args.seed),
                     "--backbone", args.backbone,
                     "--pretrained" if args.pretrained else "--no-pretrained"]
    if args.weights:
        # A server-pinned pretrained extractor has timm's weights in its fingerprint; a weights
        # file has its content hash. So with a file nothing is pinned: every site passes the same
        # extractor flags and file, and the server holds the sites to the first one's fingerprint.
        extractor = None
        site_features += ["--image-size", str(args.image_size), "--weights", str(args.weights)]
    fed_dir = work / "fed"
    if fed_dir.exists():
        shutil.rmtree(fed_dir)
    config = write_server_config(
        fed_dir, sites, global_bank_size=bank_size, extractor=extractor, rounds=args.rounds,
        seed=args.seed,
    )
    # Each site's folder: the dataset itself, except the variant site's, a copy in ``work`` that
    # round 2 adds the variant's images to (the dataset is never written to).
    variant = _variant_site(sites, categories) if args.variant_images > 0 else None
    folders = {site: root for site in sites}
    if variant is not None and args.rounds >= 2:
        folders[variant[0]] = _copy_category(root, variant[1], work / f"data-{variant[0]}")
    server = ServerProcess(config, work / "fedserver.log")
    server_ready = time.perf_counter() - started
    if on_server is not None:
        on_server(server)
    env = _client_env(len(sites))
    runs: list[dict[str, dict[str, object]]] = []
    added: tuple[str, str, int] | None = None
    t0 = time.perf_counter()
    try:
        for number in range(1, args.rounds + 1):
            if number >= 2 and between_rounds is not None:
                between_rounds(number, server)
            if number == 2 and variant is not None:
                count = _add_variant(folders[variant[0]], variant[1], work / "variant", args)
                added = (variant[0], variant[1], count)
                print(f"round 2: {variant[0]}'s folder got {count} images of a new variant "
                      f"({variant[1]}, {args.variant} finish, defect-free); every site runs "
                      "fedclient again with its --out folder", flush=True)
            processes = [
                start_site(
                    server.address, site, fed_dir / "site-tokens" / f"{site}.token",
                    folders[site], work / f"out-{site}", categories=[category],
                    extra_args=[*site_features, "--max-rounds", "1"], env=env,
                )
                for site, category in zip(sites, categories, strict=True)
            ]
            if number == 1:
                logs = (f"their logs: {work}/out-<site>.log" if args.keep
                        else "--keep DIR keeps their logs")
                print(f"fedserver on {server.address}; round 1: {len(processes)} fedclient "
                      f"processes fit, upload, wait for the bank and score ({logs})", flush=True)
            _wait_for_sites(processes, t0, work)
            runs.append({
                site.site_id: json.loads(
                    (site.out_dir / "metrics.json").read_text(encoding="utf-8"))
                for site in processes
            })
        sites_seconds = time.perf_counter() - t0
        if between_rounds is not None:
            between_rounds(args.rounds + 1, server)
    finally:
        server.stop()
    # The last run's metrics, with every round's record (each run wrote only its own round)
    # and the first run's fit time (later runs resume and fit nothing).
    metrics = {site: {**runs[-1][site],
                      "rounds": [r for run in runs for r in run[site]["rounds"]],  # type: ignore[union-attr]
                      "seconds": {**runs[-1][site]["seconds"],  # type: ignore[dict-item]
                                  "fit": runs[0][site]["seconds"]["fit"]}}  # type: ignore[index]
               for site in sites}
    reports = _collect_reports(processes, fed_dir / "state" / "reports", args.reports)
    _print_report(args, server.address, categories, metrics, bank_size, server_ready,
                  sites_seconds, time.perf_counter() - started, work if args.keep else None)
    if len(runs) >= 2:
        _print_round_two(runs[0], runs[1], added)
    print(f"\nReports (self-contained HTML; open in a browser): {args.reports}/")
    print("  " + "  ".join(path.name for path in reports))
    return metrics


def _wait_for_sites(processes: Sequence[SiteProcess], t0: float, work: Path) -> None:
    """Wait for every site process, one line per site as it ends (in the order they end);
    RuntimeError with the failed sites' log tails if any failed."""
    failed = []
    pending = list(processes)
    while pending:
        for site in [s for s in pending if s.process.poll() is not None]:
            pending.remove(site)
            code = site.process.returncode
            print(f"  {site.site_id} {'done' if code == 0 else f'FAILED (exit {code})'} "
                  f"after {time.perf_counter() - t0:.1f} s", flush=True)
            if code != 0:
                failed.append(site)
        time.sleep(0.1)
    if failed:
        for site in failed:
            tail = site.log_path.read_text(encoding="utf-8").splitlines()[-5:]
            print(f"site {site.site_id} failed (exit {site.process.returncode}):\n  "
                  + "\n  ".join(tail), file=sys.stderr)
        raise RuntimeError(f"{len(failed)} site(s) failed; logs in {work}")


def _variant_site(sites: Sequence[str], categories: Sequence[str]) -> tuple[str, str] | None:
    """(site, category) that gets the new variant: the washer plant's if there is one, else the
    first site whose category the generator can draw a variant of (None: no such site)."""
    drawable = [(s, c) for s, c in zip(sites, categories, strict=True)
                if c in SYNTHETIC_CATEGORIES]
    washer = [pair for pair in drawable if pair[1] == "washer"]
    return (washer or drawable or [None])[0]


def _copy_category(root: Path, category: str, target: Path) -> Path:
    """A copy of ``root/category`` as ``target/category`` (the site's own folder); ``target``."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(root / category, target / category)
    return target


def _add_variant(folder: Path, category: str, scratch: Path, args: argparse.Namespace) -> int:
    """Generate ``args.variant_images`` defect-free images of ``args.variant`` of
    ``category`` and add them to ``folder/category/train/good`` as variant-NNN.png; returns
    how many."""
    if scratch.exists():
        shutil.rmtree(scratch)
    generate_synthetic_dataset(scratch, categories=(category,), num_train=args.variant_images,
                               num_test=0, image_size=args.image_size, seed=args.seed,
                               layout="autovi", variant=args.variant)
    good = folder / category / "train" / "good"
    images = sorted((scratch / category / "train" / "good").glob("*.png"))
    for image in images:
        shutil.copy2(image, good / f"variant-{image.name}")
    return len(images)


def _print_round_two(
    first: dict[str, dict[str, object]],
    second: dict[str, dict[str, object]],
    added: tuple[str, str, int] | None,
) -> None:
    """Round 2 per site: rows and bytes against round 1's full upload and full download (a
    full re-upload would be at least round 1's: the site holds at least the same images)."""
    what = (f"{added[0]} got {added[2]} images of a new variant" if added is not None
            else "no site got new images")
    print(f"\nRound 2 ({what}): rows and bytes each site sent and received, against round 1's "
          "full upload of its coreset and full download of the bank")
    print(f"  {'site':<7} {'new img':>7} {'rows up':>7} {'bytes up':>9} {'full up':>9} "
          f"{'x fewer':>7} {'bytes down':>10} {'full down':>9} {'x fewer':>7}")
    for site, metrics in second.items():
        r2 = metrics["rounds"][0]  # type: ignore[index]
        r1 = first[site]["rounds"][0]  # type: ignore[index]
        print(f"  {site:<7} {metrics.get('num_new_images') or 0:>7} {r2['rows_up']:>7} "
              f"{r2['bytes_up']:>9} {r1['bytes_up']:>9} {r1['bytes_up'] / r2['bytes_up']:>7.1f} "
              f"{r2['bytes_down']:>10} {r1['bytes_down']:>9} "
              f"{r1['bytes_down'] / max(1, r2['bytes_down']):>7.1f}")
    print("  new img: new images the site covered (new ones held out for calibration not "
          "counted; the rest\n  of its folder is known by content hash and not read again); "
          "bytes down: the bank's change since round 1")


def _collect_reports(
    processes: Sequence[SiteProcess], round_reports: Path, target: Path | None
) -> list[Path]:
    """Copy each site's report.html (as <site>.html) and the server's round reports into
    ``target`` (emptied of earlier reports first); returns the copies. A missing report is an
    error: every site and every closed round writes one."""
    if target is None:
        return []
    target.mkdir(parents=True, exist_ok=True)
    for old in [*target.glob("site-*.html"), *target.glob("round-*.html"),
                *target.glob("round-*.json")]:
        old.unlink()
    copies = []
    for site in processes:
        source = site.out_dir / "report.html"
        if not source.is_file():
            raise RuntimeError(f"site {site.site_id} wrote no report ({source} is missing)")
        copies.append(Path(shutil.copy2(source, target / f"{site.site_id}.html")))
    rounds = sorted(round_reports.glob("round-*.*"), key=lambda p: (len(p.name), p.name))
    if not any(p.suffix == ".html" for p in rounds):
        raise RuntimeError(f"the server wrote no round report in {round_reports}")
    copies += [Path(shutil.copy2(p, target / p.name)) for p in rounds]
    return copies


def _print_report(
    args: argparse.Namespace,
    address: str,
    categories: Sequence[str],
    metrics: dict[str, dict[str, object]],
    bank_size: int,
    server_ready: float,
    sites_seconds: float,
    total: float,
    kept: Path | None,
) -> None:
    weights = "pretrained" if (args.pretrained or args.weights) else "RANDOM weights"
    print(
        f"\nFedPatchCore demo on the real system: fedserver on {address} + {len(metrics)} "
        f"fedclient processes; {args.backbone} ({weights}), {args.image_size} px, D=1024, "
        f"global bank {bank_size} rows, {args.rounds} round(s)"
    )
    print(f"\n  {'site':<7} {'category':<10} {'train':>5} {'test':>5} {'coreset':>7} "
          f"{'r_i':>6} {'img AUROC':>9} {'pix AUROC':>9} {'AU-PRO':>7} {'AU-sPRO@0.3':>11}")
    for (site, m), category in zip(metrics.items(), categories, strict=True):
        test = m.get("test", {})
        assert isinstance(test, dict)
        print(
            f"  {site:<7} {category:<10} {m['num_train_images']:>5} "
            f"{test.get('num_images', 0):>5} {m['local_coreset_rows']:>7} "
            f"{m['local_coverage_radius']:>6.3f} {_fmt(test.get('image_auroc'), 9)} "
            f"{_fmt(test.get('pixel_auroc'), 9)} {_fmt(test.get('au_pro'), 7)} "
            f"{_fmt(test.get('au_spro@0.3'), 11)}"
        )
    print("  train / test: images; coreset: rows the site uploads; r_i: the site's coverage "
          "radius\n  (every training patch of the site lies within r_i of its coreset, in "
          "feature units)")
    print("\nBytes on the wire (serialized gRPC messages, all sites; fp16 + zstd):")
    print(f"  {'round':>5} {'rows up':>8} {'bytes up':>10} {'raw fp32':>10} {'ratio':>6} "
          f"{'bytes down':>11} {'bank download':>15}")
    rounds = max(len(m["rounds"]) for m in metrics.values())  # type: ignore[arg-type]
    for r in range(rounds):
        records = [m["rounds"][r] for m in metrics.values()]  # type: ignore[index]
        rows = sum(x["rows_up"] for x in records)
        up = sum(x["bytes_up"] for x in records)
        down = sum(x["bytes_down"] for x in records)
        raw = rows * 1024 * 4
        kind = "delta" if all(x["bank_delta"] for x in records) else "full"
        ratio = f"{up / raw:.3f}" if raw else "-"
        print(f"  {r + 1:>5} {rows:>8} {up:>10} {raw:>10} {ratio:>6} {down:>11} "
              f"{kind + ' v' + str(records[0]['bank_version']):>15}")
    last = next(iter(metrics.values()))
    print(f"  certificate (max_i r_i + r_S) of the final bank: {last['certificate']:.3f}")

    def med(values: list[float]) -> float:
        values = sorted(values)
        return values[len(values) // 2]

    seconds = [m["seconds"] for m in metrics.values()]
    per_round = [r for m in metrics.values() for r in m["rounds"]]  # type: ignore[attr-defined]

    def rounds_med(key: str) -> float:
        return med([r[key] for r in per_round])

    print("\nTimings (seconds; median over sites):")
    print(f"  fedserver ready {server_ready:.1f}; site processes {sites_seconds:.1f} (start to "
          f"last exit); whole demo {total:.1f}")
    print(
        f"  per site: fit {med([s['fit'] for s in seconds]):.1f}, "  # type: ignore[index]
        f"upload {rounds_med('seconds_upload'):.2f}, wait for bank "
        f"{rounds_med('seconds_wait'):.2f}, download {rounds_med('seconds_download'):.2f}, "
        f"score {med([s.get('score', 0.0) for s in seconds]):.1f}"  # type: ignore[attr-defined]
    )
    if kept is not None:
        print(f"\nServer state, site outputs (metrics.json, overlays/, bank) and logs: {kept}")


def _fmt(value: object, width: int) -> str:
    return f"{value:>{width}.3f}" if isinstance(value, float) else f"{'n/a':>{width}}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--in-process" in argv:
        from core.demo import main as in_process_main

        argv.remove("--in-process")
        return in_process_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generate and args.data is None:
        parser.error("--generate needs --data DIR (without --data the demo uses a temp folder)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except WeightsUnavailableError as error:
        print(f"demo: error: {error.problem}. Run the demo without --pretrained (random "
              "weights, no network needed), or give --weights FILE (a local state dict of "
              f"{error.backbone})", file=sys.stderr)
        return 2
    except (DatasetError, ValueError) as error:
        parser.error(str(error))
    except RuntimeError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
