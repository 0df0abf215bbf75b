"""``fedbench`` / ``python -m benchmarks``: one entry point, one sub-command per question.

    fedbench --help                  the sub-commands
    fedbench wire --help             a sub-command's own flags
    fedbench wire                    quick default (a few minutes on 2 cores); prints its table
    fedbench wire --full --record    the whole matrix, appended to benchmarks/RESULTS.md (with the
                                     command, git commit and machine) + PNG plots in
                                     benchmarks/figures/

Each sub-command is a module of this package with ``main(argv) -> int``; ``python -m
benchmarks.<module>`` keeps working. To add one, add a line to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = ["COMMANDS", "build_parser", "main"]

#: sub-command -> (module under benchmarks/, one line of help). Keep it explicit and sorted by
#: question; each module has ``main(argv: list[str] | None) -> int``.
COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "wire": ("wire", "bytes on the TCP stream between real fedclient and fedserver per codec "
             "and chunk size, upload time, AUROC change"),
    "links": ("links", "time to the global bank over emulated 10 / 100 Mbit/s site uplinks "
              "(network namespaces + tc tbf; root), rounds 1 and 2"),
    "scale": ("scale", "1 .. 32 concurrent sites and bank sizes 1k .. 100k against a real "
              "fedserver: round time, server peak RSS, selection time, bytes per site"),
    "peers": ("peers", "Flower's transport, anomalib's PatchcoreModel and KCenterGreedy against "
              "ours, each as a ratio in one run"),
    "reliability": ("reliability", "the full reliability and security campaign "
                    "(pytest -m reliability: faults, bad input, fuzzing, 32-site load, TLS)"),
    "report-speed": ("report_speed", "what writing report.html costs fedclient score"),
    "inspect-latency": ("inspect_latency", "per-image latency and throughput of fedclient's "
                        "inspection against anomalib's TorchInferencer, 16k and 100k banks"),
    "new-data": ("new_data", "round 2 after one site gets a new product variant: bytes up and "
                 "down per site against a full re-upload and re-download, real processes"),
    "system-round": ("system_round", "a whole demo federation on loopback: wall time and TCP "
                     "bytes per round"),
    "codec-tradeoff": ("codec_tradeoff", "codec size / error / speed / metric change on "
                       "PatchCore banks, in process"),
    "coreset-speed": ("coreset_speed", "coreset selection speed against the reference loop"),
    "fit-memory": ("fit_memory", "peak RSS of a PatchCore fit against the image count"),
    "federated-parity": ("federated_parity", "federated vs centralised PatchCore metrics on "
                         "generated data"),
    "realistic-parity": ("realistic_parity", "federated vs centralised PatchCore on the "
                         "realistic generated setting"),
    "upload-size": ("upload_size", "rows each site uploads in round 1 against the bank's "
                    "coverage and AUROC (upload multiplier f x k / S)"),
    "site-allocation": ("site_allocation", "bank rows kept per site and AUROC per category "
                        "for floors of the allocation rule, a compact category beside busy "
                        "ones"),
    "server-selection": ("server_selection", "server selection latency after the last chunk"),
    "selection-scale": ("selection_scale", "server selection at k = 10k .. 100k: ingest work, "
                        "tail, memory, certified r_S, quality against the exact ranking"),
}


def build_parser(prog: str = "fedbench") -> argparse.ArgumentParser:
    epilog = "sub-commands:\n" + "\n".join(
        f"  {name:<18} {text}" for name, (_, text) in COMMANDS.items()
    ) + (
        "\n\nEvery sub-command prints its table; --record appends it to benchmarks/RESULTS.md "
        "(command, git commit, machine) and, where it draws any, writes PNG plots to "
        f"benchmarks/figures/. `{prog} COMMAND --help` lists a sub-command's flags."
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description="FedPatchCore benchmarks: one sub-command per question.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                        help="the benchmark to run (see below)")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="the sub-command's own arguments")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run ``argv`` (default sys.argv[1:]): the first word names the sub-command, the rest
    goes to its module's main()."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog is None:
        prog = "fedbench" if Path(sys.argv[0]).name == "fedbench" else "python -m benchmarks"
    args = build_parser(prog).parse_args(argv)
    module_name, _ = COMMANDS[args.command]
    module = importlib.import_module(f"benchmarks.{module_name}")
    # benchmarks.report writes this into RESULTS.md as the command that produced a table
    os.environ["FEDBENCH_COMMAND"] = prog
    result = module.main(list(args.args))
    return int(result or 0)


def console_main() -> int:
    """The ``fedbench`` console script."""
    return main(prog="fedbench")


if __name__ == "__main__":
    sys.exit(main())
