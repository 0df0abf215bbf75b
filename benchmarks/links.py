"""Time to the global bank over slow site links: network namespaces + veth + ``tc qdisc tbf``.

The site process runs in its own network namespace (``ip netns exec``), joined to the host by a
veth pair; the fedserver process listens on the host end. ``tc qdisc ... tbf`` on both ends
limits the site's link to ``--rates`` Mbit/s each way (upload on the site's end, bank download on
the host's end). netem is not available on these machines and the veth adds no delay: the
numbers are bandwidth-limited, with loopback latency.

Per codec and link rate one real federation of two rounds runs (the wire benchmark's site:
64 px, 5 categories, resnet18 random init, D = 1024; train images only, so the site does not
score): the site's own timings of round 1 (upload of its coreset, wait for the bank, full bank
download) and round 2 (upload of its novel rows, bank delta download), and the message bytes
each way. "Time to global bank" = upload + wait + download of that round (the fit before it is
the same for every codec and link and is reported once).

Needs root (CAP_NET_ADMIN) and ``ip`` / ``tc``: without them the command stops with an error
saying so; nothing falls back to an unshaped run. Namespaces and links are removed on every
exit path, and stale ones of an interrupted run are removed at start.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from benchmarks.report import append_results, markdown_table, plot_path, save_figure
from benchmarks.wire import FederationRun, _preset_setting, run_federation, train_only_copy
from core.codec import VALUE_TYPES
from core.data import SYNTHETIC_CATEGORIES, generate_synthetic_dataset

logger = logging.getLogger(__name__)

__all__ = [
    "LinkSetup",
    "LinksUnavailableError",
    "build_parser",
    "check_prerequisites",
    "main",
    "shaped_link",
]

NAMESPACE: Final[str] = "fedbench-site"
HOST_IF: Final[str] = "fbw-host"
SITE_IF: Final[str] = "fbw-site"
HOST_ADDR: Final[str] = "10.231.0.1"
SITE_ADDR: Final[str] = "10.231.0.2"
DEFAULT_RATES: Final[tuple[int, ...]] = (10, 100)

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


class LinksUnavailableError(RuntimeError):
    """Network namespaces or tc cannot be used here (the message says which and why)."""


def _run(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, check=False)


def check_prerequisites(
    *,
    euid: int | None = None,
    which: Callable[[str], str | None] = shutil.which,
    run: Runner = _run,
) -> None:
    """Raise LinksUnavailableError unless this process can create a namespace and a tbf qdisc.

    Checks: effective uid 0, ``ip`` and ``tc`` on PATH, and that a throw-away namespace can be
    created (and removes it). ``euid`` / ``which`` / ``run`` are injectable for tests.
    """
    uid = os.geteuid() if euid is None else euid
    if uid != 0:
        raise LinksUnavailableError(
            f"fedbench links needs root (network namespaces and tc qdiscs need CAP_NET_ADMIN); "
            f"running as uid {uid}. Run it as root, or skip the slow-link benchmark"
        )
    missing = [tool for tool in ("ip", "tc") if which(tool) is None]
    if missing:
        raise LinksUnavailableError(
            f"fedbench links needs iproute2's {' and '.join(missing)} on PATH (not found)"
        )
    probe = f"{NAMESPACE}-probe"
    run(["ip", "netns", "delete", probe])  # stale probe of an interrupted run; may not exist
    added = run(["ip", "netns", "add", probe])
    if added.returncode != 0:
        raise LinksUnavailableError(
            f"network namespaces are unavailable here: `ip netns add {probe}` failed "
            f"({added.stderr.strip() or 'exit ' + str(added.returncode)})"
        )
    run(["ip", "netns", "delete", probe])


def _must(run: Runner, command: Sequence[str]) -> None:
    result = run(command)
    if result.returncode != 0:
        raise LinksUnavailableError(
            f"`{' '.join(command)}` failed: {result.stderr.strip() or result.returncode}"
        )


def remove_stale(run: Runner = _run) -> bool:
    """Remove this benchmark's namespace and host veth if an earlier run left them; True if
    there was something to remove."""
    listed = run(["ip", "netns", "list"]).stdout.split()
    stale = NAMESPACE in listed
    if stale:
        run(["ip", "netns", "delete", NAMESPACE])  # deletes the site end of the veth too
    if run(["ip", "link", "show", HOST_IF]).returncode == 0:
        run(["ip", "link", "delete", HOST_IF])
        stale = True
    if stale:
        logger.warning("removed a stale %s namespace / %s link of an earlier run", NAMESPACE,
                       HOST_IF)
    return stale


@dataclass(frozen=True)
class LinkSetup:
    """The shaped link of one run: rate each way in Mbit/s; the server binds ``host_addr``."""

    rate_mbit: int
    host_addr: str = HOST_ADDR
    site_prefix: tuple[str, ...] = ("ip", "netns", "exec", NAMESPACE)


def tbf_args(rate_mbit: int) -> list[str]:
    """tc tbf parameters for ``rate_mbit``: a burst of 5 ms of the rate (at least 16 KiB, so
    one 64 KiB GSO segment is split, not dropped) and a queue of 200 ms."""
    if rate_mbit <= 0:
        raise ValueError(f"rate must be > 0 Mbit/s, got {rate_mbit}")
    burst = max(16 * 1024, rate_mbit * 1_000_000 // 8 // 200)
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"]


@contextmanager
def shaped_link(rate_mbit: int, run: Runner = _run) -> Iterator[LinkSetup]:
    """A namespace joined to the host by a veth limited to ``rate_mbit`` each way; removed on
    exit, whatever happens inside."""
    remove_stale(run)
    try:
        _must(run, ["ip", "netns", "add", NAMESPACE])
        _must(run, ["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", SITE_IF])
        _must(run, ["ip", "link", "set", SITE_IF, "netns", NAMESPACE])
        _must(run, ["ip", "addr", "add", f"{HOST_ADDR}/30", "dev", HOST_IF])
        _must(run, ["ip", "link", "set", HOST_IF, "up"])
        inside = ["ip", "netns", "exec", NAMESPACE]
        _must(run, [*inside, "ip", "addr", "add", f"{SITE_ADDR}/30", "dev", SITE_IF])
        _must(run, [*inside, "ip", "link", "set", SITE_IF, "up"])
        _must(run, [*inside, "ip", "link", "set", "lo", "up"])
        # the site's upload leaves through SITE_IF, the bank download through HOST_IF
        _must(run, [*inside, "tc", "qdisc", "add", "dev", SITE_IF, "root", *tbf_args(rate_mbit)])
        _must(run, ["tc", "qdisc", "add", "dev", HOST_IF, "root", *tbf_args(rate_mbit)])
        yield LinkSetup(rate_mbit)
    finally:
        run(["ip", "netns", "delete", NAMESPACE])
        if run(["ip", "link", "show", HOST_IF]).returncode == 0:
            run(["ip", "link", "delete", HOST_IF])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbench links", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rates", type=int, nargs="+", default=list(DEFAULT_RATES),
                        help="link rates to emulate, Mbit/s each way")
    parser.add_argument("--codecs", nargs="+", choices=VALUE_TYPES,
                        default=["fp32", "fp16", "int8", "int4"],
                        help="value types (each at its preset: shuffle where it applies, zstd 1, "
                        "1 MiB chunks)")
    parser.add_argument("--full", action="store_true", help="every value type")
    parser.add_argument("--repeats", type=int, default=1, help="runs per codec and rate")
    parser.add_argument("--train-images", type=int, default=40, help="per category")
    parser.add_argument("--coreset-percentage", type=float, default=0.25)
    parser.add_argument("--bank-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true",
                        help="append the table to benchmarks/RESULTS.md and write the plot")
    return parser


def _round_seconds(record: dict[str, object]) -> float:
    return sum(float(record[k]) for k in ("seconds_upload", "seconds_wait",  # type: ignore[arg-type]
                                          "seconds_download"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or any(r <= 0 for r in args.rates):
        raise SystemExit("fedbench links: --repeats and --rates must be > 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_prerequisites()
    except LinksUnavailableError as error:
        print(f"fedbench links: error: {error}", file=sys.stderr)
        return 2
    codecs = list(VALUE_TYPES) if args.full else args.codecs
    categories = list(SYNTHETIC_CATEGORIES)
    bank_size = max(1, round(args.bank_ratio * len(categories) * args.train_images * 64))
    results: dict[tuple[str, int], list[FederationRun]] = {}
    load = [Path("/proc/loadavg").read_text().split()[0]]
    with tempfile.TemporaryDirectory(prefix="fedbench-links-") as tmp:
        full = generate_synthetic_dataset(
            Path(tmp) / "data", categories=categories, num_train=args.train_images, num_test=1,
            image_size=64, seed=args.seed, layout="autovi",
        )
        root = train_only_copy(full, Path(tmp) / "train-only")
        for rate in args.rates:
            for value_type in codecs:
                setting = _preset_setting(value_type)
                runs = []
                for r in range(args.repeats):
                    with shaped_link(rate) as link:
                        runs.append(run_federation(
                            root, Path(tmp) / f"{rate}-{value_type}-{r}", setting,
                            categories=categories, coreset_percentage=args.coreset_percentage,
                            bank_size=bank_size, rounds=2, server_bind=link.host_addr,
                            site_prefix=link.site_prefix,
                        ))
                results[(value_type, rate)] = runs
                first = runs[0].metrics["rounds"]
                assert isinstance(first, list)
                print(f"{rate} Mbit/s {value_type}: round 1 {_round_seconds(first[0]):.2f} s, "
                      f"round 2 {_round_seconds(first[1]):.2f} s", flush=True)
                load.append(Path("/proc/loadavg").read_text().split()[0])
    rows, fits = table(results)
    header = [
        "codec", "link Mbit/s", "r1 bytes up", "r1 bytes down", "r1 upload s", "r1 download s",
        "r1 time to bank s", "r2 rows up", "r2 bytes up", "r2 bytes down (delta)",
        "r2 upload s", "r2 download s", "r2 time to bank s", "r1/r2 bytes up",
        "r1/r2 bytes down",
    ]
    notes = (
        f"One fedserver process on the host, one fedclient site process in a network namespace "
        f"behind a veth pair shaped with tc tbf to the link rate in both directions (no added "
        f"latency: netem is unavailable). Site: {len(categories)} categories x "
        f"{args.train_images} train images, 64 px, resnet18 random init, D = 1024, local coreset "
        f"{args.coreset_percentage}; global bank k = {bank_size}; 2 rounds (round 2: the rows "
        "the global bank does not cover, and the bank as a delta). Bytes: serialized messages "
        "as the site counts them (the wire adds ~0.1 %, see the wire table). Time to bank = "
        "upload + wait for the server's selection + download, as the site measures them; "
        f"median of {args.repeats} run(s). The site's fit before round 1 took "
        f"{statistics.median(fits):.1f} s (median; not part of the times). Load average "
        f"(1 min): {min(load, key=float)}-{max(load, key=float)}."
    )
    figures = plot_links(results) if args.record else []
    append_results("Slow links: time to the global bank over 10 / 100 Mbit/s",
                   markdown_table(header, rows), notes, append=args.record, figures=figures)
    return 0


def table(results: dict[tuple[str, int], list[FederationRun]]) -> tuple[list[list[object]],
                                                                          list[float]]:
    rows: list[list[object]] = []
    fits: list[float] = []
    for (value_type, rate), runs in results.items():
        def med(r: int, key: str, runs: list[FederationRun] = runs) -> float:
            values = []
            for run in runs:
                rounds = run.metrics["rounds"]
                assert isinstance(rounds, list)
                values.append(float(rounds[r][key]))
            return statistics.median(values)

        def to_bank(r: int, runs: list[FederationRun] = runs) -> float:
            return statistics.median(
                _round_seconds(run.metrics["rounds"][r]) for run in runs  # type: ignore[index]
            )

        for run in runs:
            seconds = run.metrics["seconds"]
            assert isinstance(seconds, dict)
            fits.append(float(seconds["fit"]))
        up1, down1 = med(0, "bytes_up"), med(0, "bytes_down")
        up2, down2 = med(1, "bytes_up"), med(1, "bytes_down")
        rows.append([
            value_type, rate, int(up1), int(down1), f"{med(0, 'seconds_upload'):.2f}",
            f"{med(0, 'seconds_download'):.2f}", f"{to_bank(0):.2f}", int(med(1, "rows_up")),
            int(up2), int(down2), f"{med(1, 'seconds_upload'):.2f}",
            f"{med(1, 'seconds_download'):.2f}", f"{to_bank(1):.2f}",
            f"{up1 / up2:.1f}" if up2 else "inf", f"{down1 / down2:.1f}" if down2 else "inf",
        ])
    return rows, fits


def plot_links(results: dict[tuple[str, int], list[FederationRun]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({rate for _, rate in results})
    codecs = list(dict.fromkeys(v for v, _ in results))
    fig, axes = plt.subplots(1, len(rates), figsize=(4 * len(rates), 3.5), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        r1 = [statistics.median(_round_seconds(run.metrics["rounds"][0])  # type: ignore[index]
                                for run in results[(c, rate)]) for c in codecs]
        r2 = [statistics.median(_round_seconds(run.metrics["rounds"][1])  # type: ignore[index]
                                for run in results[(c, rate)]) for c in codecs]
        x = range(len(codecs))
        ax.bar([i - 0.2 for i in x], r1, 0.4, label="round 1 (coreset, full bank)")
        ax.bar([i + 0.2 for i in x], r2, 0.4, label="round 2 (novel rows, delta)")
        ax.set_xticks(list(x), codecs)
        ax.set_title(f"{rate} Mbit/s link")
        ax.set_ylabel("time to global bank (s)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = plot_path("links_time_to_bank.png")
    save_figure(fig, path)
    return [path]


if __name__ == "__main__":
    sys.exit(main())
