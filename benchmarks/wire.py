"""Bytes on the wire between real fedclient and fedserver processes, per codec and chunk size.

For each setting (value type, byte-shuffle, zstd level, chunk size) the benchmark runs the real
system twice on one generated dataset: a ``fedserver serve`` process (``--codec``,
``--byte-shuffle``, ``--zstd-level``, ``--max-chunk-bytes``) and one ``fedclient run`` process
per site, one round.

* Through a counting TCP proxy on loopback (benchmarks.netcount): every byte each way of every
  connection the site opens (HTTP/2 + gRPC framing, JoinRound, UploadFeatures, WatchRound,
  DownloadBank), checked byte for byte against the kernel's TCP_INFO counters of the proxy's
  sockets (the counters ``ss -tin`` prints).
* Directly (no proxy, it would slow the stream): the site's upload wall time (its
  ``seconds_upload``: first chunk sent to the server's final acknowledgement; the chunks are
  encoded before) and the test metrics it scores with the downloaded bank.

Columns: raw fp32 bytes of the upload (rows x D x 4); encoded payload bytes (zstd frames +
quantisation parameters); serialized messages; wire bytes up and down; wire/raw; framing
overhead wire/payload (up); encode and decode MB/s of raw fp32 (this process, one thread, the
chunking the site uses, on the fp32 run's global bank); upload seconds and raw-equivalent MB/s;
Δ image / pixel AUROC against the fp32 setting. The setting is the codec-tradeoff one (64 px,
5 categories, 40 train + 60 test images each, resnet18 random init, D = 1024): pixel AUROC
~0.97, image AUROC ~0.998 on 300 test images, so a change there can show (a saturated baseline
is reported as such instead of a Δ).

Last, the prediction check: ``CommunicationProtocol.compute_communication_cost(..., wire=True)``
of an upload against the bytes the proxy counted for that UploadFeatures call alone (the real
fedclient session code, a real fedserver process).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from benchmarks.netcount import CountingProxy
from benchmarks.report import append_results, markdown_table, plot_path, save_figure
from core.codec import CODEC_PRESETS, VALUE_TYPES, CodecConfig, decode_matrix
from core.data import SYNTHETIC_CATEGORIES, generate_synthetic_dataset
from core.messages import SiteSummary
from core.serde import DEFAULT_MAX_CHUNK_BYTES, split_into_chunks

logger = logging.getLogger(__name__)

__all__ = ["WireSetting", "build_parser", "main", "run_federation"]

KIB = 1024
CHUNK_SIZES = (64 * KIB, 256 * KIB, 1024 * KIB, 3 * 1024 * KIB)
ZSTD_LEVELS = (1, 3, 9)
#: value type -> its preset name (fedserver --codec)
PRESET_OF = {preset.value_type: name for name, preset in CODEC_PRESETS.items()}
#: value type -> (wire/raw target, |Δ image AUROC| target).
TARGETS = {"fp16": (0.42, 0.001), "int8": (0.22, 0.002), "int4": (0.12, 0.005)}
FRAMING_TARGET = 1.003
UPLOAD_TARGET_MBS = 250.0


@dataclass(frozen=True)
class WireSetting:
    """One cell of the matrix: how the server tells the sites to encode and chunk."""

    value_type: str
    byte_shuffle: bool
    zstd_level: int
    chunk_bytes: int

    @property
    def codec(self) -> CodecConfig:
        return CodecConfig(self.value_type, self.byte_shuffle, self.zstd_level)

    @property
    def is_default(self) -> bool:
        return self.codec == CODEC_PRESETS["fp16"] and self.chunk_bytes == DEFAULT_MAX_CHUNK_BYTES

    def server_args(self) -> list[str]:
        return [
            "--codec", PRESET_OF[self.value_type],
            "--byte-shuffle" if self.byte_shuffle else "--no-byte-shuffle",
            "--zstd-level", str(self.zstd_level),
            "--max-chunk-bytes", str(self.chunk_bytes),
        ]

    def label(self) -> str:
        shuffle = "shuf" if self.byte_shuffle else "noshuf"
        return f"{self.value_type} {shuffle} z{self.zstd_level} {self.chunk_bytes // KIB}K"


def _preset_setting(value_type: str, chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> WireSetting:
    preset = CODEC_PRESETS[PRESET_OF[value_type]]
    return WireSetting(value_type, preset.byte_shuffle, preset.zstd_level, chunk_bytes)


def quick_matrix() -> list[WireSetting]:
    """Every value type at its preset and the default chunk size, then the chunk-size sweep of
    the default codec (fp16 + shuffle + zstd 1)."""
    settings = [_preset_setting(v) for v in VALUE_TYPES]
    settings += [_preset_setting("fp16", c) for c in CHUNK_SIZES if c != DEFAULT_MAX_CHUNK_BYTES]
    return settings


def full_matrix() -> list[WireSetting]:
    """value types x byte-shuffle (on/off where it applies) x zstd 1/3/9 x chunk sizes."""
    settings = []
    for value_type in VALUE_TYPES:
        shuffles = (True, False) if value_type in ("fp32", "fp16", "bf16") else (False,)
        for shuffle in shuffles:
            for level in ZSTD_LEVELS:
                for chunk in CHUNK_SIZES:
                    settings.append(WireSetting(value_type, shuffle, level, chunk))
    return settings


@dataclass
class FederationRun:
    """One real federation: the site's metrics.json and, through the proxy, the wire bytes."""

    metrics: dict[str, object]
    wall_s: float
    wire_up: int | None = None
    wire_down: int | None = None
    connections: int = 0
    kernel_agrees: bool | None = None
    bank_file: Path | None = None


def run_federation(
    root: Path,
    work: Path,
    setting: WireSetting,
    *,
    categories: Sequence[str],
    coreset_percentage: float,
    bank_size: int,
    rounds: int = 1,
    proxy: bool = False,
    server_bind: str | None = None,
    site_prefix: Sequence[str] = (),
    extra_site_args: Sequence[str] = (),
    tls_dir: Path | None = None,
) -> FederationRun:
    """One fedserver process and one fedclient site process holding ``categories`` of
    ``root``; returns the site's metrics (and, with ``proxy``, the bytes it counted).

    server_bind: HOST to bind instead of 127.0.0.1 (a namespace's veth address);
    site_prefix: command prefix of the site (``ip netns exec NAME``).
    tls_dir: a folder of :func:`make_certificates`: the server serves TLS, the site checks it.
    """
    from fedclient import demo  # imports grpc; keep `fedbench --help` light

    work.mkdir(parents=True)
    extractor: dict[str, object] = {
        "backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False,
        "pretrain_embed_dim": 1024, "target_embed_dim": 1024, "patch_size": 3,
        "resize": 64, "crop": 0, "init_seed": 0,
    }
    config = demo.write_server_config(
        work / "fed", ["site-1"], global_bank_size=bank_size, extractor=extractor,
        rounds=rounds, codec=PRESET_OF[setting.value_type], max_chunk_bytes=setting.chunk_bytes,
    )
    server_args = setting.server_args()
    if server_bind is not None:
        server_args += ["--bind", f"{server_bind}:0"]
    # --backbone/--no-pretrained: the weights a site checks before it contacts the server
    site_args = ["--coreset-percentage", str(coreset_percentage), "--no-overlays",
                 "--backbone", "resnet18", "--no-pretrained", *extra_site_args]
    if tls_dir is not None:
        server_args += ["--tls-cert", str(tls_dir / "server.pem"),
                        "--tls-key", str(tls_dir / "server.key")]
        site_args += ["--tls-ca", str(tls_dir / "ca.pem")]
    start = time.perf_counter()
    server = demo.ServerProcess(config, work / "fedserver.log", extra_args=server_args)
    host = server_bind or "127.0.0.1"
    counter = CountingProxy(("127.0.0.1", server.port)) if proxy else None
    try:
        address = counter.address if counter is not None else f"{host}:{server.port}"
        site = demo.start_site(
            address, "site-1", work / "fed" / "site-tokens" / "site-1.token", root,
            work / "out-site-1", categories=list(categories),
            extra_args=site_args,
            command_prefix=site_prefix,
        )
        code = site.process.wait()
        if code != 0:
            tail = "\n  ".join(site.log_path.read_text(encoding="utf-8").splitlines()[-8:])
            raise RuntimeError(f"fedclient exited with {code} ({setting.label()}):\n  {tail}")
    finally:
        if counter is not None:
            counter.close()  # waits for the site's connections to end (the process exited)
        server.stop()
    run = FederationRun(
        metrics=json.loads((site.out_dir / "metrics.json").read_text(encoding="utf-8")),
        wall_s=time.perf_counter() - start,
        bank_file=site.out_dir / "bank.safetensors",
    )
    if counter is not None:
        run.wire_up, run.wire_down = counter.totals()
        run.connections = len(counter.connections)
        run.kernel_agrees = bool(counter.connections) and all(
            c.kernel_agrees for c in counter.connections
        )
    return run


def make_certificates(directory: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl, RSA 2048, 2 days) in
    ``directory``: ca.pem, server.pem, server.key. Raises RuntimeError without openssl."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        raise RuntimeError("--tls needs the openssl command to make a test certificate")
    directory.mkdir(parents=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=fedbench-ca")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=fedbench-server")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return directory


def train_only_copy(root: Path, target: Path) -> Path:
    """A view of the AutoVI-layout ``root`` without its test images (symlinks to everything
    else): fedclient then fits, uploads and downloads but does not score, which is what a timing
    run needs. The training images, their order and so the site's upload are unchanged."""
    target.mkdir(parents=True)
    for category in sorted(p for p in root.iterdir() if p.is_dir()):
        (target / category.name).mkdir()
        for child in category.iterdir():
            if child.name not in ("test", "ground_truth"):
                (target / category.name / child.name).symlink_to(child.resolve())
    return target


def _rounds(metrics: dict[str, object]) -> list[dict[str, object]]:
    rounds = metrics["rounds"]
    assert isinstance(rounds, list)
    return rounds


def codec_speed(bank: np.ndarray, setting: WireSetting, repeats: int) -> tuple[float, float]:
    """(encode, decode) MB/s of raw fp32 (10^6 B/s): ``bank`` split into the setting's chunks
    and decoded again, median of ``repeats``, in this process."""
    raw = bank.nbytes
    encode_s, decode_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chunks = list(split_into_chunks(bank, config=setting.codec, site_id="s", round=1,
                                        max_chunk_bytes=setting.chunk_bytes))
        t1 = time.perf_counter()
        for chunk in chunks:
            decode_matrix(chunk.features, max_decoded_bytes=setting.chunk_bytes)
        t2 = time.perf_counter()
        encode_s.append(t1 - t0)
        decode_s.append(t2 - t1)
    return raw / statistics.median(encode_s) / 1e6, raw / statistics.median(decode_s) / 1e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbench wire", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--full", action="store_true",
                        help="the whole matrix: fp32/fp16/bf16/int8/int4 x byte-shuffle on/off x "
                        "zstd 1/3/9 x chunks 64 KiB..3 MiB (default: every value type at the "
                        "default chunk + the chunk sweep of fp16)")
    parser.add_argument("--value-types", nargs="+", choices=VALUE_TYPES,
                        help="with --full: only these value types")
    parser.add_argument("--zstd-levels", nargs="+", type=int, choices=ZSTD_LEVELS,
                        help="with --full: only these zstd levels")
    parser.add_argument("--chunk-kib", nargs="+", type=int,
                        choices=[c // KIB for c in CHUNK_SIZES],
                        help="with --full: only these chunk sizes (KiB)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="direct (timed) runs per setting; the proxy run is one more")
    parser.add_argument("--train-images", type=int, default=40, help="per category")
    parser.add_argument("--test-images", type=int, default=60, help="per category")
    parser.add_argument("--coreset-percentage", type=float, default=0.25,
                        help="the site's local coreset (its upload), fraction of its patches")
    parser.add_argument("--bank-ratio", type=float, default=0.02,
                        help="global bank k as a fraction of the training patches (0.02: k = "
                        "256, image AUROC 0.998; at 0.1 it is 1.000, saturated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ingest-only", action="store_true",
                        help="only the loopback ingest rate: 1 site and 8 sites at once to a "
                        "fresh fedserver process with default settings, --repeats runs each")
    parser.add_argument("--tls", action="store_true",
                        help="every run over TLS (a throw-away CA and server certificate; "
                        "needs openssl): the wire columns then include TLS records")
    parser.add_argument("--record", action="store_true",
                        help="append the table to benchmarks/RESULTS.md and write the plots")
    return parser


def _fmt_delta(value: float | str) -> str:
    """A Δ AUROC, or why there is none ("saturated", "not scored")."""
    return value if isinstance(value, str) else f"{value:+.5f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("fedbench wire: --repeats must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.ingest_only:
        return ingest_breakdown(args)
    if not args.full and (args.value_types or args.zstd_levels or args.chunk_kib):
        raise SystemExit("fedbench wire: --value-types / --zstd-levels / --chunk-kib select "
                         "within --full's matrix; add --full")
    settings = full_matrix() if args.full else quick_matrix()
    settings = [
        s for s in settings
        if (not args.value_types or s.value_type in args.value_types)
        and (not args.zstd_levels or s.zstd_level in args.zstd_levels)
        and (not args.chunk_kib or s.chunk_bytes // KIB in args.chunk_kib)
    ]
    if not any(s.value_type == "fp32" for s in settings):
        settings.insert(0, _preset_setting("fp32"))  # the baseline of the AUROC changes
    fp32_first = sorted(settings, key=lambda s: s.value_type != "fp32")
    load = [Path("/proc/loadavg").read_text().split()[0]]
    results: list[tuple[WireSetting, FederationRun, list[FederationRun]]] = []
    categories = list(SYNTHETIC_CATEGORIES)
    patches = len(categories) * args.train_images * 64  # 64 px, layer2 stride 8: 8 x 8
    bank_size = max(1, round(args.bank_ratio * patches))
    with tempfile.TemporaryDirectory(prefix="fedbench-wire-") as tmp:
        root = generate_synthetic_dataset(
            Path(tmp) / "data", categories=categories, num_train=args.train_images,
            num_test=args.test_images, image_size=64, seed=args.seed, layout="autovi",
        )
        train_only = train_only_copy(root, Path(tmp) / "train-only")
        tls_dir = make_certificates(Path(tmp) / "pki") if args.tls else None
        scored: dict[tuple[str, int], dict[str, object]] = {}
        for i, setting in enumerate(fp32_first):
            common = dict(categories=categories, coreset_percentage=args.coreset_percentage,
                          bank_size=bank_size, tls_dir=tls_dir)
            # Byte-shuffle and zstd are lossless and fp32/fp16/bf16 values do not depend on
            # the chunking: settings with the same decoded values score the same, so only the
            # first of them scores the test images (scoring is most of a run's time).
            key = (setting.value_type,
                   setting.chunk_bytes if setting.value_type in ("int8", "int4") else 0)
            score = key not in scored and not args.tls
            counted = run_federation(root if score else train_only,
                                     Path(tmp) / f"{i}-proxy", setting, proxy=True,
                                     **common)  # type: ignore[arg-type]
            if args.tls:  # a bytes-only run: the plaintext runs report the metrics
                counted.metrics["test"] = None
            elif key in scored:
                counted.metrics["test"] = scored[key]
            else:
                scored[key] = counted.metrics["test"]  # type: ignore[assignment]
            direct = [
                run_federation(train_only, Path(tmp) / f"{i}-direct{r}", setting, **common)  # type: ignore[arg-type]
                for r in range(args.repeats)
            ]
            results.append((setting, counted, direct))
            up = counted.wire_up or 0
            upload_s = float(_rounds(direct[0].metrics)[0]["seconds_upload"])  # type: ignore[arg-type]
            print(f"[{i + 1}/{len(settings)}] {setting.label()}: wire up {up} down "
                  f"{counted.wire_down}, upload {upload_s:.3f} s, "
                  f"run {counted.wall_s:.0f} + {sum(d.wall_s for d in direct):.0f} s",
                  flush=True)
            load.append(Path("/proc/loadavg").read_text().split()[0])
        baseline = next(r for s, r, _ in results if s.value_type == "fp32")
        assert baseline.bank_file is not None
        bank = np.ascontiguousarray(
            load_file(str(baseline.bank_file))["memory_bank"], dtype=np.float32
        )
        prediction = prediction_check(bank, Path(tmp) / "predict")
        load.append(Path("/proc/loadavg").read_text().split()[0])
    rows, plot_rows = table_rows(results, bank, baseline, args.repeats)
    header = [
        "setting", "raw fp32 up", "payload up", "messages up", "wire up", "wire down",
        "wire/raw up", "wire/payload up", "encode MB/s", "decode MB/s", "upload s",
        "upload MB/s raw", "Δ img AUROC", "Δ pix AUROC", "proxy = kernel",
    ]
    notes = notes_text(args, results, baseline, bank_size, prediction, load)
    title = f"Wire bytes on the real system: {'full matrix' if args.full else 'quick subset'}"
    if args.tls:
        title += ", TLS"
    figures = []
    if args.record:
        figures = plot_wire(plot_rows, ("full" if args.full else "quick")
                            + ("_tls" if args.tls else ""))
    append_results(title, markdown_table(header, rows), notes, append=args.record,
                   figures=figures)
    return 0


def _auroc_delta(
    test: dict[str, float] | None, base: dict[str, float] | None, key: str
) -> float | str:
    """test - base of metric ``key``; "saturated" when the baseline is 1.0 (a change could
    not show), "not scored" for bytes-only (--tls) runs."""
    if test is None or base is None:
        return "not scored"
    if base[key] >= 1.0:
        return "saturated"
    return float(test[key]) - float(base[key])


def table_rows(
    results: list[tuple[WireSetting, FederationRun, list[FederationRun]]],
    bank: np.ndarray,
    baseline: FederationRun,
    repeats: int,
) -> tuple[list[list[object]], list[dict[str, object]]]:
    base_test = baseline.metrics["test"]
    assert base_test is None or isinstance(base_test, dict)
    rows: list[list[object]] = []
    plot_rows: list[dict[str, object]] = []
    for setting, counted, direct in results:
        record = _rounds(counted.metrics)[0]
        dim = bank.shape[1]
        raw = int(record["rows_up"]) * dim * 4  # type: ignore[call-overload]
        payload = int(record["payload_bytes_up"])  # type: ignore[call-overload]
        up, down = counted.wire_up or 0, counted.wire_down or 0
        encode, decode = codec_speed(bank, setting, repeats=3)
        seconds = [float(_rounds(d.metrics)[0]["seconds_upload"]) for d in direct]  # type: ignore[arg-type]
        upload = statistics.median(seconds)
        spread = f" ({min(seconds):.3f}-{max(seconds):.3f})" if len(seconds) > 1 else ""
        # a proxy run scores the test images (the timed runs see train images only: they
        # would spend most of their time scoring); the proxy relays bytes, it changes no value
        test = counted.metrics["test"]
        assert test is None or isinstance(test, dict)
        # the timed runs upload the same rows: a different row count would mean the runs
        # are not the same federation
        same = all(_rounds(d.metrics)[0]["rows_up"] == record["rows_up"] for d in direct)
        d_img = _auroc_delta(test, base_test, "image_auroc")
        d_pix = _auroc_delta(test, base_test, "pixel_auroc")
        rows.append([
            setting.label() + (" (default)" if setting.is_default else ""), raw, payload,
            record["bytes_up"], up, down, f"{up / raw:.4f}", f"{up / payload:.5f}",
            f"{encode:.0f}", f"{decode:.0f}", f"{upload:.3f}{spread}", f"{raw / upload / 1e6:.3g}",
            _fmt_delta(d_img), _fmt_delta(d_pix) + ("" if same else " (timed runs differ!)"),
            "yes" if counted.kernel_agrees else "NO",
        ])
        plot_rows.append({
            "setting": setting, "wire_raw": up / raw, "framing": up / payload,
            "upload_mbs": raw / upload / 1e6, "encode": encode, "d_pix": d_pix, "d_img": d_img,
        })
    return rows, plot_rows


def notes_text(
    args: argparse.Namespace,
    results: list[tuple[WireSetting, FederationRun, list[FederationRun]]],
    baseline: FederationRun,
    bank_size: int,
    prediction: dict[str, float],
    load: list[str],
) -> str:
    base_test = baseline.metrics["test"]
    assert base_test is None or isinstance(base_test, dict)
    record = _rounds(baseline.metrics)[0]
    ratio = prediction["predicted"] / prediction["measured"]
    lines = [
        f"One fedserver process + one fedclient site process (resnet18 random init, 64 px, "
        f"D = 1024; {len(SYNTHETIC_CATEGORIES)} categories x {args.train_images} train + "
        f"{args.test_images} test images; local coreset {args.coreset_percentage} = "
        f"{record['rows_up']} rows uploaded; global bank k = {bank_size}), 1 round, per setting "
        f"one run through the counting proxy (bytes) and {args.repeats} direct run(s) (upload "
        "seconds: median (min-max); MB/s = raw fp32 bytes / upload seconds, the site's upload "
        "call from first chunk sent to the server's acknowledgement, chunks encoded before; "
        "the timed runs use the training images only, so they do not score). fsync'ed "
        "journal. Test metrics are scored once per distinct decoded bank values (per value "
        "type; per chunk size for int8/int4, which quantise per chunk): shuffle and zstd are "
        "lossless. "
        + (
            "Bytes-only TLS run: nothing scored (TLS changes no value; the plaintext runs "
            "report the metrics). " if base_test is None else
            f"fp32 baseline metrics on {args.test_images * len(SYNTHETIC_CATEGORIES)} test "
            f"images: image AUROC {base_test['image_auroc']:.4f}, pixel AUROC "
            f"{base_test['pixel_auroc']:.4f}. "
        )
        + "'wire' counts every byte of every connection "
        "(JoinRound, UploadFeatures, WatchRound, DownloadBank, HTTP/2 + gRPC framing"
        f"{', TLS records and handshake' if args.tls else ', plaintext: no TLS'}); "
        "'proxy = kernel': the proxy's counts equal the TCP_INFO counters "
        "of both its sockets, both directions. Encode/decode MB/s: this process, one thread, "
        f"on the fp32 run's global bank. Load average (1 min) during the runs: "
        f"{min(load, key=float)}-{max(load, key=float)}.",
        "",
        "Prediction check (CommunicationProtocol.compute_communication_cost against the bytes "
        f"the proxy counted for one UploadFeatures call of the fp32 run's bank, "
        f"{prediction['rows']:.0f} rows, fp16 default codec, 1 MiB chunks, real fedserver "
        f"process, fedclient's SiteSession): messages only {prediction['messages']:.0f} B, with "
        f"framing (wire=True) {prediction['predicted']:.0f} B, measured "
        f"{prediction['measured']:.0f} B up: predicted/measured "
        f"{ratio:.5f} ({'within' if abs(ratio - 1) <= 0.01 else 'NOT within'} 1 %).",
    ]
    verdicts = []
    for setting, counted, direct in results:
        target = TARGETS.get(setting.value_type)
        preset = CODEC_PRESETS[PRESET_OF[setting.value_type]]
        if target is None or setting.codec != preset or (
            setting.chunk_bytes != DEFAULT_MAX_CHUNK_BYTES
        ):
            continue
        rec = _rounds(counted.metrics)[0]
        raw = int(rec["rows_up"]) * 1024 * 4  # type: ignore[call-overload]
        ratio = (counted.wire_up or 0) / raw
        test = counted.metrics["test"]
        assert test is None or isinstance(test, dict)
        delta = _auroc_delta(test, base_test, "image_auroc")
        # Bytes are a property of the codec; the Δ AUROC of one scored run is not: the bank's
        # picks (and so the scores a codec moves) vary between runs and machines, and one run of
        # int8 gave +0.00004 where another gave +0.00227. So the Δ verdict names its single run.
        if isinstance(delta, str):
            auroc = f"Δ image AUROC {delta}"
        else:
            within = "within" if abs(delta) <= target[1] else "OUTSIDE"
            auroc = (f"Δ image AUROC {_fmt_delta(delta)} {within} |Δ| <= {target[1]} in this "
                     "single scored run (it varies between runs: repeat before calling it)")
        verdicts.append(
            f"{setting.value_type}: wire/raw {ratio:.4f} (target <= {target[0]}): "
            f"{'met' if ratio <= target[0] else 'MISSED'}; {auroc}"
        )
        if setting.is_default:
            payload = int(rec["payload_bytes_up"])  # type: ignore[call-overload]
            framing = (counted.wire_up or 0) / payload
            verdicts.append(
                f"framing overhead at the default chunk (fp16): wire/payload {framing:.5f} "
                f"(target <= {FRAMING_TARGET}, {'TLS' if args.tls else 'plaintext'}): "
                f"{'met' if framing <= FRAMING_TARGET else 'MISSED'}"
            )
            seconds = statistics.median(
                float(_rounds(d.metrics)[0]["seconds_upload"]) for d in direct  # type: ignore[arg-type]
            )
            rate = raw / seconds / 1e6
            verdicts.append(
                f"loopback upload, default codec: {rate:.0f} MB/s raw-equivalent over the "
                f"upload call (target >= {UPLOAD_TARGET_MBS:.0f}): "
                f"{'met' if rate >= UPLOAD_TARGET_MBS else 'MISSED'}"
            )
    if verdicts:
        lines += ["", "Targets: " + "; ".join(verdicts) + "."]
    return "\n".join(lines)


#: Feature fingerprint of the synthetic probe uploads (any 64 hex digits the server accepts).
PROBE_FINGERPRINT = "ab" * 32


def _probe_summary(site_id: str, rows: np.ndarray, codec: CodecConfig) -> SiteSummary:
    """Round-1 SiteSummary announcing ``rows`` [N, D] as one site's whole coreset."""
    return SiteSummary(
        site_id=site_id, round=1, num_images=10, num_patches=rows.shape[0],
        coreset_rows=rows.shape[0], coverage_radius=1.0, feature_dim=rows.shape[1],
        backbone="resnet18", layers=("layer2", "layer3"), codec=codec,
        feature_fingerprint=PROBE_FINGERPRINT,
    )


_READY_LINE = re.compile(
    r"round 1 ready: .* selected in ([0-9.]+) s \(backlog (\d+) rows at close, tail ([0-9.]+) s\)"
)


def _ingest_run(sites: int, rows: np.ndarray, work: Path) -> dict[str, float]:
    """One round on a fresh ``fedserver serve`` process (product defaults: fp16, 1 MiB chunks,
    fsync'ed journal, prefix-merge ranking in the background): ``sites`` threads of this
    process, each with fedclient's SiteSession on its own channel, upload ``rows`` (encoded
    before the clock starts) at once. Returns the seconds from the start barrier to the last
    acknowledgement, and the server's selection tail from its log."""
    import threading

    from fedclient import demo
    from fedclient.session import ConnectionConfig, SiteSession, read_token_file

    names = [f"site-{i}" for i in range(sites)]
    config = demo.write_server_config(work / "fed", names, global_bank_size=1000,
                                      extractor=None, codec="fp16")
    codec = CODEC_PRESETS["fp16"]
    messages = {}
    for name in names:
        summary = _probe_summary(name, rows, codec)
        messages[name] = (summary, list(split_into_chunks(rows, config=codec, site_id=name,
                                                          round=1)))
    server = demo.ServerProcess(config, work / "fedserver.log")
    barrier = threading.Barrier(sites + 1)
    acked: dict[str, float] = {}
    errors: list[str] = []

    def site(name: str) -> None:
        token = read_token_file(work / "fed" / "site-tokens" / f"{name}.token")
        try:
            with SiteSession(ConnectionConfig(server.address, token=token), name) as session:
                session.join(PROBE_FINGERPRINT)
                barrier.wait()
                session.upload(*messages[name])
                acked[name] = time.perf_counter()
        except Exception as error:  # reported below
            errors.append(f"{name}: {error}")
            barrier.abort()

    threads = [threading.Thread(target=site, args=(n,)) for n in names]
    try:
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError(f"ingest run failed: {errors}")
        upload_s = max(acked.values()) - started
        deadline = time.monotonic() + 300
        match = None
        while match is None and time.monotonic() < deadline:
            match = _READY_LINE.search((work / "fedserver.log").read_text())
            time.sleep(0.1)
    finally:
        server.stop()
    if match is None:
        raise RuntimeError(f"no 'round 1 ready' line in {work / 'fedserver.log'}")
    return {"upload_s": upload_s, "selected_s": float(match.group(1)),
            "backlog_rows": float(match.group(2)), "tail_s": float(match.group(3))}


def ingest_breakdown(args: argparse.Namespace) -> int:
    """Loopback ingest rate of the daemon: 1 site and 8 sites together upload 3,200 x 1024
    rows each (fp16 + zstd, 1 MiB chunks) to a fresh ``fedserver serve`` process; MB/s = raw
    fp32 bytes of every site / seconds from the start to the last acknowledgement. An ack means
    decoded, verified and fsync'ed (group commit); ranking runs behind it, so the table also
    shows the rows still unranked when the round closed and the selection tail after the last
    chunk. Rows: seeded ReLU'd Gaussians (the codec ratio differs from real banks; the time
    does not depend on it much)."""
    rows = np.maximum(np.random.default_rng(args.seed).standard_normal((3200, 1024)), 0).astype(
        np.float32
    )
    table_rows = []
    load = [Path("/proc/loadavg").read_text().split()[0]]
    for sites in (1, 8):
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="fedbench-ingest-") as tmp:
                runs.append(_ingest_run(sites, rows, Path(tmp)))
        rates = [sites * rows.nbytes / r["upload_s"] / 1e6 for r in runs]
        upload = [r["upload_s"] for r in runs]
        tails = [r["tail_s"] for r in runs]
        backlog = [r["backlog_rows"] for r in runs]
        table_rows.append([
            str(sites), f"{sites * rows.nbytes / 1e6:.0f}", f"{statistics.median(upload):.3f}",
            f"{statistics.median(rates):.0f}", f"{min(rates):.0f}-{max(rates):.0f}",
            f"{statistics.median(backlog):.0f}", f"{statistics.median(tails):.2f}",
            "met" if statistics.median(rates) >= 250 else "MISSED",
        ])
        load.append(Path("/proc/loadavg").read_text().split()[0])
        print(table_rows[-1], flush=True)
    notes = (
        f"Each site uploads 3,200 x 1024 rows ({rows.nbytes / 1e6:.1f} MB raw fp32; fp16 + "
        "shuffle + zstd 1, 1 MiB chunks, encoded before the clock starts) with fedclient's "
        "SiteSession (one channel per site, threads of the benchmark process) to a fresh "
        "`fedserver serve` process with default settings (fsync on, prefix-merge ranking on "
        "the selection worker); seconds = start barrier to the last site's acknowledgement; "
        f"median and range over {args.repeats} runs. Backlog: rows not yet ranked when the "
        "last upload completed; tail: last chunk to bank stored (server log). Target >= 250 "
        f"MB/s raw. Load average (1 min): {min(load, key=float)}-{max(load, key=float)}."
    )
    append_results(
        "Loopback ingest rate: acknowledged = decoded, verified, group-committed",
        markdown_table(["sites", "MB raw", "upload s (median)", "MB/s raw (median)",
                        "MB/s range", "backlog rows at close", "tail s", ">= 250 MB/s"],
                       table_rows),
        notes, append=args.record,
    )
    return 0


def prediction_check(bank: np.ndarray, work: Path) -> dict[str, float]:
    """Upload ``bank`` once through the proxy with fedclient's SiteSession to a real fedserver
    process and compare the bytes of that UploadFeatures call with the prediction."""
    from core.federated import CommunicationProtocol
    from fedclient import demo
    from fedclient.session import ConnectionConfig, SiteSession, read_token_file

    work.mkdir(parents=True)
    codec = CODEC_PRESETS["fp16"]
    config = demo.write_server_config(work / "fed", ["probe"], global_bank_size=16,
                                      extractor=None, codec="fp16")
    server = demo.ServerProcess(config, work / "fedserver.log")
    try:
        with CountingProxy(("127.0.0.1", server.port)) as proxy:
            token = read_token_file(work / "fed" / "site-tokens" / "probe.token")
            with SiteSession(ConnectionConfig(proxy.address, token=token), "probe") as session:
                session.join(PROBE_FINGERPRINT)
                summary = _probe_summary("probe", bank, codec)
                chunks = list(split_into_chunks(bank, config=codec, site_id="probe", round=1))
                before = proxy.totals()[0]
                session.upload(summary, chunks)
                measured = proxy.totals()[0] - before
    finally:
        server.stop()
    kwargs = dict(codec=codec, client_id="probe", summary=summary)
    return {
        "rows": float(bank.shape[0]),
        "messages": float(CommunicationProtocol.compute_communication_cost(bank, **kwargs)),  # type: ignore[arg-type]
        "predicted": float(
            CommunicationProtocol.compute_communication_cost(bank, wire=True, **kwargs)  # type: ignore[arg-type]
        ),
        "measured": float(measured),
    }


def plot_wire(plot_rows: list[dict[str, object]], suffix: str) -> list[Path]:
    """wire/raw per codec (bars) and the chunk-size sweep (framing overhead, upload MB/s);
    files wire_ratio_<suffix>.png and wire_chunks_<suffix>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    chunk_default = [r for r in plot_rows
                     if r["setting"].chunk_bytes == DEFAULT_MAX_CHUNK_BYTES]  # type: ignore[attr-defined]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [r["setting"].label().rsplit(" ", 1)[0] for r in chunk_default]  # type: ignore[attr-defined]
    values = [float(r["wire_raw"]) for r in chunk_default]  # type: ignore[arg-type]
    bars = ax.bar(range(len(values)), values, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=7)
    for target, style in ((0.42, "--"), (0.22, ":"), (0.12, "-.")):
        ax.axhline(target, color="grey", linestyle=style, linewidth=0.8)
    ax.set_ylabel("wire bytes up / raw fp32 bytes")
    ax.set_title("Upload bytes on the TCP stream per codec (1 MiB chunks)")
    fig.tight_layout()
    path = plot_path(f"wire_ratio_{suffix}.png")
    save_figure(fig, path)
    figures.append(path)
    sweep = sorted(
        (r for r in plot_rows if r["setting"].codec == CODEC_PRESETS["fp16"]),  # type: ignore[attr-defined]
        key=lambda r: r["setting"].chunk_bytes,  # type: ignore[attr-defined]
    )
    if len(sweep) > 1:
        fig, left = plt.subplots(figsize=(6, 4))
        sizes = [r["setting"].chunk_bytes / KIB for r in sweep]  # type: ignore[attr-defined]
        left.plot(sizes, [float(r["framing"]) for r in sweep], "o-", color="tab:blue")  # type: ignore[arg-type]
        left.set_xscale("log", base=2)
        left.set_xlabel("chunk size (KiB of decoded payload)")
        left.set_ylabel("wire / encoded payload (up)", color="tab:blue")
        right = left.twinx()
        right.plot(sizes, [float(r["upload_mbs"]) for r in sweep], "s--", color="tab:red")  # type: ignore[arg-type]
        right.set_ylabel("upload MB/s (raw fp32 equivalent)", color="tab:red")
        left.set_title("fp16 + shuffle + zstd 1: chunk size sweep")
        fig.tight_layout()
        path = plot_path(f"wire_chunks_{suffix}.png")
        save_figure(fig, path)
        figures.append(path)
    return figures


if __name__ == "__main__":
    sys.exit(main())
