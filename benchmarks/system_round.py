"""A full demo federation on loopback, the real system: wall time and bytes on the wire.

Runs ``python3 dev.py demo``'s federation (one fedserver process, one fedclient process per
site, 2 rounds) ``--repeats`` times on one generated dataset and reports, per run:

* wall times: fedserver start to its port being known, site processes (start to last exit),
  the whole run;
* bytes per round and direction as the sites count them: the serialized gRPC messages
  (``ByteSize()`` of every UploadFeaturesRequest sent, DownloadBankResponse received);
* bytes per direction on the TCP streams, from the kernel's TCP_INFO of the server's sockets
  (``ss -tin``: bytes_received = up, bytes_acked = down), sampled every 50 ms while the sites
  are connected (a site keeps its channel open while it scores, so the last sample follows the
  last download). This includes gRPC/HTTP2 framing, the joins, watches and status queries.

No Python proxy sits in the path (it would slow the loopback stream, REFERENCE.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.netcount import TcpCounter
from benchmarks.report import append_results, markdown_table
from core.data import generate_synthetic_dataset
from fedclient import demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.system_round", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs (default 3)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    demo_args = demo.build_parser().parse_args(
        ["--image-size", str(args.image_size), "--rounds", str(args.rounds)]
    )
    rows = []
    walls: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fedpatchcore-system-round-") as tmp:
        root = generate_synthetic_dataset(
            Path(tmp) / "data", image_size=args.image_size, seed=0, layout="autovi"
        )
        for run in range(args.repeats):
            work = Path(tmp) / f"run{run}"
            work.mkdir()
            counters: list[TcpCounter] = []

            def watch(server: demo.ServerProcess, counters: list[TcpCounter] = counters) -> None:
                counter = TcpCounter(server.port)
                counter.start()
                counters.append(counter)

            load = Path("/proc/loadavg").read_text().split()[0]
            start = time.perf_counter()
            metrics = demo._run_on(root, work, demo_args, on_server=watch)
            wall = time.perf_counter() - start
            counters[0].stop()
            walls.append(wall)
            msg_up = [sum(m["rounds"][r]["bytes_up"] for m in metrics.values())
                      for r in range(args.rounds)]
            msg_down = [sum(m["rounds"][r]["bytes_down"] for m in metrics.values())
                        for r in range(args.rounds)]
            tcp_up = sum(counters[0].up.values())
            tcp_down = sum(counters[0].down.values())
            rows.append([
                run + 1, load, f"{wall:.1f}", len(metrics),
                " / ".join(str(b) for b in msg_up), " / ".join(str(b) for b in msg_down),
                sum(msg_up), tcp_up, f"{tcp_up / sum(msg_up):.4f}",
                sum(msg_down), tcp_down, f"{tcp_down / sum(msg_down):.4f}",
                len(counters[0].up),
            ])
    header = [
        "run", "load (1 min)", "wall s", "sites", "msg bytes up per round",
        "msg bytes down per round", "msg up", "TCP up", "TCP/msg up", "msg down", "TCP down",
        "TCP/msg down", "TCP connections",
    ]
    notes = (
        f"Wall time of the whole federation (server start to last site exit, {args.rounds} "
        f"rounds, 4 sites, {args.image_size} px, resnet18 random weights, D=1024): median "
        f"{statistics.median(walls):.1f} s, min {min(walls):.1f}, max {max(walls):.1f} "
        f"over {len(walls)} runs. 'msg' counts serialized gRPC messages as the sites count "
        "them; 'TCP' is the kernel's per-connection byte count (all rpcs, HTTP/2 and gRPC "
        "framing included). Round 2's bank travels as a delta."
    )
    append_results(
        f"System round on loopback: fedserver + 4 fedclient processes, {args.rounds} rounds",
        markdown_table(header, rows), notes, append=args.record,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
