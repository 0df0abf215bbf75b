"""Scale on loopback: one real fedserver process, 1 .. 32 concurrent sites, banks 1k .. 100k.

What runs: ``fedserver serve`` as its own process (product defaults: fp16 codec, 1 MiB chunks,
fsync'ed journal, prefix-merge selection on the CPU), configured by ``fedserver init-config``.
The sites are threads of this process, each with the product client
(:class:`fedclient.session.SiteSession`, one channel and TCP connection per site): join, upload
a pre-computed synthetic coreset, watch the round until READY, download the global bank. The
coresets are generated and encoded before the clock starts, so the *server* is what is measured,
not feature extraction or site-side encoding.

Workload: global bank size k ("bank"); each of S sites uploads ``floor(share * k / S)`` rows of
D = 1024 (``share`` = 2 by default: the server's guidance is that "sites should send about 2-3 x
their share of the global bank"), clustered Gaussian rows seeded per site
(benchmarks.server_selection.site_features). So the server receives about ``share * k`` rows
whatever S is, and selects k of them.

Per configuration (median and min-max over ``--repeats`` fresh servers):

* round time: from the moment all sites start uploading (a barrier) to the last site holding
  the decoded bank;
* selection time (the tail): the server's own log line "round 1 ready: ... selected in X s",
  from the last chunk's arrival to the bank being stored and announced (ranking runs on the
  server's selection worker as chunks become durable, so this is the backlog left at the last
  chunk plus the selection itself);
* server peak RSS: VmHWM of the fedserver process from /proc/PID/status, after the round; and
  VmRSS right after it started (imports, idle) for reference;
* wire bytes per site, up and down: the kernel's TCP_INFO counters of each site's connection on
  the server side (``ss -tin``: bytes_received, bytes_acked; benchmarks.netcount.TcpCounter),
  with HTTP/2 + gRPC framing, join, status, watch and download; sampled every 50 ms and once
  more after every site finished and before any channel closes. Each site's connection is
  checked to be counted.

Plots (``--record``: benchmarks/figures/scale_sites.png and scale_bank.png, ``_quick`` for the
quick run): bytes and times against S at a fixed bank and against the bank at a fixed S (the
bank plot draws the selection tail on log-log axes with its fitted slope).

Run: ``python -m benchmarks.scale [--full] [--record]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.netcount import CountingProxy, TcpCounter
from benchmarks.report import append_results, markdown_table
from benchmarks.server_selection import site_features
from core.codec import CodecConfig
from core.messages import FeatureChunk, SiteSummary
from core.serde import split_into_chunks
from fedclient.demo import ServerProcess, write_server_config
from fedclient.session import ConnectionConfig, RoundConfig, SessionError, SiteSession

logger = logging.getLogger(__name__)

__all__ = ["RunResult", "build_parser", "classify_growth", "main", "run_round"]

FIGURES = Path(__file__).resolve().parent / "figures"
FINGERPRINT = "5c" * 32
DIM = 1024
_SELECTED = re.compile(r"round 1 ready: .* selected in ([0-9.]+) s")

QUICK_SITES = (1, 2, 4, 8)
QUICK_BANKS = (1000, 2000, 4000, 8000)
FULL_SITES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FULL_BANKS = (1000, 10_000, 30_000, 100_000)


@dataclass(frozen=True)
class RunResult:
    """One round with ``sites`` sites and global bank ``bank`` on a fresh server.

    rows_per_site: rows each site uploaded (D = 1024). round_s: barrier to last bank decoded,
    seconds. upload_s: barrier to the last upload acknowledged. selection_s: the server's
    "selected in" time. tail_s: last upload acknowledged to the last site seeing READY.
    rss_idle_mib / rss_peak_mib: server VmRSS after start, VmHWM after the round (MiB).
    tcp_up / tcp_down: per site, bytes on its TCP connection (server side) up and down.
    msg_up / msg_down: per site, serialized upload / bank-download message bytes as the session
    counts them. bank_rows: rows of the downloaded bank. proxy_up / proxy_down: per proxied
    connection, bytes through the CountingProxy (empty without one).
    """

    sites: int
    bank: int
    rows_per_site: int
    round_s: float
    upload_s: float
    selection_s: float
    tail_s: float
    rss_idle_mib: float
    rss_peak_mib: float
    tcp_up: tuple[int, ...]
    tcp_down: tuple[int, ...]
    msg_up: tuple[int, ...]
    msg_down: tuple[int, ...]
    bank_rows: int
    proxy_up: tuple[int, ...] = ()
    proxy_down: tuple[int, ...] = ()

    @property
    def raw_up_per_site(self) -> int:
        """fp32 bytes of one site's rows (what the codec compresses)."""
        return self.rows_per_site * DIM * 4


def _proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _messages(
    site: str, rows: np.ndarray, config: RoundConfig
) -> tuple[SiteSummary, list[FeatureChunk]]:
    codec: CodecConfig = config.codec
    summary = SiteSummary(
        site_id=site, round=config.round, num_images=max(1, rows.shape[0] // 784),
        num_patches=rows.shape[0] * 10, coreset_rows=rows.shape[0], coverage_radius=1.0,
        feature_dim=rows.shape[1], backbone="wide_resnet50_2", layers=("layer2", "layer3"),
        codec=codec, feature_fingerprint=FINGERPRINT,
    )
    chunks = list(split_into_chunks(
        rows, config=codec, site_id=site, round=config.round,
        max_chunk_bytes=config.max_chunk_bytes,
    ))
    return summary, chunks


def run_round(sites: int, bank: int, workdir: Path, *, share: float = 2.0,
              timeout_s: float = 3600.0, proxy: bool = False,
              keep_arrays: Path | None = None, codec: str = "fp16") -> RunResult:
    """One fresh fedserver process, ``sites`` site threads, one round; see the module doc.

    proxy: route every site through a :class:`CountingProxy` (for timing against a peer that
        is measured through one); its counts land in ``proxy_up`` / ``proxy_down``.
    codec: the server's codec preset (sites upload with it, the bank comes down with it).
    keep_arrays: write each site's uploaded rows (site-<i>.npy, i from 0) and the bank the
        first site downloaded (bank.npy), float32, into this folder (a peer moves the same).
    """
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if bank < 1:
        raise ValueError(f"bank must be >= 1, got {bank}")
    rows_per_site = max(1, math.floor(share * bank / sites))
    names = [f"site-{i + 1:02d}" for i in range(sites)]
    fed = workdir / "fed"
    config_path = write_server_config(
        fed, names, global_bank_size=bank, extractor=None, rounds=1, seed=0, codec=codec
    )
    server = ServerProcess(config_path, workdir / "fedserver.log")
    counter = TcpCounter(server.port)
    relay = CountingProxy(("127.0.0.1", server.port), drain_s=5.0) if proxy else None
    relay_counts: list[tuple[int, int]] = []
    address = f"127.0.0.1:{relay.port}" if relay is not None else server.address
    sessions: list[SiteSession] = []
    banks: dict[str, np.ndarray] = {}
    try:
        rss_idle = _proc_status_kib(server.process.pid, "VmRSS") / 1024.0
        for name in names:
            token = (fed / "site-tokens" / f"{name}.token").read_text().strip()
            # One SiteSession per site, as the product runs it. gRPC would share one TCP
            # connection between channels of a process with identical arguments (its global
            # subchannel pool); a per-site message limit keeps each site on its own connection
            # (as separate site machines are), which the byte count per site relies on.
            sessions.append(SiteSession(
                ConnectionConfig(address, token=token,
                                 max_message_bytes=(64 << 20) + sites_index(name)),
                name,
            ))
        prepared: dict[str, tuple[SiteSummary, list[FeatureChunk]]] = {}
        for index, (name, session) in enumerate(zip(names, sessions, strict=True)):
            config = RoundConfig.from_proto(session.join(FINGERPRINT).config)
            rows = site_features(index, rows_per_site, DIM)
            if keep_arrays is not None:
                keep_arrays.mkdir(parents=True, exist_ok=True)
                np.save(keep_arrays / f"site-{index}.npy", rows)
            prepared[name] = _messages(name, rows, config)
        counter.start()
        start_barrier = threading.Barrier(sites + 1)
        uploaded: dict[str, float] = {}
        ready: dict[str, float] = {}
        done: dict[str, float] = {}
        msg_up: dict[str, int] = {}
        msg_down: dict[str, int] = {}
        bank_rows: dict[str, int] = {}
        errors: list[BaseException] = []

        def site(name: str, session: SiteSession) -> None:
            try:
                summary, chunks = prepared[name]
                start_barrier.wait()
                result = session.upload(summary, chunks)
                uploaded[name] = time.perf_counter()
                session.wait_until_ready(summary.round, timeout_s=timeout_s)
                ready[name] = time.perf_counter()
                download = session.download_bank()
                done[name] = time.perf_counter()
                msg_up[name] = result.bytes_sent
                msg_down[name] = download.bytes_received
                bank_rows[name] = int(download.bank.shape[0])
                if keep_arrays is not None and name == names[0]:
                    banks[name] = download.bank
            except BaseException as error:  # reported after the join
                errors.append(error)
                if not start_barrier.broken:
                    start_barrier.abort()

        threads = [threading.Thread(target=site, args=(n, s), name=f"scale-{n}")
                   for n, s in zip(names, sessions, strict=True)]
        for thread in threads:
            thread.start()
        start_barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError(f"a site failed: {errors[0]!r}") from errors[0]
        counter.stop()  # its last sample: every site finished, no channel closed yet
        rss_peak = _proc_status_kib(server.process.pid, "VmHWM") / 1024.0
    finally:
        for session in sessions:
            session.close()
        if relay is not None:
            relay.close()
            relay_counts = relay.per_connection()
        counter.stop()
        server.stop()
    log = (workdir / "fedserver.log").read_text(encoding="utf-8")
    selected = _SELECTED.search(log)
    if selected is None:
        raise RuntimeError(f"no 'round 1 ready ... selected in' line in {workdir}/fedserver.log")
    if len(counter.up) != sites:
        raise RuntimeError(
            f"counted {len(counter.up)} TCP connection(s) on the server port for {sites} sites: "
            "the per-site byte counts would be wrong"
        )
    if keep_arrays is not None:
        np.save(keep_arrays / "bank.npy", banks[names[0]])
    ordered_peers = sorted(counter.up)
    return RunResult(
        sites=sites, bank=bank, rows_per_site=rows_per_site,
        round_s=max(done.values()) - start,
        upload_s=max(uploaded.values()) - start,
        selection_s=float(selected.group(1)),
        tail_s=max(ready.values()) - max(uploaded.values()),
        rss_idle_mib=rss_idle, rss_peak_mib=rss_peak,
        tcp_up=tuple(counter.up[p] for p in ordered_peers),
        tcp_down=tuple(counter.down[p] for p in ordered_peers),
        msg_up=tuple(msg_up[n] for n in names),
        msg_down=tuple(msg_down[n] for n in names),
        bank_rows=min(bank_rows.values()),
        proxy_up=tuple(up for up, _ in relay_counts),
        proxy_down=tuple(down for _, down in relay_counts),
    )


def sites_index(name: str) -> int:
    """The number in a site name "site-NN" (makes each site's channel arguments distinct)."""
    return int(name.rsplit("-", 1)[1])


def classify_growth(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, str]:
    """Log-log slope of ``ys`` against ``xs`` (least squares) and a word for it:
    flat (|slope| < 0.2), sub-linear, linear (0.8 .. 1.2), super-linear, or falls as 1/x
    (slope < -0.8) / falls slowly."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need >= 2 matching points, got {len(xs)} x and {len(ys)} y")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("growth needs positive values on both axes")
    slope = float(np.polyfit(np.log(xs), np.log(ys), 1)[0])
    if abs(slope) < 0.2:
        word = "flat"
    elif slope <= -0.8:
        word = "falls as 1/x"
    elif slope < 0:
        word = "falls slowly"
    elif slope < 0.8:
        word = "sub-linear"
    elif slope <= 1.2:
        word = "linear"
    else:
        word = "super-linear"
    return slope, word


def _spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}-{fmt.format(max(values))})")


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@dataclass(frozen=True)
class Point:
    """Medians over the repeats of one (sites, bank) configuration."""

    sites: int
    bank: int
    runs: tuple[RunResult, ...]

    def med(self, what: str) -> float:
        return _median([getattr(r, what) for r in self.runs])

    def per_site(self, what: str) -> float:
        """Median over repeats of the mean over sites of a per-site tuple field."""
        return _median([statistics.fmean(getattr(r, what)) for r in self.runs])


def _row(point: Point) -> list[object]:
    runs = point.runs
    first = runs[0]
    up, down = point.per_site("tcp_up"), point.per_site("tcp_down")
    return [
        point.sites, f"{point.bank:,}", f"{first.rows_per_site:,}",
        _spread([r.round_s for r in runs]), _spread([r.upload_s for r in runs]),
        _spread([r.selection_s for r in runs]), _spread([r.tail_s for r in runs]),
        f"{point.med('rss_idle_mib'):.0f}", _spread([r.rss_peak_mib for r in runs], "{:.0f}"),
        f"{up / 2**20:.3f}", f"{up / first.raw_up_per_site:.3f}",
        f"{statistics.fmean(first.tcp_up) / statistics.fmean(first.msg_up):.4f}",
        f"{down / 2**20:.3f}",
        f"{statistics.fmean(first.tcp_down) / statistics.fmean(first.msg_down):.4f}",
        f"{min(min(r.tcp_up) for r in runs) / max(max(r.tcp_up) for r in runs):.3f}",
        first.bank_rows,
    ]


HEADER = [
    "sites", "bank k", "rows/site", "round s", "upload s", "selection s (server log)",
    "tail s (last upload -> READY seen)", "server RSS idle MiB", "server peak RSS MiB",
    "TCP up/site MiB", "up wire/raw fp32", "TCP/msg up", "TCP down/site MiB", "TCP/msg down",
    "min/max site up", "bank rows",
]


def _plot(
    points: Sequence[Point], x_attr: str, fixed: str, share: float, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [getattr(p, x_attr) for p in points]
    fig, (ax_bytes, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_bytes.plot(xs, [p.per_site("tcp_up") / 2**20 for p in points], "o-", label="up per site")
    ax_bytes.plot(xs, [p.per_site("tcp_down") / 2**20 for p in points], "s-",
                  label="down per site")
    ax_bytes.plot(xs, [p.sites * (p.per_site("tcp_up") + p.per_site("tcp_down")) / 2**20
                       for p in points], "^--", label="all sites, both ways")
    ax_bytes.set_ylabel("MiB on the TCP connection")
    ax_time.plot(xs, [p.med("round_s") for p in points], "o-", label="round")
    ax_time.plot(xs, [p.med("upload_s") for p in points], "s-", label="upload (all sites)")
    tails = [p.med("selection_s") for p in points]
    tail_label = "selection tail (server)"
    if x_attr == "bank" and len(points) >= 2:
        slope, _ = classify_growth([float(x) for x in xs], tails)
        tail_label += f", log-log slope {slope:.2f}"
    ax_time.plot(xs, tails, "^-", label=tail_label)
    ax_time.set_ylabel("seconds (median)")
    ax_rss = ax_time.twinx()
    ax_rss.plot(xs, [p.med("rss_peak_mib") for p in points], "k:", label="server peak RSS")
    ax_rss.set_ylabel("server peak RSS, MiB")
    ax_rss.set_ylim(bottom=0)  # from zero: a flat RSS must look flat, not like noise
    label = "concurrent sites" if x_attr == "sites" else "global bank size k (rows of D=1024)"
    for ax in (ax_bytes, ax_time):
        ax.set_xscale("log", base=2 if x_attr == "sites" else 10)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_bytes.legend(fontsize=8)
    handles = ax_time.get_legend_handles_labels()
    rss_handles = ax_rss.get_legend_handles_labels()
    ax_time.legend(handles[0] + rss_handles[0], handles[1] + rss_handles[1], fontsize=8)
    fig.suptitle(
        f"fedserver on loopback, {fixed}; each site uploads {share:g}k/S rows (fp16 codec)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _growth_notes(points: Sequence[Point], x_attr: str) -> str:
    xs = [float(getattr(p, x_attr)) for p in points]
    parts = []
    for name, values in (
        ("up bytes per site", [p.per_site("tcp_up") for p in points]),
        ("down bytes per site", [p.per_site("tcp_down") for p in points]),
        ("round time", [p.med("round_s") for p in points]),
        ("selection time", [p.med("selection_s") for p in points]),
        ("server peak RSS", [p.med("rss_peak_mib") for p in points]),
    ):
        slope, word = classify_growth(xs, values)
        parts.append(f"{name}: {word} (log-log slope {slope:.2f})")
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--full", action="store_true",
                        help=f"sites {FULL_SITES} at k=10,000 and banks {FULL_BANKS} at 4 sites "
                        f"(default quick: sites {QUICK_SITES} at k=2,000, banks {QUICK_BANKS} "
                        "at 4 sites)")
    parser.add_argument("--sites", type=int, nargs="+", default=None,
                        help="override the site counts of the sites sweep")
    parser.add_argument("--banks", type=int, nargs="+", default=None,
                        help="override the bank sizes of the bank sweep")
    parser.add_argument("--fixed-bank", type=int, default=None,
                        help="bank size of the sites sweep (quick 2,000, full 10,000)")
    parser.add_argument("--fixed-sites", type=int, default=None,
                        help="sites of the bank sweep (default 4: at k = 100k each site "
                        "holds a 400 MB decoded bank)")
    parser.add_argument("--share", type=float, default=2.0,
                        help="each site uploads floor(share * k / sites) rows (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh servers per point (>= 1)")
    parser.add_argument("--record", action="store_true",
                        help="append to benchmarks/RESULTS.md and write the PNGs under "
                        "benchmarks/figures/")
    parser.add_argument("--figures", type=Path, default=None,
                        help="also write the PNGs here (without --record)")
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not args.share > 0:
        parser.error(f"--share must be > 0, got {args.share}")
    for flag, values in (("--sites", args.sites), ("--banks", args.banks)):
        if values is not None and (min(values) < 1 or len(set(values)) != len(values)):
            parser.error(f"{flag} needs distinct values >= 1, got {values}")
    for flag, value in (("--fixed-bank", args.fixed_bank), ("--fixed-sites", args.fixed_sites)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    sites_sweep = tuple(args.sites or (FULL_SITES if args.full else QUICK_SITES))
    banks_sweep = tuple(args.banks or (FULL_BANKS if args.full else QUICK_BANKS))
    fixed_bank = args.fixed_bank or (10_000 if args.full else 2000)
    fixed_sites = args.fixed_sites or 4
    configs = sorted(
        {(s, fixed_bank) for s in sites_sweep} | {(fixed_sites, b) for b in banks_sweep}
    )
    loads: list[float] = []
    failures: list[str] = []
    results: dict[tuple[int, int], list[RunResult]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-scale-") as tmp:
        for repeat in range(args.repeats):
            for sites, bank in configs:
                loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
                work = Path(tmp) / f"s{sites}-k{bank}-r{repeat}"
                work.mkdir()
                try:
                    result = run_round(sites, bank, work, share=args.share)
                except (RuntimeError, SessionError) as error:
                    # One configuration failing (a server out of memory at a large bank) must not
                    # lose the others: it is reported under the tables instead.
                    failures.append(f"{sites} sites x k={bank:,} (repeat {repeat + 1}): "
                                    f"{' '.join(str(error).split())[:300]}")
                    logger.error("sites %d bank %d failed: %s", sites, bank, error)
                    continue
                results[(sites, bank)].append(result)
                logger.warning("sites %d bank %d repeat %d: round %.2f s, selection %.2f s, "
                               "peak RSS %.0f MiB", sites, bank, repeat + 1, result.round_s,
                               result.selection_s, result.rss_peak_mib)
    by_sites = [Point(s, fixed_bank, tuple(results[(s, fixed_bank)])) for s in sites_sweep
                if results[(s, fixed_bank)]]
    by_bank = [Point(fixed_sites, b, tuple(results[(fixed_sites, b)])) for b in banks_sweep
               if results[(fixed_sites, b)]]
    custom = any(v is not None for v in (args.sites, args.banks, args.fixed_bank,
                                         args.fixed_sites))
    mode = "custom" if custom else ("full" if args.full else "quick")
    failures_reported = False
    common = (
        f"Median (min-max) of {args.repeats} fresh fedserver processes per row; load average "
        f"(1 min) before the runs {min(loads)}-{max(loads)}. Sites are threads of the benchmark "
        "process, each a fedclient.session.SiteSession with its own TCP connection, uploading "
        f"pre-computed, pre-encoded synthetic coresets (floor({args.share:g} k / S) rows of "
        "D = 1024, clustered Gaussian), so the server is what is measured. Server: product "
        "defaults (fp16 codec, 1 MiB chunks, fsync'ed journal, prefix merge, CPU). TCP bytes: "
        "the kernel's per-connection counters on the server side, all rpcs and framing; 'min/max "
        "site up': smallest over largest site's upload bytes (every site counted)."
    )
    for points, x_attr, title, fixed in (
        (by_sites, "sites", f"Scale ({mode}): concurrent sites at k = {fixed_bank:,}",
         f"k = {fixed_bank:,}"),
        (by_bank, "bank", f"Scale ({mode}): bank size at {fixed_sites} sites",
         f"{fixed_sites} sites"),
    ):
        if not points:
            continue
        notes = common
        if failures and not failures_reported:
            notes += " FAILED runs (not in the tables): " + "; ".join(failures) + "."
            failures_reported = True
        if len(points) >= 2:
            notes += f" Growth against {x_attr}: {_growth_notes(points, x_attr)}."
        append_results(title, markdown_table(HEADER, [_row(p) for p in points]), notes,
                       append=args.record)
        name = f"scale_{x_attr}{'' if args.full else '_quick'}.png"
        targets = ([FIGURES / name] if args.record else []) + (
            [args.figures / name] if args.figures else [])
        for path in targets if points else []:
            _plot(points, x_attr, fixed, args.share, path)
            print(f"wrote {path}")
    if failures and not failures_reported:
        append_results(f"Scale ({mode}): every configuration failed", "",
                       common + " FAILED runs: " + "; ".join(failures) + ".",
                       append=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
